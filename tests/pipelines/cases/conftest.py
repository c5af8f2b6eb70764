"""The packed cohort the dataset, view and loader tests read (built once per session; read-only: copy to change)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic NIfTI cases (seed 5) through ``pipelines.preprocess.run`` with the fast config and the masks."""
    from pipelines.preprocess.run import PreprocessConfig, run as run_preprocess
    from pipelines.preprocess.tables import TableSpec
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    synth = tmp_path_factory.mktemp("synth")
    make_cohort(synth, SynthConfig(cases=4, seed=5, format="nifti", normal_share=0.25))
    out = tmp_path_factory.mktemp("prep") / "out"
    cfg = PreprocessConfig(
        input=synth / "images", out=out, crop=str(fast_config(tmp_path_factory.mktemp("cfg"))),
        segmenter="masks", segmenter_options={"path": synth / "segmentations"},
        reports=TableSpec(synth / "reports.csv"), labels=TableSpec(synth / "labels.csv"),
        case_id="key", progress=False,
    )
    summary = run_preprocess(cfg)
    assert summary.ok == 4, summary.rows
    return out


@pytest.fixture(scope="session")
def tok(prep: Path):
    """A WordPiece tokenizer fitted on the cohort's reports."""
    from fvlm.model.tokenizer import train_wordpiece
    from pipelines.cases.format import corpus_texts

    return train_wordpiece(corpus_texts(prep), vocab_size=400, max_length=32)
