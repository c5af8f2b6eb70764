"""``fvlm retrieve`` on synthetic exports: identical image/text pairs give recall@1 = 1 at both levels, unrelated
ones stay near chance, the readout picks the embeddings, and chance levels are printed beside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.downstream.retrieve import case_level, retrieve
from tests.pipelines.downstream.synthetic import write_export


def test_identical_pairs_give_recall_at_1_of_one(tmp_path: Path, capsys) -> None:
    write_export(tmp_path / "emb", 60, seed=0, text_noise=0.0)
    out = tmp_path / "out"
    assert main(["retrieve", "--embeddings", str(tmp_path / "emb"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R@1 (chance)" in printed and "1.000 (0.017)" in printed  # chance 1/60 beside the value
    res = json.loads((out / "retrieval.json").read_text())
    for d in ("image->report", "report->image"):
        assert res["case"][d]["recall@1"] == 1.0 and res["case"][d]["median_rank"] == 1.0
        assert res["anatomy"]["mean"][d]["recall@1"] == 1.0
    assert res["anatomy"]["mean"]["n_anatomies"] == 15 and res["case"]["readout"] == "anatomy"
    assert (out / "retrieval.csv").is_file() and "## Case level" in (out / "report.md").read_text()


def test_unrelated_pairs_are_near_chance_and_the_global_readout_reads_the_whole_scan(tmp_path: Path) -> None:
    write_export(tmp_path / "emb", 80, seed=1, text_noise=50.0)
    res = retrieve(tmp_path / "emb")
    m = res["case"]["image->report"]
    assert abs(m["recall@10"] - m["chance_recall@10"]) < 0.15 and m["chance_median_rank"] == 40
    # report_emb equals global_image_emb in the synthetic export: perfect with the whole-scan readout
    g = retrieve(tmp_path / "emb", readout="global")
    assert g["case"]["image->report"]["recall@1"] == 1.0 and g["anatomy"]["note"].startswith("global readout")


def test_identical_report_texts_are_all_correct_answers(tmp_path: Path) -> None:
    arrays = write_export(tmp_path / "emb", 10, seed=2)
    from pipelines.downstream.store import read_embeddings

    emb = read_embeddings(tmp_path / "emb")
    emb["text_group"][:, :] = 0  # every case has the same texts ...
    images, reports, groups, keep = case_level(emb, "anatomy")
    assert keep.all() and len(set(groups)) == 1  # ... so any report is right
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-6)
    assert arrays["image_emb"].shape == (10, 15, 16)


def test_too_few_cases_is_a_clear_error(tmp_path: Path, capsys) -> None:
    write_export(tmp_path / "emb", 1, seed=3)
    assert main(["retrieve", "--embeddings", str(tmp_path / "emb")]) == 2
    assert "retrieval needs at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["retrieve", "--embeddings", str(tmp_path / "emb"), "--ks", "0"])


def test_image_to_report_ranks_distinct_reports_and_its_chance_is_reachable() -> None:
    """Six normal cases share one text, four have their own: image -> report ranks the 5 distinct reports
    (chance recall@1 = 1/5, not the 0.6 + 0.4/10 of a shuffle that splits the identical copies apart); report
    -> image still ranks all 10 images."""
    from pipelines.downstream.retrieve import both_directions

    rng = np.random.default_rng(0)
    texts = rng.normal(size=(5, 8))
    groups = [0] * 6 + [1, 2, 3, 4]
    reports = texts[groups]  # identical texts embed identically
    images = reports + 0.01 * rng.normal(size=reports.shape)
    out = both_directions(images, reports, groups, ks=(1,))
    i2r, r2i = out["image->report"], out["report->image"]
    assert i2r["n_gallery"] == 5 and i2r["chance_recall@1"] == pytest.approx(0.2)
    assert i2r["recall@1"] == 1.0  # each image's own text is the nearest distinct report
    assert r2i["n_gallery"] == 10 and r2i["chance_recall@1"] == pytest.approx(0.6 * 6 / 10 + 0.4 * 1 / 10)
