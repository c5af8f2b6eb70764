"""Fixtures shared by the pipelines tests (the cohorts themselves are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def eval_cohort(cohort8, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(prep, model, labels.csv): the 8-case cohort and an untrained tiny model with a WordPiece tokenizer fitted on
    its reports, saved as an export; what the evaluate and embed tests score."""
    from fvlm.model import create_model, save_pretrained, train_wordpiece
    from pipelines.cases.format import corpus_texts, read_run

    prep = cohort8.prep
    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    names = tuple(read_run(prep)["anatomies"][str(i)] for i in range(1, 16))
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)})
    out = tmp_path_factory.mktemp("eval-model") / "model"
    save_pretrained(model, tok, out)
    return prep, out, cohort8.synth / "labels.csv"
