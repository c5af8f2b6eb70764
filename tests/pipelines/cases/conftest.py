"""The packed cohort the dataset, view and loader tests read (built once per session; read-only: copy to change)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prep(preprocessed) -> Path:
    """4 synthetic NIfTI cases (seed 5, a quarter normal) preprocessed with the fast config and the masks: the
    session cohort of ``tests/conftest.py``."""
    return preprocessed(4, 5).prep


@pytest.fixture(scope="session")
def tok(prep: Path):
    """A WordPiece tokenizer fitted on the cohort's reports."""
    from fvlm.model.tokenizer import train_wordpiece
    from pipelines.cases.format import corpus_texts

    return train_wordpiece(corpus_texts(prep), vocab_size=400, max_length=32)
