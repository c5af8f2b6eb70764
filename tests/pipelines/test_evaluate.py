"""``fvlm evaluate`` end to end on a tiny synthetic cohort with an untrained tiny model (issue 6, items 1-3)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, Path]:
    from fvlm.model import create_model, save_pretrained, train_wordpiece
    from pipelines.cli import main
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from pipelines.train.data import corpus_texts, read_run
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    root = tmp_path_factory.mktemp("evalcohort")
    make_cohort(root / "synth", SynthConfig(cases=8, seed=1, format="nifti", normal_share=0.25))
    synth = root / "synth"
    assert main(["preprocess", str(synth / "images"), str(root / "prep"), "--masks", str(synth / "segmentations"),
                 "--reports", str(synth / "reports.csv"), "--labels", str(synth / "labels.csv"),
                 "--config", str(fast_config(root)), "--case-id", "key", "--no-progress"]) == 0
    prep = root / "prep"
    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    names = tuple(read_run(prep)["anatomies"][str(i)] for i in range(1, 16))
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)})
    save_pretrained(model, tok, root / "model")
    return prep, root / "model", synth / "labels.csv"


def _run(args: list[str]) -> int:
    from pipelines.cli import main

    return main(["evaluate", *args])


def test_evaluate_writes_all_four_outputs(cohort, tmp_path: Path) -> None:
    prep, model, _ = cohort
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--threshold-split", "0.3", "--n-boot", "1000",
                 "--min-positives", "1", "--output", str(out)]) == 0
    for name in ("metrics.csv", "metrics.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 54 and {"auc", "auc_ci_low", "n_pos", "n_neg", "validation_accuracy",
                                "optimistic_accuracy", "flag"} <= set(rows[0])
    doc = json.loads((out / "metrics.json").read_text())
    assert "auc" in doc["macro"] and "lung" in doc["per_anatomy"]
    assert doc["info"]["labels"]["kind"] == "ground_truth" and doc["info"]["n_boot"] == 1000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    low = html.lower()
    assert "http" not in low and "<link" not in low and "<script" not in low and "url(" not in low


def test_labels_table_with_missing_cases_is_reported_as_partial(cohort, tmp_path: Path) -> None:
    prep, model, labels = cohort
    rows = list(csv.DictReader(open(labels)))
    cols = [c for c in rows[0] if c != "lung_mass"]
    part = tmp_path / "labels.csv"
    with open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[1:])
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--labels", str(part), "--n-boot", "50", "--output", str(out)]) == 0
    info = json.loads((out / "metrics.json").read_text())["info"]["labels"]
    assert info["missing_cases"] == [rows[0]["case_id"]] and info["missing_tasks"] == ["lung_mass"]
    assert "partial coverage" in (out / "report.md").read_text()


def test_clear_errors(cohort, tmp_path: Path, capsys) -> None:
    prep, model, _ = cohort
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["--checkpoint", str(model), "--data", str(empty), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    assert "index" in capsys.readouterr().err
    assert _run(["--checkpoint", str(tmp_path), "--data", str(prep), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
