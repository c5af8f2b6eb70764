"""Confidence calibration check (issue 22, ``fvlm.calibration``): informative confidences are detected,
uninformative and inverted ones are not, and the evaluation's arrays map to pairs as documented."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm.calibration import confidence_check, correct_predictions, task_confidence_check


def test_an_informative_confidence_is_higher_on_right_pairs() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.7
    conf = np.where(correct, rng.uniform(0.5, 1.0, 400), rng.uniform(0.0, 0.6, 400))
    out = confidence_check(conf, correct.astype(float), bins=4, n_boot=200)
    assert out.n == 400 and out.n_correct == int(correct.sum()) and out.accuracy == pytest.approx(correct.mean())
    assert out.discrimination > 0.9 and out.ci_low > 0.8 and out.mean_gap > 0.3
    assert [b.n for b in out.bins] == [100] * 4 and out.accuracy_gap > 0.5
    accs = [b.accuracy for b in out.bins]
    assert accs == sorted(accs)  # the reliability table rises
    assert all(b.low <= b.mean_confidence <= b.high for b in out.bins)
    json_ready = out.to_dict()
    assert json_ready["bins"][0]["n"] == 100


def test_an_uninformative_or_inverted_confidence_is_seen_as_such() -> None:
    rng = np.random.default_rng(1)
    correct = (rng.random(600) < 0.6).astype(float)
    noise = confidence_check(rng.random(600), correct, n_boot=200)
    assert abs(noise.discrimination - 0.5) < 0.08 and noise.ci_low < 0.5 < noise.ci_high
    inverted = confidence_check(1.0 - correct * 0.5 + rng.normal(0, 0.01, 600), correct, n_boot=0)
    assert inverted.discrimination < 0.05 and inverted.mean_gap < 0 and inverted.ci_low is None


def test_missing_pairs_are_left_out_and_degenerate_inputs_say_why() -> None:
    out = confidence_check(np.array([0.9, np.nan, 0.1, 0.5]), np.array([1.0, 1.0, np.nan, 0.0]), n_boot=0)
    assert out.n == 2 and out.discrimination == 1.0
    one = confidence_check(np.array([0.2, 0.3]), np.array([1.0, 1.0]), n_boot=0)
    assert one.discrimination is None and "one class" in one.reason and one.mean_gap is None
    empty = confidence_check(np.array([np.nan]), np.array([1.0]))
    assert empty.n == 0 and empty.reason
    with pytest.raises(ValueError, match="same shape"):
        confidence_check(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="bins"):
        confidence_check(np.zeros(3), np.zeros(3), bins=0)


def test_pairs_from_an_evaluation() -> None:
    """Scores (N, T), labels (N, T), per-anatomy confidence (N, A): a pair is right when the thresholded score
    equals the label; its confidence is its anatomy's; whole-study tasks and missing pairs are left out."""
    scores = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.4], [0.6, np.nan, 0.3]])
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=float)
    correct, thr = correct_predictions(scores, labels, thresholds=[0.5, 0.5, 0.5])
    np.testing.assert_array_equal(correct, [[1, 1, 1], [1, 0, 1], [0, np.nan, 0]])
    conf = np.array([[0.9, 0.8], [0.7, 0.2], [0.1, np.nan]])  # (N, A=2)
    out = task_confidence_check(scores, labels, conf, anatomy_index=[0, 1, -1], thresholds=[0.5, 0.5, 0.5],
                                n_boot=0)
    # pairs: task 0 (anatomy 0): conf .9 right, .7 right, .1 wrong; task 1 (anatomy 1): .8 right, .2 wrong
    assert out.n == 5 and out.n_correct == 3
    assert out.mean_confidence_correct == pytest.approx((0.9 + 0.7 + 0.8) / 3)
    assert out.mean_confidence_wrong == pytest.approx((0.1 + 0.2) / 2) and out.discrimination == 1.0
    # default thresholds: the closest-to-corner rule per task (one-class tasks have none)
    _, thr = correct_predictions(scores, labels)
    assert np.isfinite(thr[0]) and np.isnan(thr[1]) and np.isfinite(thr[2])  # task 1: one labelled class
    with pytest.raises(ValueError, match="anatomy_index"):
        task_confidence_check(scores, labels, conf, anatomy_index=[0, 2, -1])
