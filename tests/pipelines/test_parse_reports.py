"""``fvlm parse-reports`` end to end: a slice of the real CT-RATE file, bad rows, a missing column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipelines.cli import main

CT_RATE = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct-rate" / "train.csv"


@pytest.mark.skipif(not CT_RATE.is_file(), reason=f"CT-RATE sample {CT_RATE} is absent (shared data not mounted)")
def test_cli_on_ct_rate_slice(tmp_path: Path) -> None:
    with open(CT_RATE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:40]
    table = tmp_path / "slice.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out" / "labels.csv"
    assert main(["parse-reports", str(table), "--preset", "ct-rate", "--id-column", "AccessionNo",
                 "--text-column", "report_text", "--output", str(out)]) == 0
    got = {r["AccessionNo"]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    truth = {r["AccessionNo"]: r for r in rows}
    # the first report is normal; the second has pleural effusion, consolidation, medical material
    assert all(got["train_1"][k] == "0" for k in truth["train_1"] if k not in ("AccessionNo", "report_text"))
    for label in ("Pleural effusion", "Consolidation", "Medical material", "Interlobular septal thickening"):
        assert got["train_2"][label] == truth["train_2"][label] == "1", label
    labels = [k for k in rows[0] if k not in ("AccessionNo", "report_text")]
    agree = sum(got[i][k] == truth[i][k] for i in truth for k in labels) / (len(truth) * len(labels))
    assert agree > 0.95
    recs = [json.loads(line) for line in open(out.with_suffix(".jsonl"), encoding="utf-8")]
    assert len(recs) == 40 and set(recs[0]["anatomies"]) == {"lung", "heart", "esophagus", "aorta"}


def test_bad_rows_and_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.csv"
    body = ("id,text\n1,Bilateral pleural effusion.\n2,\n3,\"<br>No nodule.&nbsp;\"\n4,\"" + "x" * 100_000
            + "\"\n").encode() + b"5,Hiatal hernia \xff is seen.\n"
    table.write_bytes(body)
    out = tmp_path / "o.csv"
    assert main(["parse-reports", str(table), "--preset", "fvlm15", "--id-column", "id", "--text-column", "text",
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["Pleural effusion"] == "1" and rows[1]["error"]
    assert rows[4]["Hiatal hernia"] == "1"
    assert main(["parse-reports", str(table), "--preset", "fvlm15", "--id-column", "id", "--text-column", "report",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no column 'report'" in err and "id, text" in err


@pytest.mark.slow  # makes a small synthetic cohort and parses its reports
def test_synthetic_reports_agree(tmp_path: Path) -> None:
    """The synthetic grammar is ours: the parser recovers the fvlm54 labels of a small cohort."""
    assert main(["synth", str(tmp_path / "synth"), "--cases", "20", "--seed", "1"]) == 0
    out = tmp_path / "labels.csv"
    assert main(["parse-reports", str(tmp_path / "synth" / "reports.csv"), "--preset", "fvlm15", "--id-column",
                 "case_id", "--findings-column", "findings", "--impression-column", "impression",
                 "--output", str(out)]) == 0
    from anatomy.catalog import load_task_catalog

    tasks = load_task_catalog("fvlm54").tasks
    truth = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "synth" / "labels.csv", encoding="utf-8"))}
    got = {r["case_id"]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    tp = fp = fn = 0
    for cid, t in truth.items():
        for task in tasks:
            y, yh = t[task.name] == "1", got[cid][task.title] == "1"
            tp, fp, fn = tp + (y and yh), fp + (yh and not y), fn + (y and not yh)
    assert 2 * tp / (2 * tp + fp + fn) > 0.9
