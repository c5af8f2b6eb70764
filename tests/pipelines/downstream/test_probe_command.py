"""``fvlm probe`` on synthetic exports: a planted linear signal is recovered at every label fraction, noise stays
at chance, label fractions are reproducible per seed, and the outputs follow ``fvlm evaluate``'s formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.evaluate.probe import draw_fraction, fit_probe
from tests.pipelines.downstream.synthetic import write_export


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    write_export(root / "train", 400, seed=0)
    write_export(root / "test", 300, seed=1, prefix="t")
    return root / "train", root / "test"


@pytest.mark.slow  # fits a probe per fraction and seed
def test_probe_recovers_a_planted_signal_at_every_fraction(exports, tmp_path: Path) -> None:
    train, test = exports
    out = tmp_path / "out"
    assert main(["probe", "--embeddings", str(train), "--eval-embeddings", str(test), "--tasks", "fvlm54",
                 "--fractions", "0.05,0.25,1.0", "--seeds", "2", "--folds", "3", "--n-boot", "50",
                 "--min-positives", "5", "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["included"] == ["lung_nodule", "emphysema"]  # the other tasks have no labels
    for key in ("0.05", "0.25", "1"):
        block = doc["fractions"][key]
        signal, noise = block["tasks"]["lung_nodule"], block["tasks"]["emphysema"]
        assert signal["auc"] > 0.75 and signal["ci_low"] <= signal["auc"] <= signal["ci_high"]
        assert abs(noise["auc"] - 0.5) < 0.12
        assert len(signal["seed_aucs"]) == 2 and block["macro"]["n_tasks"] == 2
        assert set(block["per_anatomy"]) == {"lung"}
    n_pos = [doc["fractions"][k]["tasks"]["lung_nodule"]["n_train_pos"] for k in ("0.05", "0.25", "1")]
    assert n_pos[0] < n_pos[1] < n_pos[2]  # the fractions really draw fewer labels
    aucs = [doc["fractions"][k]["tasks"]["lung_nodule"]["auc"] for k in ("0.05", "0.25", "1")]
    assert aucs[0] < aucs[2] and aucs[2] > 0.95  # more labels, a better probe; all of them: near perfect
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 3 * 54
    assert {"fraction", "task", "auc", "ci_low", "ci_high", "auc_seed0", "auc_seed1"} <= set(rows[0])
    md = (out / "report.md").read_text()
    assert "## Macro AUC by label fraction" in md and "| 0.05 |" in md
    assert "<table>" in (out / "report.html").read_text()


def test_label_fractions_are_reproducible_per_seed_and_keep_both_classes() -> None:
    y = np.array([1] * 30 + [0] * 270)
    a, b = draw_fraction(y, 0.01, seed=3, task="t"), draw_fraction(y, 0.01, seed=3, task="t")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, draw_fraction(y, 0.01, seed=4, task="t"))
    assert not np.array_equal(a, draw_fraction(y, 0.01, seed=3, task="other"))
    assert (y[a] == 1).sum() == 2 and (y[a] == 0).sum() == 3  # min 2 positives; round(2.7) negatives
    c = draw_fraction(y, 0.1, seed=0, task="t")
    assert (y[c] == 1).sum() == 3 and (y[c] == 0).sum() == 27
    np.testing.assert_array_equal(draw_fraction(y, 1.0, seed=0, task="t"), np.arange(300))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        draw_fraction(y, 0.0, seed=0, task="t")


def test_fit_probe_fraction_draws_per_seed(exports) -> None:
    """fit_probe with a fraction: the same seed gives the same fit, another seed another draw; folds shrink."""
    from pipelines.downstream.store import read_embeddings, read_labels
    from anatomy.catalog import load_task_catalog

    train, _ = exports
    emb = read_embeddings(train)
    tasks = [load_task_catalog("fvlm54")["lung_nodule"]]
    y, _ = read_labels(train, emb["case_ids"], tasks)
    a = fit_probe(emb, y, [0], ["lung_nodule"], folds=5, seed=0, fraction=0.02, min_folds=2)[0]
    b = fit_probe(emb, y, [0], ["lung_nodule"], folds=5, seed=0, fraction=0.02, min_folds=2)[0]
    c = fit_probe(emb, y, [0], ["lung_nodule"], folds=5, seed=1, fraction=0.02, min_folds=2)[0]
    assert a.reason is None and a.fraction == 0.02 and 2 <= a.folds < 5
    np.testing.assert_array_equal(a.estimator[-1].coef_, b.estimator[-1].coef_)
    assert not np.array_equal(a.estimator[-1].coef_, c.estimator[-1].coef_)
    assert a.n_pos + a.n_neg < 20


def test_probe_refuses_exports_of_different_models(exports, tmp_path: Path, capsys) -> None:
    train, _ = exports
    write_export(tmp_path / "other", 50, seed=2, model_sha="m1")
    assert main(["probe", "--embeddings", str(train), "--eval-embeddings", str(tmp_path / "other"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["probe", "--embeddings", str(tmp_path / "missing"), "--eval-embeddings", str(train),
                 "--output", str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "--embeddings", str(train), "--eval-embeddings", str(train), "--fractions", "0,1",
              "--output", str(tmp_path / "out")])
