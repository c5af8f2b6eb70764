"""The linear-probe ceiling (``pipelines.evaluate.probe``, issue #15 item 5) on synthetic embeddings, and the
evaluation readout (``pipelines.evaluate.readout``, issue #15: whole-scan recipes read from the global
embedding). The end-to-end ``fvlm evaluate --probe-data`` path is in ``test_evaluate.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fvlm.metrics import auc_with_ci
from pipelines.evaluate.probe import C_GRID, fit_linear_probe, fit_probe, probe_scores, task_features


def _cohort(n: int, seed: int, a: int = 3, d: int = 16, masked: float = 0.0) -> tuple[dict, np.ndarray]:
    """Embeddings with a planted signal: task 0 is linear in anatomy 0's embedding, task 1 pure noise (anatomy
    1), task 2 (whole study) linear in the global embedding. Labels (n, 3)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, a, d)).astype(np.float32)  # (N, A, D)
    glob = rng.normal(size=(n, d)).astype(np.float32)  # (N, D)
    w = np.linspace(1.0, -1.0, d)  # the same direction in every cohort
    mask = rng.random((n, a)) >= masked  # (N, A)
    y = np.stack([(image[:, 0] @ w > 0.3), rng.random(n) < 0.3, (glob @ w < 0.0)], axis=1).astype(float)
    emb = {"case_ids": [f"c{i}" for i in range(n)], "image_emb": image, "anatomy_mask": mask,
           "global_image_emb": glob, "view": "dataset"}
    return emb, y


ROWS, NAMES = [0, 1, -1], ["signal", "noise", "whole"]


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    keep = np.isfinite(s)
    return auc_with_ci(y[keep], s[keep], n_boot=0).auc


@pytest.mark.slow  # fits probes on a few hundred synthetic cases
def test_probe_recovers_a_planted_linear_signal_and_not_noise() -> None:
    train, y_train = _cohort(300, seed=0)
    test, y_test = _cohort(300, seed=1)
    fits = fit_probe(train, y_train, ROWS, NAMES, folds=5, seed=0)
    assert [f.task for f in fits] == NAMES and all(f.reason is None for f in fits)
    assert [f.features for f in fits] == ["anatomy", "anatomy", "global"]
    assert all(f.C in C_GRID and set(f.cv_aucs) == {f"{c:g}" for c in C_GRID} for f in fits)
    s = probe_scores(fits, test)
    assert s.shape == (300, 3) and np.isfinite(s).all()
    assert _auc(y_test[:, 0], s[:, 0]) > 0.95  # the anatomy's own embedding carries the signal
    assert _auc(y_test[:, 2], s[:, 2]) > 0.95  # the whole-study task reads the global embedding
    assert abs(_auc(y_test[:, 1], s[:, 1]) - 0.5) < 0.1  # noise: chance
    assert fits[0].cv_auc > 0.9 and fits[1].cv_auc < 0.65


@pytest.mark.slow  # fits probes on a few hundred synthetic cases
def test_fit_is_deterministic_and_sees_only_the_training_side() -> None:
    """C and the weights depend on the training cases alone: refitting gives identical models, and the
    held-out labels (shuffled here) change the AUC, never the scores."""
    train, y_train = _cohort(120, seed=2)
    test, y_test = _cohort(80, seed=3)
    a = fit_probe(train, y_train, ROWS, NAMES, folds=3, seed=0)
    b = fit_probe(train, y_train.copy(), ROWS, NAMES, folds=3, seed=0)
    for fa, fb in zip(a, b):
        assert fa.C == fb.C and fa.cv_aucs == fb.cv_aucs
        np.testing.assert_array_equal(fa.estimator[-1].coef_, fb.estimator[-1].coef_)
    s = probe_scores(a, test)
    shuffled = np.random.default_rng(0).permutation(y_test)
    np.testing.assert_array_equal(s, probe_scores(b, test))
    assert _auc(y_test[:, 0], s[:, 0]) != _auc(shuffled[:, 0], s[:, 0])
    # the folds are the training cases': a cross-validated C from other folds may differ, the API is seeded
    c = fit_probe(train, y_train, ROWS, NAMES, folds=3, seed=1)
    assert all(f.C in C_GRID for f in c)


def test_masked_anatomies_are_left_out_of_the_fit_and_nan_in_the_scores() -> None:
    train, y_train = _cohort(200, seed=4, masked=0.3)
    y_train[:10, 0] = np.nan  # unknown labels are left out too
    test, _ = _cohort(100, seed=5, masked=0.3)
    fits = fit_probe(train, y_train, ROWS, NAMES, folds=3)
    used = train["anatomy_mask"][:, 0] & np.isfinite(y_train[:, 0])
    assert fits[0].n_pos + fits[0].n_neg == int(used.sum())
    assert fits[2].n_pos + fits[2].n_neg == 200  # whole study: every case
    s = probe_scores(fits, test)
    np.testing.assert_array_equal(np.isnan(s[:, 0]), ~test["anatomy_mask"][:, 0])
    np.testing.assert_array_equal(np.isnan(s[:, 1]), ~test["anatomy_mask"][:, 1])
    assert np.isfinite(s[:, 2]).all()


def test_global_readout_uses_the_global_embedding_on_the_anatomy_cases() -> None:
    emb, _ = _cohort(20, seed=6, masked=0.4)
    x, present = task_features(emb, 1, "global")
    assert x is emb["global_image_emb"]
    np.testing.assert_array_equal(present, emb["anatomy_mask"][:, 1])
    x, present = task_features(emb, 1, "anatomy")
    np.testing.assert_array_equal(x, emb["image_emb"][:, 1])
    train, y_train = _cohort(150, seed=7)
    y_train[:, 1] = y_train[:, 2]  # an anatomy task whose label lives in the global embedding
    fits = fit_probe(train, y_train, ROWS, NAMES, readout="global", folds=3)
    assert [f.features for f in fits] == ["global"] * 3 and fits[1].cv_auc > 0.9


def test_tasks_with_too_few_training_cases_are_skipped_with_the_reason() -> None:
    train, y_train = _cohort(60, seed=8)
    y_train[:, 1] = 0
    y_train[:3, 1] = 1  # 3 positives: fewer than 5 folds
    train["anatomy_mask"][:, 0] = False  # the anatomy is never present
    fits = fit_probe(train, y_train, ROWS, NAMES, folds=5)
    assert fits[0].reason == "no training case with this anatomy and a label" and fits[0].estimator is None
    assert "3 positives" in fits[1].reason and "5-fold" in fits[1].reason and fits[1].estimator is None
    assert fits[2].reason is None
    s = probe_scores(fits, _cohort(10, seed=9)[0])
    assert np.isnan(s[:, :2]).all() and np.isfinite(s[:, 2]).all()
    assert "estimator" not in fits[0].to_dict() and fits[1].to_dict()["n_pos"] == 3


@pytest.mark.parametrize("kwargs, words", [
    ({"folds": 1}, "folds"), ({"cs": []}, "C grid"), ({"cs": [0.0]}, "C grid")])
def test_fit_linear_probe_rejects_bad_settings(kwargs: dict, words: str) -> None:
    x, y = np.zeros((10, 2)), np.array([0, 1] * 5)
    with pytest.raises(ValueError, match=words):
        fit_linear_probe(x, y, **kwargs)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_linear_probe(x, np.arange(10))


def test_fit_probe_rejects_labels_of_another_shape() -> None:
    emb, y = _cohort(10, seed=10)
    with pytest.raises(ValueError, match="labels must be"):
        fit_probe(emb, y[:5], ROWS, NAMES)


# ------------------------------------------------------------------------------------------------ readout


@pytest.mark.parametrize("recipe, expected", [("clip", "global"), ("fvlm-disease", "anatomy"), ("fvlm", "anatomy"),
                                              ("fvlm-region", "anatomy"), ("fvlm-entity", "anatomy")])
def test_readout_auto_is_global_for_whole_scan_recipes_only(tmp_path: Path, recipe: str, expected: str) -> None:
    from pipelines.config.recipe import load_recipe
    from pipelines.evaluate.readout import resolve_readout

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_recipe(recipe).to_dict()))
    r = resolve_readout(tmp_path)
    assert r["readout"] == expected and r["source"].startswith("auto: recipe config.yaml")
    assert resolve_readout(tmp_path, "anatomy") == {"readout": "anatomy", "source": "command line"}


def test_readout_of_a_bare_export_and_bad_values(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipelines.evaluate.readout import recipe_readout, resolve_readout

    assert resolve_readout(tmp_path)["readout"] == "anatomy"
    assert resolve_readout(tmp_path, "global")["readout"] == "global"
    with pytest.raises(ValueError, match="--readout"):
        resolve_readout(tmp_path, "scan")
    spec = lambda name, weight=1.0: SimpleNamespace(name=name, weight=weight, options={})  # noqa: E731
    assert recipe_readout([spec("clip_global"), spec("entity_mlm")])[0] == "global"  # auxiliary: does not decide
    assert recipe_readout([spec("clip_global"), spec("disease_aware", 0.0)])[0] == "global"  # weight 0: no term
    assert recipe_readout([spec("clip_global"), spec("anatomy_contrastive")])[0] == "anatomy"
    assert recipe_readout([spec("entity_mlm")])[0] == "anatomy"
