"""Is a reported confidence worth anything? A check of the uncertainty head's confidence against correctness
(issue 22, item 3): is the confidence higher on the cases the model scores right?

The ``uncertainty`` head reports per anatomy ``c = 1 / (1 + vbar / v_0)`` (``fvlm predict``). Under the
2-Wasserstein similarity the variances also act as extra coordinates, so nothing guarantees that ``c`` means
"more likely right"; this module measures it on labelled cases. A library: arrays in, numbers out.

For each scored (case i, task t) pair with a label ``y_it`` and a zero-shot score ``s_it``::

    correct_it = [s_it >= theta_t] == y_it        theta_t: the task's threshold (default: the ROC point
                                                   closest to (0, 1), the evaluation's rule)
    c_it       = confidence of case i's anatomy of task t

and over all pairs (whole-study tasks have no anatomy confidence and are left out)::

    discrimination  AUROC(correct, c)       P(c of a right pair > c of a wrong pair); 0.5: uninformative,
                                             with a percentile bootstrap interval over pairs
    mean_gap        mean(c | right) - mean(c | wrong)
    bins            pairs split into ``bins`` equal-count confidence bins (quantiles): per bin the confidence
                    range, the pair count, the accuracy and the mean confidence (a reliability table: the
                    accuracy should rise with the confidence)
    accuracy_gap    accuracy of the most confident bin minus that of the least confident

``confidence_check`` takes the per-pair arrays; ``task_confidence_check`` builds them from (N, T) scores and
labels, (N, A) anatomy confidences and the tasks' anatomy rows, as ``fvlm evaluate`` and the benchmarks hold
them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from fvlm.metrics import auc_with_ci, closest_to_corner_threshold

__all__ = ["ConfidenceBin", "ConfidenceCheck", "correct_predictions", "confidence_check", "task_confidence_check"]


@dataclass(frozen=True)
class ConfidenceBin:
    """One equal-count confidence bin."""

    low: float  #: lowest confidence in the bin
    high: float  #: highest confidence in the bin
    n: int  #: pairs in the bin
    accuracy: float  #: share of right pairs
    mean_confidence: float


@dataclass(frozen=True)
class ConfidenceCheck:
    """Confidence against correctness over the scored pairs (module docstring)."""

    n: int  #: pairs with a confidence, a score and a label
    n_correct: int
    accuracy: float | None
    discrimination: float | None  #: AUROC of the confidence for right vs wrong pairs; None with one class only
    ci_low: float | None
    ci_high: float | None
    mean_confidence_correct: float | None
    mean_confidence_wrong: float | None
    mean_gap: float | None  #: mean confidence of right pairs minus wrong pairs
    accuracy_gap: float | None  #: accuracy of the top confidence bin minus the bottom one
    bins: tuple[ConfidenceBin, ...]
    reason: str | None = None  #: why a number is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bins"] = [asdict(b) for b in self.bins]
        return d


def correct_predictions(scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(correct (N, T) float: 1 right, 0 wrong, NaN where the score or label is missing; thresholds (T,)).

    ``scores``, ``labels`` (N, T); ``thresholds`` (T,) or None: per task the closest-to-corner threshold
    (NaN, and the task's pairs missing, when its labelled cases hold one class only)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores and labels must both be (N, T), got {s.shape} and {y.shape}")
    if thresholds is None:
        thr = np.full(s.shape[1], np.nan)
        for t in range(s.shape[1]):
            try:
                thr[t] = closest_to_corner_threshold(y[:, t], s[:, t])
            except ValueError:  # one class only: no threshold, no correctness
                pass
    else:
        thr = np.asarray(thresholds, dtype=np.float64)
        if thr.shape != (s.shape[1],):
            raise ValueError(f"thresholds must be (T,) = ({s.shape[1]},), got {thr.shape}")
    known = np.isfinite(s) & np.isfinite(y) & np.isfinite(thr)[None]
    right = ((s >= thr[None]) == (y > 0.5)).astype(np.float64)
    return np.where(known, right, np.nan), thr


def confidence_check(confidence: np.ndarray, correct: np.ndarray, bins: int = 5, n_boot: int = 1000,
                     seed: int = 0) -> ConfidenceCheck:
    """The check over pairs: ``confidence`` and ``correct`` (any equal shape; NaN = not scored, left out)."""
    if int(bins) < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    r = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != r.shape:
        raise ValueError(f"confidence and correct must have the same shape, got {np.shape(confidence)} and "
                         f"{np.shape(correct)}")
    keep = np.isfinite(c) & np.isfinite(r)
    c, r = c[keep], r[keep] > 0.5
    n, n_right = int(len(c)), int(r.sum())
    if n == 0:
        return ConfidenceCheck(0, 0, None, None, None, None, None, None, None, None, (),
                               reason="no pair with a confidence, a score and a label")
    order = np.argsort(c, kind="stable")
    edges = np.linspace(0, n, min(int(bins), n) + 1).round().astype(int)
    table = tuple(ConfidenceBin(float(c[order[a]]), float(c[order[b - 1]]), int(b - a), float(r[order[a:b]].mean()),
                                float(c[order[a:b]].mean())) for a, b in zip(edges[:-1], edges[1:]) if b > a)
    auc = auc_with_ci(r.astype(float), c, n_boot=n_boot, seed=seed)
    m_right = float(c[r].mean()) if n_right else None
    m_wrong = float(c[~r].mean()) if n_right < n else None
    return ConfidenceCheck(
        n=n, n_correct=n_right, accuracy=n_right / n, discrimination=auc.auc, ci_low=auc.ci_low, ci_high=auc.ci_high,
        mean_confidence_correct=m_right, mean_confidence_wrong=m_wrong,
        mean_gap=(m_right - m_wrong) if m_right is not None and m_wrong is not None else None,
        accuracy_gap=(table[-1].accuracy - table[0].accuracy) if len(table) > 1 else None, bins=table,
        reason=auc.reason if auc.auc is None else None)


def task_confidence_check(scores: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                          anatomy_index: Sequence[int], thresholds: Sequence[float] | None = None, bins: int = 5,
                          n_boot: int = 1000, seed: int = 0) -> ConfidenceCheck:
    """The check from an evaluation's arrays: ``scores``, ``labels`` (N, T), ``confidence`` (N, A) per case and
    anatomy (NaN where the anatomy is not scored), ``anatomy_index`` (T,) each task's anatomy row (< 0: whole
    study, left out); ``thresholds`` as in :func:`correct_predictions`."""
    conf = np.asarray(confidence, dtype=np.float64)
    idx = np.asarray(anatomy_index, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != s.shape[0]:
        raise ValueError(f"confidence must be (N, A) with N = {s.shape[0]} cases, got {conf.shape}")
    if idx.shape != (s.shape[1],) or (idx >= conf.shape[1]).any():
        raise ValueError(f"anatomy_index must be (T,) = ({s.shape[1]},) with rows below A = {conf.shape[1]}, "
                         f"got {idx.shape} up to {int(idx.max()) if idx.size else None}")
    correct, _ = correct_predictions(s, labels, thresholds)
    pair_conf = np.where(idx[None] >= 0, conf[:, np.clip(idx, 0, None)], np.nan)  # (N, T)
    return confidence_check(pair_conf, correct, bins=bins, n_boot=n_boot, seed=seed)
