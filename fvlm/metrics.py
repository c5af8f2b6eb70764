"""Zero-shot evaluation metrics (issue 6, item 2): AUC with a bootstrap interval, thresholded metrics at a
validation-chosen threshold and at the reference's same-set ("optimistic") threshold, macro summaries.

A pure library: numpy arrays in, dataclasses and plain dicts out. No file I/O, no torch; ``fvlm evaluate``
does the reading, the scoring and the writing.

Conventions (shared by every function here)
-------------------------------------------
* ``y_true`` holds 0/1 (or booleans); ``NaN`` marks a case whose label is unknown. ``y_score`` holds real
  scores (higher = more likely positive); ``NaN`` marks a case the model did not score. A case missing
  either is **missing**: it is excluded from every metric of that task and counted in ``n_missing``. It is
  never filled with 0 (the reference evaluator does, which ranks an unscored positive below every
  negative). Infinite scores are rejected.
* A case is predicted positive when ``score >= threshold`` (the convention of
  ``sklearn.metrics.roc_curve``, whose thresholds are score values).
* Bootstrap: cases are resampled with replacement, ``n`` out of ``n``, with
  ``numpy.random.default_rng(seed)``; the same ``seed`` and inputs give the same interval on every machine.
  A resample that lacks one of the two classes (for the macro AUC: in any task) has no AUC; it is
  **redrawn** (the next draw from the same generator is taken), so the interval is the percentile interval
  of ``n_boot`` valid resamples, i.e. of the bootstrap distribution conditioned on both classes being
  present. The number of redrawn resamples is reported. Draws stop after ``100 * n_boot`` attempts; if
  fewer than ``n_boot`` valid resamples were found by then, the interval uses those found and the result
  says so (``n_boot_valid < n_boot``), and there is no interval when fewer than 2 were found.
* Percentile interval: ``[q(alpha/2), q(1 - alpha/2)]`` of the bootstrap AUCs, ``numpy.quantile`` with
  linear interpolation.

AUC
---
``AUC = P(S+ > S-) + 0.5 P(S+ = S-)`` over all positive/negative pairs, i.e. the area under the
trapezoidal ROC curve (``sklearn.metrics.roc_auc_score``, used for every point estimate). For the
bootstrap, a resample is a vector of case counts ``w`` and

    AUC(w) = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j]) / (sum_{i pos} w_i * sum_{j neg} w_j)

which is exactly ``roc_auc_score`` on the resampled (repeated) cases, computed for many resamples at once
from one sort of the scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

__all__ = [
    "AucResult",
    "MacroAucResult",
    "TaskMetrics",
    "ThresholdMetrics",
    "auc_with_ci",
    "closest_to_corner_threshold",
    "evaluate_task",
    "macro_auc_with_ci",
    "macro_summary",
    "paired_macro_auc_difference",
    "split_validation",
    "threshold_metrics",
]

#: the threshold metrics averaged by :func:`macro_summary`
THRESHOLD_METRIC_NAMES = ("accuracy", "f1_weighted", "precision", "sensitivity", "specificity")
#: redraws stop after this many attempts per requested resample
_MAX_DRAWS_PER_RESAMPLE = 100
#: bound on the (resamples x cases) count matrix held at once
_CHUNK_CELLS = 2_000_000


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AucResult:
    """ROC AUC of one task with its percentile bootstrap interval."""

    auc: float | None  #: ROC AUC over the non-missing cases; None when undefined (see ``reason``)
    ci_low: float | None  #: lower bound of the ``1 - alpha`` percentile bootstrap interval
    ci_high: float | None  #: upper bound of the interval
    n_pos: int  #: positive cases with a score
    n_neg: int  #: negative cases with a score
    n_missing: int  #: cases excluded because their score or label is NaN
    n_boot: int  #: resamples requested
    n_boot_valid: int  #: resamples used for the interval (both classes present)
    n_boot_redrawn: int  #: resamples drawn with one class only, discarded and redrawn
    alpha: float  #: 1 - confidence level of the interval
    seed: int  #: seed of the bootstrap generator
    reason: str | None = None  #: why ``auc`` or the interval is None, else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MacroAucResult:
    """Macro (unweighted mean over tasks) AUC; its bootstrap resamples cases for all tasks jointly."""

    auc: float | None  #: mean of the per-task AUCs, each over that task's non-missing cases
    ci_low: float | None  #: lower bound of the percentile bootstrap interval of the macro AUC
    ci_high: float | None  #: upper bound of the interval
    task_aucs: tuple[float | None, ...]  #: per-task AUC, in column order
    n_tasks: int  #: tasks (columns) averaged
    n_cases: int  #: cases (rows) resampled
    n_boot: int  #: resamples requested
    n_boot_valid: int  #: resamples used (every task had both classes)
    n_boot_redrawn: int  #: resamples discarded because some task had one class only
    alpha: float  #: 1 - confidence level
    seed: int  #: seed of the bootstrap generator
    task_names: tuple[str, ...] | None = None  #: column names, when given
    reason: str | None = None  #: why ``auc`` or the interval is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ThresholdMetrics:
    """Binary metrics of one task at one threshold (predicted positive when ``score >= threshold``)."""

    threshold: float  #: the decision threshold
    rule: str  #: how it was chosen, e.g. "closest_to_corner:validation" or "closest_to_corner:same_set"
    optimistic: bool  #: True when the threshold was chosen on the very cases it is evaluated on
    accuracy: float  #: (TP + TN) / n
    f1_weighted: float  #: F1 per class averaged with class-support weights (sklearn average="weighted")
    precision: float | None  #: TP / (TP + FP); None when nothing is predicted positive
    sensitivity: float | None  #: recall, TP / (TP + FN); None without positives
    specificity: float | None  #: TN / (TN + FP); None without negatives
    tp: int  #: true positives
    fp: int  #: false positives
    tn: int  #: true negatives
    fn: int  #: false negatives
    n_missing: int  #: cases excluded because their score or label is NaN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskMetrics:
    """Everything reported for one diagnosis task on the evaluation split."""

    auc: AucResult  #: AUC with its interval (evaluation split)
    validation: ThresholdMetrics | None  #: metrics at the threshold chosen on the validation split
    optimistic: ThresholdMetrics | None  #: metrics at the same-set threshold (the reference's; optimistic)
    n_pos: int  #: positives with a score on the evaluation split
    n_neg: int  #: negatives with a score on the evaluation split
    n_missing: int  #: evaluation cases without a score or label
    flag: str | None  #: "no_cases", "single_class", "too_few_positives", "too_few_negatives", or None
    val_n_pos: int | None = None  #: positives with a score on the validation split (None: no split)
    val_n_neg: int | None = None  #: negatives with a score on the validation split
    val_n_missing: int | None = None  #: validation cases without a score or label
    notes: tuple[str, ...] = field(default_factory=tuple)  #: why a part is missing, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- inputs


def _clean(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate one task's labels and scores; return the non-missing (labels as bool, scores, n_missing)."""
    y = np.asarray(y_true, dtype=float).reshape(-1)
    s = np.asarray(y_score, dtype=float).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} cases but y_score has {s.size}")
    if np.isinf(s).any():
        raise ValueError("y_score contains infinite values (use NaN for a case without a score)")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        bad = np.unique(y[known][~np.isin(y[known], (0.0, 1.0))])[:5]
        raise ValueError(f"y_true must be 0/1 (NaN for unknown), found {bad.tolist()}")
    keep = known & ~np.isnan(s)
    return y[keep] == 1.0, s[keep], int(keep.size - keep.sum())


def _clean_matrix(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) labels as float (NaN unknown) and scores (NaN missing), validated."""
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(scores, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} must be (cases, tasks) arrays of one shape")
    for t in range(y.shape[1]):
        _clean(y[:, t], s[:, t])  # validation only
    return y, s


# --------------------------------------------------------------------------------------------- bootstrap


class _TaskRanks:
    """One task's non-missing cases sorted by score, grouped into tie levels, for the weighted AUC."""

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        keep = ~(np.isnan(y) | np.isnan(s))
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(s[idx], kind="mergesort")]
        ss = s[order]
        self.order = order  # case indices (rows), ascending score
        self.pos = (y[order] == 1.0).astype(float)
        self.neg = 1.0 - self.pos
        self.starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if ss.size else np.zeros(0, int)

    def auc(self, counts: np.ndarray) -> np.ndarray:
        """AUC for each row of ``counts`` (B, N case weights); NaN where a class has zero weight."""
        if self.order.size == 0:
            return np.full(counts.shape[0], np.nan)
        c = counts[:, self.order]
        p = np.add.reduceat(c * self.pos, self.starts, axis=1)  # positive weight per tie level
        n = np.add.reduceat(c * self.neg, self.starts, axis=1)  # negative weight per tie level
        below = np.cumsum(n, axis=1) - n  # negative weight strictly below each level
        num = (p * (below + 0.5 * n)).sum(axis=1)
        den = p.sum(axis=1) * n.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _bootstrap_macro(
    y: np.ndarray, s: np.ndarray, n_boot: int, seed: int
) -> tuple[np.ndarray, int]:
    """Bootstrap macro AUCs over the rows of (N, T) arrays; returns (valid AUCs, number redrawn)."""
    n_cases = y.shape[0]
    tasks = [_TaskRanks(y[:, t], s[:, t]) for t in range(y.shape[1])]
    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(1024, _CHUNK_CELLS // max(n_cases, 1))))
    found: list[np.ndarray] = []
    n_found = n_drawn = 0
    max_draws = _MAX_DRAWS_PER_RESAMPLE * n_boot
    while n_found < n_boot and n_drawn < max_draws:
        b = min(chunk, max_draws - n_drawn)
        idx = rng.integers(0, n_cases, size=(b, n_cases))
        counts = np.bincount(
            (idx + (np.arange(b) * n_cases)[:, None]).ravel(), minlength=b * n_cases
        ).reshape(b, n_cases).astype(float)
        aucs = np.stack([t.auc(counts) for t in tasks], axis=1)  # (b, T)
        ok = ~np.isnan(aucs).any(axis=1)
        macro = aucs[ok].mean(axis=1)
        take = macro[: n_boot - n_found]
        # resamples drawn up to (and including) the last one taken; the rest of the chunk is unused
        used = b if take.size == macro.size else int(np.flatnonzero(ok)[take.size - 1]) + 1
        found.append(take)
        n_found += take.size
        n_drawn += used
    vals = np.concatenate(found) if found else np.zeros(0)
    return vals, n_drawn - vals.size


def _percentile_ci(vals: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    if vals.size < 2:
        return None, None
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --------------------------------------------------------------------------------------------- AUC


def _bootstrap_interval(
    y: np.ndarray, s: np.ndarray, n_boot: int, seed: int, alpha: float, scope: str
) -> tuple[float | None, float | None, dict]:
    """Percentile interval of the macro AUC over (N, T) labels/scores, with the resample counts and the
    reason an interval is short of resamples or absent (``scope`` completes "had both classes ...")."""
    vals, redrawn = _bootstrap_macro(y, s, n_boot, seed)
    lo, hi = _percentile_ci(vals, alpha)
    reason = None
    if vals.size < n_boot:
        reason = f"only {vals.size} of {n_boot} resamples had both classes{scope}"
        if lo is None:
            reason += ": no interval"
    return lo, hi, {"n_boot_valid": int(vals.size), "n_boot_redrawn": int(redrawn), "reason": reason}


def auc_with_ci(
    y_true: ArrayLike, y_score: ArrayLike, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> AucResult:
    """ROC AUC of one task and its ``1 - alpha`` percentile bootstrap interval over cases.

    ``auc = roc_auc_score(y, s)`` over the cases with both a label and a score (NaN = missing, excluded and
    counted in ``n_missing``). Resamples: ``n`` of the ``n`` non-missing cases with replacement,
    ``numpy.random.default_rng(seed)``; a resample with one class only is redrawn (module docstring).
    A task with one class only (or no case) has ``auc=None`` and no interval, with a ``reason``.
    """
    _check_boot_args(n_boot, alpha)
    yb, s, n_missing = _clean(y_true, y_score)
    n_pos, n_neg = int(yb.sum()), int((~yb).sum())
    common = dict(n_pos=n_pos, n_neg=n_neg, n_missing=n_missing, n_boot=n_boot, alpha=alpha, seed=seed)
    if n_pos == 0 or n_neg == 0:
        what = "no case with a label and a score" if n_pos + n_neg == 0 else (
            f"one class only ({n_pos} positives, {n_neg} negatives): AUC undefined"
        )
        return AucResult(None, None, None, n_boot_valid=0, n_boot_redrawn=0, reason=what, **common)
    auc = float(roc_auc_score(yb, s))
    if n_boot == 0:
        return AucResult(
            auc, None, None, n_boot_valid=0, n_boot_redrawn=0, reason="n_boot=0: no interval", **common
        )
    lo, hi, interval = _bootstrap_interval(yb.astype(float)[:, None], s[:, None], n_boot, seed, alpha, "")
    return AucResult(auc, lo, hi, **interval, **common)


def macro_auc_with_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    task_names: Sequence[str] | None = None,
) -> MacroAucResult:
    """Macro AUC over the T columns of (N cases, T tasks) arrays, with a joint bootstrap interval.

    ``macro = (1/T) sum_t AUC_t`` where ``AUC_t`` is the AUC of column ``t`` over its non-missing rows
    (NaN label or score = missing for that task only). The interval resamples *rows* (cases), the same
    rows for every task, so the correlation between tasks measured on the same scans is kept; each
    resample's macro is the mean of the T weighted AUCs (module docstring). A resample in which any task
    has one class only is redrawn. Same seed semantics as :func:`auc_with_ci`; for one column, the
    interval equals :func:`auc_with_ci`'s when no case is missing.
    """
    _check_boot_args(n_boot, alpha)
    y, s = _clean_matrix(y_true, scores)
    n_cases, n_tasks = y.shape
    names = tuple(task_names) if task_names is not None else None
    if names is not None and len(names) != n_tasks:
        raise ValueError(f"{len(names)} task names for {n_tasks} columns")
    task_aucs: list[float | None] = []
    bad: list[str] = []
    for t in range(n_tasks):
        yb, st, _ = _clean(y[:, t], s[:, t])
        if yb.all() or not yb.any():
            task_aucs.append(None)
            bad.append(names[t] if names else str(t))
        else:
            task_aucs.append(float(roc_auc_score(yb, st)))
    common = dict(
        task_aucs=tuple(task_aucs), n_tasks=n_tasks, n_cases=n_cases, n_boot=n_boot, alpha=alpha,
        seed=seed, task_names=names,
    )
    if n_tasks == 0:
        return MacroAucResult(None, None, None, n_boot_valid=0, n_boot_redrawn=0, reason="no task", **common)
    if bad:
        reason = f"AUC undefined (one class only) for task(s) {', '.join(bad)}: no macro AUC"
        return MacroAucResult(None, None, None, n_boot_valid=0, n_boot_redrawn=0, reason=reason, **common)
    macro = float(np.mean(task_aucs))
    if n_boot == 0:
        return MacroAucResult(
            macro, None, None, n_boot_valid=0, n_boot_redrawn=0, reason="n_boot=0: no interval", **common
        )
    lo, hi, interval = _bootstrap_interval(y, s, n_boot, seed, alpha, " in every task")
    return MacroAucResult(macro, lo, hi, **interval, **common)


def paired_macro_auc_difference(
    y_true: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Macro AUC of model A minus model B on the same cases, with a paired bootstrap interval.

    ``delta = macro(A) - macro(B)``, each macro as :func:`macro_auc_with_ci` over the T columns of
    (N cases, T tasks) arrays. Every resample draws one set of case counts ``w`` and scores both models on
    it, ``delta(w) = (1/T) sum_t [AUC_t^A(w) - AUC_t^B(w)]``, so the correlation between two models scored on
    the same scans is kept and the interval is much narrower than the two marginal intervals suggest. A
    resample in which any task has one class only is redrawn (module docstring). ``p_le_zero`` is the share
    of valid resamples with ``delta(w) <= 0`` (a one-sided bootstrap p-value for "A better than B").

    Returns ``{"delta", "ci_low", "ci_high", "p_le_zero", "macro_a", "macro_b", "n_tasks", "n_cases",
    "n_boot", "n_boot_valid", "alpha", "seed", "reason"}``.
    """
    _check_boot_args(n_boot, alpha)
    y, sa = _clean_matrix(y_true, scores_a)
    _, sb = _clean_matrix(y_true, scores_b)
    a = macro_auc_with_ci(y, sa, n_boot=0)
    b = macro_auc_with_ci(y, sb, n_boot=0)
    out: dict[str, Any] = {"delta": None, "ci_low": None, "ci_high": None, "p_le_zero": None, "macro_a": a.auc,
                           "macro_b": b.auc, "n_tasks": y.shape[1], "n_cases": y.shape[0], "n_boot": n_boot,
                           "n_boot_valid": 0, "alpha": alpha, "seed": seed, "reason": a.reason or b.reason}
    if a.auc is None or b.auc is None:
        return out
    out["delta"] = a.auc - b.auc
    if n_boot == 0:
        out["reason"] = "n_boot=0: no interval"
        return out
    # both models' scores side by side: the first T columns are A, the last T are B, same case counts
    ranks = [_TaskRanks(y[:, t], sa[:, t]) for t in range(y.shape[1])] + \
            [_TaskRanks(y[:, t], sb[:, t]) for t in range(y.shape[1])]
    rng = np.random.default_rng(seed)
    n_cases, n_tasks = y.shape
    found: list[np.ndarray] = []
    n_found = n_drawn = 0
    chunk = int(max(1, min(1024, _CHUNK_CELLS // max(n_cases, 1))))
    while n_found < n_boot and n_drawn < _MAX_DRAWS_PER_RESAMPLE * n_boot:
        idx = rng.integers(0, n_cases, size=(chunk, n_cases))
        counts = np.bincount((idx + (np.arange(chunk) * n_cases)[:, None]).ravel(),
                             minlength=chunk * n_cases).reshape(chunk, n_cases).astype(float)
        aucs = np.stack([r.auc(counts) for r in ranks], axis=1)  # (chunk, 2T)
        ok = ~np.isnan(aucs).any(axis=1)
        d = aucs[ok, :n_tasks].mean(axis=1) - aucs[ok, n_tasks:].mean(axis=1)
        found.append(d[: n_boot - n_found])
        n_found += found[-1].size
        n_drawn += chunk
    vals = np.concatenate(found) if found else np.zeros(0)
    out["n_boot_valid"] = int(vals.size)
    out["ci_low"], out["ci_high"] = _percentile_ci(vals, alpha)
    out["p_le_zero"] = float((vals <= 0).mean()) if vals.size else None
    if vals.size < n_boot:
        out["reason"] = f"only {vals.size} of {n_boot} resamples had both classes in every task"
    return out


# --------------------------------------------------------------------------------------------- thresholds


def closest_to_corner_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The threshold whose ROC point is closest to the corner (FPR, TPR) = (0, 1): the reference's rule.

    ``argmin_t FPR(t)^2 + (1 - TPR(t))^2`` over the thresholds of ``roc_curve(..., drop_intermediate=False)``
    (every distinct score; predicted positive when ``score >= t``). The sentinel threshold ``+inf`` (nothing
    positive) is not a candidate. On a tie (within 1e-12) the highest threshold wins (the fewest positive
    calls). Missing cases (NaN) are excluded. Raises ``ValueError`` when the cases hold one class only.
    """
    yb, s, _ = _clean(y_true, y_score)
    if yb.all() or not yb.any():
        raise ValueError(
            "closest-to-corner threshold needs both classes "
            f"({int(yb.sum())} positives, {int((~yb).sum())} negatives)"
        )
    fpr, tpr, thr = roc_curve(yb, s, drop_intermediate=False)
    finite = np.isfinite(thr)
    dist = fpr[finite] ** 2 + (1.0 - tpr[finite]) ** 2
    # ties up to rounding (e.g. (1 - 2/3)^2 vs (1/3)^2) count as ties: the first, highest threshold wins
    best = int(np.flatnonzero(dist <= dist.min() + 1e-12)[0])
    return float(thr[finite][best])


def threshold_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float,
    *,
    rule: str = "given",
    optimistic: bool = False,
) -> ThresholdMetrics:
    """Accuracy, weighted F1, precision, sensitivity, specificity and the confusion counts at ``threshold``.

    Predicted positive when ``score >= threshold``; missing cases (NaN) are excluded and counted.
    ``accuracy = (TP+TN)/n``; ``precision = TP/(TP+FP)``; ``sensitivity = TP/(TP+FN)``;
    ``specificity = TN/(TN+FP)`` (None when the denominator is 0);
    ``f1_weighted = (n_pos F1_pos + n_neg F1_neg) / n`` with ``F1_c`` the F1 of class ``c`` taken as the
    positive class (``sklearn.metrics.f1_score(average="weighted", zero_division=0)``, as CT-CLIP).
    """
    yb, s, n_missing = _clean(y_true, y_score)
    if yb.size == 0:
        raise ValueError("no case with a label and a score")
    pred = s >= threshold
    tp = int((pred & yb).sum())
    fp = int((pred & ~yb).sum())
    tn = int((~pred & ~yb).sum())
    fn = int((~pred & yb).sum())
    f1 = float(f1_score(yb, pred, average="weighted", labels=[False, True], zero_division=0))
    return ThresholdMetrics(
        threshold=float(threshold),
        rule=rule,
        optimistic=optimistic,
        accuracy=(tp + tn) / yb.size,
        f1_weighted=f1,
        precision=tp / (tp + fp) if tp + fp else None,
        sensitivity=tp / (tp + fn) if tp + fn else None,
        specificity=tn / (tn + fp) if tn + fp else None,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        n_missing=n_missing,
    )


# --------------------------------------------------------------------------------------------- one task


def evaluate_task(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    val_true: ArrayLike | None = None,
    val_score: ArrayLike | None = None,
    min_positives: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> TaskMetrics:
    """All metrics of one task on the evaluation split.

    * ``auc``: :func:`auc_with_ci` on the evaluation cases.
    * ``validation``: the closest-to-corner threshold chosen on ``(val_true, val_score)`` and applied to the
      evaluation cases (``rule="closest_to_corner:validation"``); None, with a note, when no validation
      split is given or it lacks a class.
    * ``optimistic``: the same rule applied to the evaluation cases themselves (the reference's practice;
      ``optimistic=True``), biased upwards because the threshold is fitted to the data it scores.
    * ``flag``: ``"no_cases"`` (nothing scored), ``"single_class"``, ``"too_few_positives"`` or
      ``"too_few_negatives"`` (fewer than ``min_positives`` of that class), else None. Flagged tasks are
      still fully reported but left out of :func:`macro_summary`'s means.
    """
    if (val_true is None) != (val_score is None):
        raise ValueError("give both val_true and val_score, or neither")
    auc = auc_with_ci(y_true, y_score, n_boot=n_boot, seed=seed, alpha=alpha)
    notes: list[str] = []
    n_pos, n_neg = auc.n_pos, auc.n_neg
    if n_pos + n_neg == 0:
        flag: str | None = "no_cases"
    elif n_pos == 0 or n_neg == 0:
        flag = "single_class"
    elif n_pos < min_positives:
        flag = "too_few_positives"
    elif n_neg < min_positives:
        flag = "too_few_negatives"
    else:
        flag = None
    if flag is not None:
        notes.append(f"{flag}: {n_pos} positives, {n_neg} negatives (minimum {min_positives} of each)")
    if auc.reason:
        notes.append(f"auc: {auc.reason}")

    optimistic = None
    if n_pos and n_neg:
        t = closest_to_corner_threshold(y_true, y_score)
        optimistic = threshold_metrics(y_true, y_score, t, rule="closest_to_corner:same_set", optimistic=True)
    else:
        notes.append("optimistic: no same-set threshold (one class only)")

    validation = None
    val_counts: dict[str, int | None] = dict(val_n_pos=None, val_n_neg=None, val_n_missing=None)
    if val_true is None:
        notes.append("validation: no validation split given")
    else:
        vy, _, v_missing = _clean(val_true, val_score)
        val_counts = dict(val_n_pos=int(vy.sum()), val_n_neg=int((~vy).sum()), val_n_missing=v_missing)
        if not vy.any() or vy.all():
            notes.append(
                f"validation: no threshold, the validation split has one class only "
                f"({val_counts['val_n_pos']} positives, {val_counts['val_n_neg']} negatives)"
            )
        elif n_pos + n_neg == 0:
            notes.append("validation: no evaluation case to apply the threshold to")
        else:
            t = closest_to_corner_threshold(val_true, val_score)
            validation = threshold_metrics(y_true, y_score, t, rule="closest_to_corner:validation")
    return TaskMetrics(
        auc=auc,
        validation=validation,
        optimistic=optimistic,
        n_pos=n_pos,
        n_neg=n_neg,
        n_missing=auc.n_missing,
        flag=flag,
        notes=tuple(notes),
        **val_counts,
    )


# --------------------------------------------------------------------------------------------- macro


def _mean_block(results: Mapping[str, TaskMetrics], names: list[str]) -> dict[str, Any]:
    """Means over ``names`` (already filtered) of the AUC and of each threshold metric."""
    aucs = [results[n].auc.auc for n in names]
    block: dict[str, Any] = {
        "n_tasks": len(names),
        "tasks": list(names),
        "auc": float(np.mean(aucs)) if aucs else None,
    }
    for kind in ("validation", "optimistic"):
        sub: dict[str, Any] = {}
        have = [n for n in names if getattr(results[n], kind) is not None]
        sub["n_tasks"] = len(have)
        sub["tasks_without"] = [n for n in names if n not in have]
        undefined: dict[str, list[str]] = {}
        for metric in THRESHOLD_METRIC_NAMES:
            vals = [(n, getattr(getattr(results[n], kind), metric)) for n in have]
            defined = [v for _, v in vals if v is not None]
            sub[metric] = float(np.mean(defined)) if defined else None
            missing = [n for n, v in vals if v is None]
            if missing:
                undefined[metric] = missing
        sub["undefined"] = undefined  # metric -> tasks where it is undefined (left out of that mean)
        block[kind] = sub
    return block


def macro_summary(
    results: Mapping[str, TaskMetrics],
    groups: Mapping[str, str] | None = None,
    *,
    y_true: Mapping[str, ArrayLike] | None = None,
    scores: Mapping[str, ArrayLike] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Macro (unweighted mean over tasks) AUC and threshold metrics, overall and per group (anatomy).

    A task enters the means when it has no ``flag`` and an AUC; the others are listed under ``excluded``
    with the reason. Each threshold metric is averaged over the included tasks that have it (tasks without
    a validation threshold, or where e.g. precision is undefined, are listed, not counted as 0).

    When ``y_true`` and ``scores`` (task -> per-case array, every task over the same cases in the same
    order, NaN = missing) are given, ``auc_ci`` holds :func:`macro_auc_with_ci` over the included tasks,
    resampling cases jointly; per group likewise. Without them there is no macro interval.

    Returns a JSON-ready dict::

        {"n_tasks", "included": [...], "excluded": {task: reason},
         "macro": {"n_tasks", "tasks", "auc", "auc_ci": {...} | None,
                   "validation": {"n_tasks", "tasks_without", "accuracy", ..., "undefined"},
                   "optimistic": {...}},
         "groups": {group: {"included", "excluded", "macro": {...}}}}
    """
    if (y_true is None) != (scores is None):
        raise ValueError("give both y_true and scores, or neither")
    excluded: dict[str, str] = {}
    for name, r in results.items():
        if r.flag is not None:
            excluded[name] = f"{r.flag} ({r.n_pos} positives, {r.n_neg} negatives)"
        elif r.auc.auc is None:
            excluded[name] = f"no AUC: {r.auc.reason}"
    included = [n for n in results if n not in excluded]

    if groups is not None:
        ungrouped = [n for n in results if n not in groups]
        if ungrouped:
            raise ValueError(f"tasks without a group: {', '.join(ungrouped)}")

    def ci(names: list[str]) -> dict[str, Any] | None:
        if y_true is None or not names:
            return None
        lacking = [n for n in names if n not in y_true or n not in scores]
        if lacking:
            raise ValueError(f"no per-case labels or scores for task(s) {', '.join(lacking)}")
        ym = np.column_stack([np.asarray(y_true[n], dtype=float) for n in names])
        sm = np.column_stack([np.asarray(scores[n], dtype=float) for n in names])
        return macro_auc_with_ci(ym, sm, n_boot=n_boot, seed=seed, alpha=alpha, task_names=names).to_dict()

    def block(names: list[str]) -> dict[str, Any]:
        b = _mean_block(results, names)
        b["auc_ci"] = ci(names)
        return b

    out: dict[str, Any] = {
        "n_tasks": len(results),
        "included": included,
        "excluded": excluded,
        "macro": block(included),
    }
    if groups is not None:
        per: dict[str, Any] = {}
        for g in dict.fromkeys(groups[n] for n in results):
            members = [n for n in results if groups[n] == g]
            inc = [n for n in members if n in included]
            per[g] = {
                "included": inc,
                "excluded": {n: excluded[n] for n in members if n in excluded},
                "macro": block(inc),
            }
        out["groups"] = per
    return out


# --------------------------------------------------------------------------------------------- split


def split_validation(case_ids: Sequence[str], fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask, True for the cases put in the validation split (used to choose thresholds).

    Case ``c`` goes to validation when ``u(c) < fraction`` with
    ``u(c) = int(sha256(f"{seed}:{c}")[:8 bytes], big-endian) / 2**64``, uniform on [0, 1). The decision
    depends only on the id, the seed and the fraction: stable across runs, machines and Python versions,
    independent of the order (and number) of the other ids; repeated ids land on the same side. The
    validation share is ``fraction`` in expectation, not exactly. Pass a patient id per case (repeated for
    scans of one patient) to keep a patient's scans on one side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    ids = list(case_ids)
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{c}".encode("utf-8")).digest()[:8], "big") / 2.0**64
            for c in ids
        ],
        dtype=float,
    )
    return u < fraction if ids else np.zeros(0, dtype=bool)
