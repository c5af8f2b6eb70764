"""Clear messages for the lower items of issue 17: latin-1 report tables (14), preprocess failures with their
reasons (16), an invalid --set blamed on the --set (16), training data without reports (11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main


def test_parse_reports_warns_about_a_wrong_encoding_and_reads_the_right_one(tmp_path: Path, capsys) -> None:
    table = tmp_path / "reports.csv"
    table.write_bytes("id,text\nr1,Hypodense l\xe9sion in the liver.\nr2,No pleural effusion.\n".encode("latin-1"))
    out = tmp_path / "labels.csv"
    args = ["parse-reports", str(table), "--preset", "fvlm15", "--id-column", "id", "--text-column", "text",
            "--output", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 row(s) are not valid utf-8 (first: row 1)" in err and "--table-encoding" in err
    assert main([*args, "--table-encoding", "latin-1"]) == 0
    assert "not valid" not in capsys.readouterr().err
    assert "l\xe9sion" in out.with_suffix(".jsonl").read_text(encoding="utf-8")
    assert main([*args, "--table-encoding", "klingon"]) == 2
    assert "unknown encoding" in capsys.readouterr().err


def test_preprocess_of_an_empty_folder_prints_the_reason(tmp_path: Path, capsys) -> None:
    empty, masks = tmp_path / "empty", tmp_path / "masks"
    empty.mkdir()
    masks.mkdir()
    assert main(["preprocess", str(empty), str(tmp_path / "out"), "--masks", str(masks), "--no-progress"]) == 1
    assert "failed: (no case id): the input holds no DICOM or NIfTI series" in capsys.readouterr().err


def test_an_invalid_set_is_blamed_on_the_set(tmp_path: Path, capsys) -> None:
    (tmp_path / "prep").mkdir()
    assert main(["train", "--config", "tiny", "--data", str(tmp_path / "prep"), "--output", str(tmp_path / "run"),
                 "--set", "logging.every=2", "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "--set optim.lr=-1: optim.lr" in err and "tiny.yaml" not in err


@pytest.mark.slow
def test_training_on_cases_without_reports_names_data_and_the_cause(tmp_path: Path) -> None:
    from tests.pipelines.preprocess.preprocess_fixtures import cohort, fast_config
    from tests.pipelines.train.run_fixtures import train_tiny

    synth = cohort(tmp_path / "synth", cases=3, fmt="nifti")
    prep = tmp_path / "prep"
    assert main(["preprocess", str(synth / "images"), str(prep), "--masks", str(synth / "segmentations"),
                 "--config", str(fast_config(tmp_path)), "--case-id", "key", "--no-progress"]) == 0
    proc = train_tiny("tiny", prep, tmp_path / "run", steps=1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--data {prep}: its cases hold no report text" in proc.stderr and "--reports" in proc.stderr
