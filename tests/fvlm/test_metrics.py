"""fvlm.metrics: hand-computed AUCs, thresholds and counts, against scikit-learn where it applies; bootstrap
intervals reproducible with their seed; missing scores excluded (never 0); flagged tasks out of the macro."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from fvlm.metrics import (
    paired_macro_auc_difference,
    _TaskRanks,
    auc_with_ci,
    closest_to_corner_threshold,
    evaluate_task,
    macro_auc_with_ci,
    macro_summary,
    split_validation,
    threshold_metrics,
)

# 3 positives, 3 negatives, one inversion (the positive at 0.3 is below the negative at 0.4): AUC 8/9
Y6 = [0, 0, 1, 0, 1, 1]
S6 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
# 3 positives, 4 negatives: positive 0.4 beats 3 of 4 negatives, 0.6 and 0.7 beat all 4: AUC 11/12.
# ROC (threshold: FPR, TPR, squared distance to (0,1)):
#   .7: 0, 1/3, .444 | .6: 0, 2/3, .111 | .5: 1/4, 2/3, .174 | .4: 1/4, 1, .0625 | .3: 1/2, 1, .25 | ...
Y7 = [0, 0, 0, 1, 0, 1, 1]
S7 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def _synthetic(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    return y, rng.normal(size=n) + shift * y


# ----------------------------------------------------------------------------------------------- AUC


def test_auc_hand_example() -> None:
    r = auc_with_ci(Y6, S6, n_boot=200)
    assert r.auc == pytest.approx(8 / 9)
    assert (r.n_pos, r.n_neg, r.n_missing) == (3, 3, 0)
    assert auc_with_ci(Y7, S7, n_boot=0).auc == pytest.approx(11 / 12)


def test_auc_ties_count_half() -> None:
    # positive 0.5 ties the negative 0.5 and beats 0.1: (1 + 0.5) / 2
    assert auc_with_ci([0, 0, 1], [0.1, 0.5, 0.5], n_boot=0).auc == pytest.approx(0.75)


def test_auc_matches_sklearn_on_fixed_scores() -> None:
    y, s = _synthetic(200, seed=3)
    s = np.round(s, 1)  # plenty of ties
    assert auc_with_ci(y, s, n_boot=0).auc == pytest.approx(roc_auc_score(y, s))


def test_weighted_auc_equals_sklearn_on_the_resampled_cases() -> None:
    """The vectorised bootstrap AUC is roc_auc_score on the repeated cases, ties included."""
    y, s = _synthetic(80, seed=4)
    s = np.round(s, 1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, y.size, size=(5, y.size))
    counts = np.stack([np.bincount(i, minlength=y.size) for i in idx]).astype(float)
    got = _TaskRanks(y, s).auc(counts)
    want = [roc_auc_score(y[i], s[i]) for i in idx]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_ci_contains_auc_and_narrows_with_more_data() -> None:
    small = auc_with_ci(*_synthetic(40, seed=1), n_boot=1000, seed=0)
    large = auc_with_ci(*_synthetic(2000, seed=1), n_boot=1000, seed=0)
    for r in (small, large):
        assert r.ci_low < r.auc < r.ci_high
        assert r.n_boot_valid == 1000
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)


def test_ci_reproducible_with_seed() -> None:
    y, s = _synthetic(60, seed=2)
    a = auc_with_ci(y, s, seed=7)
    b = auc_with_ci(y, s, seed=7)
    c = auc_with_ci(y, s, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.auc == c.auc  # the point estimate does not depend on the seed


def test_single_class_resamples_are_redrawn_and_counted() -> None:
    # 1 positive among 6 cases: (5/6)^6 = 33% of resamples have no positive
    r = auc_with_ci([0, 0, 0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.6, 0.5], n_boot=500, seed=0)
    assert r.n_boot_valid == 500
    assert 100 < r.n_boot_redrawn < 400
    assert r.reason is None


def test_missing_scores_excluded_and_counted_not_zero() -> None:
    y = Y6 + [1]
    s = S6 + [np.nan]  # an unscored positive
    r = auc_with_ci(y, s, n_boot=100)
    assert r.auc == pytest.approx(8 / 9)
    assert (r.n_pos, r.n_neg, r.n_missing) == (3, 3, 1)
    # the reference's fill-with-0 would rank that positive below every negative: 8/12, not 8/9
    filled = roc_auc_score(y, np.nan_to_num(np.asarray(s), nan=0.0))
    assert filled == pytest.approx(8 / 12)
    assert filled != pytest.approx(r.auc)
    # an unknown label is missing too
    assert auc_with_ci(Y6 + [np.nan], S6 + [0.9], n_boot=0).n_missing == 1


def test_single_class_task_has_no_auc_and_says_why() -> None:
    r = auc_with_ci([1, 1, 1], [0.2, 0.5, 0.9], n_boot=100)
    assert r.auc is None and r.ci_low is None and r.ci_high is None
    assert "one class" in r.reason
    assert auc_with_ci([np.nan, 1], [0.1, np.nan]).reason.startswith("no case")


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="0/1"):
        auc_with_ci([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="infinite"):
        auc_with_ci([0, 1], [0.1, np.inf])
    with pytest.raises(ValueError, match="cases"):
        auc_with_ci([0, 1, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------------------------- thresholds


def test_closest_to_corner_threshold_on_hand_roc() -> None:
    assert closest_to_corner_threshold(Y7, S7) == pytest.approx(0.4)
    # Y6: (FPR, TPR) at .5 is (0, 2/3) and at .3 is (1/3, 1): a tie at 1/9, the higher threshold wins
    assert closest_to_corner_threshold(Y6, S6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        closest_to_corner_threshold([0, 0], [0.1, 0.2])


def test_threshold_metrics_hand_counted() -> None:
    # at 0.5: predicted positive .5 (neg), .6, .7 (pos) -> TP 2, FP 1, TN 3, FN 1
    m = threshold_metrics(Y7, S7, 0.5)
    assert (m.tp, m.fp, m.tn, m.fn) == (2, 1, 3, 1)
    assert m.accuracy == pytest.approx(5 / 7)
    assert m.precision == pytest.approx(2 / 3)
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(3 / 4)
    # F1(pos) = 2/3, F1(neg) = 3/4 (precision 3/4, recall 3/4); weighted (3 * 2/3 + 4 * 3/4) / 7 = 5/7
    assert m.f1_weighted == pytest.approx(5 / 7)
    pred = np.asarray(S7) >= 0.5
    assert m.f1_weighted == pytest.approx(f1_score(Y7, pred, average="weighted"))
    assert m.accuracy == pytest.approx(accuracy_score(Y7, pred))
    assert m.precision == pytest.approx(precision_score(Y7, pred))
    assert m.sensitivity == pytest.approx(recall_score(Y7, pred))


def test_threshold_metrics_undefined_is_none_and_missing_counted() -> None:
    m = threshold_metrics(Y7 + [1], S7 + [np.nan], 0.99)  # nothing predicted positive
    assert m.precision is None
    assert (m.tp, m.fp, m.tn, m.fn, m.n_missing) == (0, 0, 4, 3, 1)


def test_validation_threshold_applied_to_the_evaluation_split() -> None:
    # validation ROC: .8 -> (0, 1/2), .7 -> (0, 1): threshold 0.7; the same-set one on Y7 is 0.4
    vy, vs = [0, 0, 0, 1, 1], [0.2, 0.5, 0.6, 0.7, 0.8]
    r = evaluate_task(Y7, S7, val_true=vy, val_score=vs, min_positives=3, n_boot=100)
    assert r.validation.threshold == pytest.approx(0.7)
    assert r.optimistic.threshold == pytest.approx(0.4)
    assert r.optimistic.optimistic and not r.validation.optimistic
    # at 0.7 on the evaluation cases: only .7 is called positive -> TP 1, FP 0, TN 4, FN 2
    v = r.validation
    assert (v.tp, v.fp, v.tn, v.fn) == (1, 0, 4, 2)
    assert v.sensitivity == pytest.approx(1 / 3) and v.specificity == 1.0
    assert v.accuracy == pytest.approx(5 / 7)
    # at 0.4 (optimistic): TP 3, FP 1, TN 3, FN 0
    o = r.optimistic
    assert (o.tp, o.fp, o.tn, o.fn) == (3, 1, 3, 0)
    assert (r.val_n_pos, r.val_n_neg, r.val_n_missing) == (2, 3, 0)
    assert r.flag is None


def test_evaluate_task_without_validation_and_flags() -> None:
    r = evaluate_task(Y7, S7, n_boot=50)  # default min_positives=10
    assert r.flag == "too_few_positives"
    assert r.validation is None and any("no validation split" in n for n in r.notes)
    assert r.optimistic is not None and r.auc.auc == pytest.approx(11 / 12)
    assert evaluate_task([1, 1, 0], [0.1, 0.2, 0.3], min_positives=2, n_boot=10).flag == "too_few_negatives"
    single = evaluate_task([1, 1], [0.1, 0.2], min_positives=1, n_boot=10)
    assert single.flag == "single_class" and single.auc.auc is None and single.optimistic is None


# ----------------------------------------------------------------------------------------------- macro


def _cohort() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    n = 120
    out = {}
    for t, (rate, shift) in enumerate([(0.4, 1.5), (0.3, 1.0), (0.5, 0.5), (0.03, 1.0)]):
        y = (rng.random(n) < rate).astype(float)
        s = rng.normal(size=n) + shift * y
        if t == 1:
            s[:7] = np.nan  # some cases unscored for this task only
        out[f"task{t}"] = (y, s)
    return out


def test_macro_summary_leaves_flagged_tasks_out_and_says_why() -> None:
    data = _cohort()
    val = {k: (y[:40], s[:40]) for k, (y, s) in data.items()}
    test = {k: (y[40:], s[40:]) for k, (y, s) in data.items()}
    results = {
        k: evaluate_task(*test[k], val_true=val[k][0], val_score=val[k][1], min_positives=5, n_boot=200)
        for k in data
    }
    assert results["task3"].flag == "too_few_positives"
    groups = {"task0": "lung", "task1": "lung", "task2": "heart", "task3": "heart"}
    summary = macro_summary(
        results,
        groups,
        y_true={k: v[0] for k, v in test.items()},
        scores={k: v[1] for k, v in test.items()},
        n_boot=300,
        seed=5,
    )
    json.dumps(summary)  # JSON-ready
    assert summary["included"] == ["task0", "task1", "task2"]
    assert list(summary["excluded"]) == ["task3"] and "too_few_positives" in summary["excluded"]["task3"]
    macro = summary["macro"]
    assert macro["auc"] == pytest.approx(np.mean([results[k].auc.auc for k in ("task0", "task1", "task2")]))
    for kind in ("validation", "optimistic"):
        for metric in ("accuracy", "f1_weighted", "sensitivity", "specificity"):
            want = np.mean([getattr(getattr(results[k], kind), metric) for k in ("task0", "task1", "task2")])
            assert macro[kind][metric] == pytest.approx(want)
    ci = macro["auc_ci"]
    assert ci["auc"] == pytest.approx(macro["auc"])
    assert ci["ci_low"] < macro["auc"] < ci["ci_high"]
    assert ci["task_names"] == ("task0", "task1", "task2")
    heart = summary["groups"]["heart"]
    assert heart["included"] == ["task2"] and list(heart["excluded"]) == ["task3"]
    assert heart["macro"]["auc"] == pytest.approx(results["task2"].auc.auc)
    assert summary["groups"]["lung"]["macro"]["n_tasks"] == 2


def test_macro_summary_rejects_ungrouped_tasks() -> None:
    r = evaluate_task(Y7, S7, min_positives=1, n_boot=10)
    with pytest.raises(ValueError, match="without a group"):
        macro_summary({"a": r, "b": r}, {"a": "lung"})


def test_macro_auc_ci_deterministic_and_joint() -> None:
    data = _cohort()
    names = ["task0", "task1", "task2"]
    ym = np.column_stack([data[k][0] for k in names])
    sm = np.column_stack([data[k][1] for k in names])
    a = macro_auc_with_ci(ym, sm, n_boot=400, seed=3)
    b = macro_auc_with_ci(ym, sm, n_boot=400, seed=3)
    c = macro_auc_with_ci(ym, sm, n_boot=400, seed=4)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    per_task = [auc_with_ci(data[k][0], data[k][1], n_boot=0).auc for k in names]
    assert a.auc == pytest.approx(np.mean(per_task))
    assert a.task_aucs == pytest.approx(tuple(per_task))
    # one column, nothing missing: the same interval as the single-task bootstrap with the same seed
    one = macro_auc_with_ci(ym[:, :1], sm[:, :1], n_boot=400, seed=3)
    single = auc_with_ci(ym[:, 0], sm[:, 0], n_boot=400, seed=3)
    assert (one.ci_low, one.ci_high) == (single.ci_low, single.ci_high)
    # a single-class column: no macro, named
    bad = macro_auc_with_ci(np.column_stack([ym[:, 0], np.ones(len(ym))]), sm[:, :2], task_names=["x", "y"])
    assert bad.auc is None and "y" in bad.reason


# ----------------------------------------------------------------------------------------------- split


def test_split_validation_stable_under_shuffling() -> None:
    ids = [f"case_{i:05d}" for i in range(5000)]
    mask = split_validation(ids, fraction=0.2, seed=0)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    by_id = dict(zip(shuffled, split_validation(shuffled, fraction=0.2, seed=0)))
    assert all(by_id[c] == m for c, m in zip(ids, mask))
    assert 0.18 < mask.mean() < 0.22
    # a subset keeps its assignment; another seed gives another split
    np.testing.assert_array_equal(split_validation(ids[:100]), mask[:100])
    assert (split_validation(ids, seed=1) != mask).any()


def test_split_validation_pinned_values() -> None:
    """The hash rule must not change silently: splits recorded in papers have to stay reproducible."""
    mask = split_validation([f"case_{i:03d}" for i in range(20)], fraction=0.2, seed=0)
    assert np.flatnonzero(mask).tolist() == [0, 11, 12]


def test_paired_difference_equals_macro_difference_and_its_bootstrap() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random((80, 3)) < 0.3).astype(float)
    good = y + rng.normal(0, 0.6, y.shape)  # informative
    noise = rng.normal(0, 1, y.shape)  # chance
    d = paired_macro_auc_difference(y, good, noise, n_boot=300, seed=1)
    a = np.mean([roc_auc_score(y[:, t], good[:, t]) for t in range(3)])
    b = np.mean([roc_auc_score(y[:, t], noise[:, t]) for t in range(3)])
    assert d["delta"] == pytest.approx(a - b) and d["macro_a"] == pytest.approx(a) and d["macro_b"] == pytest.approx(b)
    assert d["ci_low"] < d["delta"] < d["ci_high"] and d["ci_low"] > 0  # clearly better on these cases
    assert d["p_le_zero"] == 0.0 and d["n_boot_valid"] == 300
    assert paired_macro_auc_difference(y, good, noise, n_boot=300, seed=1) == d  # seeded
    # paired: narrower than the difference of the two marginal intervals would suggest
    ma, mb = macro_auc_with_ci(y, good, n_boot=300, seed=1), macro_auc_with_ci(y, noise, n_boot=300, seed=1)
    assert d["ci_high"] - d["ci_low"] < (ma.ci_high - ma.ci_low) + (mb.ci_high - mb.ci_low)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random((40, 2)) < 0.4).astype(float)
    s = rng.random((40, 2))
    d = paired_macro_auc_difference(y, s, s.copy(), n_boot=100, seed=0)
    assert d["delta"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0 and d["p_le_zero"] == 1.0


def test_paired_difference_without_auc_says_why() -> None:
    y = np.zeros((10, 1))
    d = paired_macro_auc_difference(y, np.random.rand(10, 1), np.random.rand(10, 1), n_boot=10)
    assert d["delta"] is None and "one class" in d["reason"]
    with pytest.raises(ValueError):
        paired_macro_auc_difference(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((5, 2)))
