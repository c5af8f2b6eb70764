"""Cross-modal retrieval metrics: recall@k and median rank of image <-> text retrieval, with their chance level.

Queries ``q`` (Q, D) and a gallery ``g`` (G, D) are compared by cosine similarity::

    S[i, j] = <q_i / |q_i|, g_j / |g_j|>                                        S: (Q, G)

A boolean ``match`` (Q, G) says which gallery items are a correct answer for each query: the query's own
pair, and every item whose text is identical to it (two cases with the same report text, or, at the anatomy
level, the many identical "The liver is normal." texts: no model can tell them apart, so any of them is
right). The rank of query ``i`` is the position of its best-scored correct item, with every *wrong* item that
scores at least as high placed before it (ties count against the model, so a collapsed model that gives every
pair the same similarity ranks last, never first)::

    rank_i = 1 + #{ j : not match[i, j] and S[i, j] >= max_{m : match[i, m]} S[i, m] }

    recall@k = (1/Q) sum_i [rank_i <= k]            median rank = median_i rank_i

Chance level (a random ordering of the gallery): with ``m_i`` correct items among ``G``, the best correct item
is within the first ``r`` with probability ``P_i(r) = 1 - C(G - m_i, r) / C(G, r)``; chance recall@k is
``mean_i P_i(k)`` and the chance median rank the smallest ``r`` with ``mean_i P_i(r) >= 1/2`` (the median of the
pooled rank distribution). With one correct item per query these are ``k / G`` and ``ceil(G / 2)``.

The CT retrieval protocol (report -> volume and volume -> report recall@k over a held-out set) follows
CT-CLIP (Hamamci et al., 2024) and Merlin (Blankemeier et al., 2024).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["cosine_similarity", "ranks", "chance_recall", "chance_median_rank", "retrieval_metrics", "group_match"]


def cosine_similarity(queries: np.ndarray, gallery: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(Q, G) cosine similarities of ``queries`` (Q, D) and ``gallery`` (G, D), in float64."""
    q = np.asarray(queries, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries and gallery must be (Q, D) and (G, D) with the same D, got {q.shape} and {g.shape}")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), eps)  # (Q, D)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), eps)  # (G, D)
    return q @ g.T  # (Q, G)


def group_match(query_groups: Sequence[Any], gallery_groups: Sequence[Any]) -> np.ndarray:
    """(Q, G) bool: query ``i`` matches gallery item ``j`` when their group keys are equal (e.g. ids of
    identical texts)."""
    ids: dict[Any, int] = {}
    q = np.asarray([ids.setdefault(k, len(ids)) for k in query_groups], dtype=np.int64)  # (Q,)
    g = np.asarray([ids.setdefault(k, len(ids)) for k in gallery_groups], dtype=np.int64)  # (G,)
    return q[:, None] == g[None, :]  # (Q, G)


def ranks(similarity: np.ndarray, match: np.ndarray) -> np.ndarray:
    """(Q,) int rank of each query's best correct item (module docstring: wrong items tied with it go first)."""
    s = np.asarray(similarity, dtype=np.float64)
    m = np.asarray(match, dtype=bool)
    if s.ndim != 2 or s.shape != m.shape:
        raise ValueError(f"similarity and match must be (Q, G) of one shape, got {s.shape} and {m.shape}")
    if not m.any(axis=1).all():
        bad = int(np.flatnonzero(~m.any(axis=1))[0])
        raise ValueError(f"query {bad} has no correct gallery item: every query needs one")
    if not np.isfinite(s).all():
        raise ValueError("similarities must be finite (a NaN or inf embedding?)")
    best = np.where(m, s, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return 1 + ((s >= best) & ~m).sum(axis=1)  # (Q,)


def _first_hit_cdf(n_gallery: int, n_match: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(Q, R): P(best of ``n_match[i]`` correct items is within the first ``r`` of a random ordering of
    ``n_gallery``) = 1 - C(G - m, r) / C(G, r)."""
    from scipy.special import gammaln

    g = float(n_gallery)
    m = np.asarray(n_match, dtype=np.float64)[:, None]  # (Q, 1)
    r = np.asarray(r, dtype=np.float64)[None, :]  # (1, R)
    miss = r <= g - m  # otherwise a correct item is always within the first r
    rr = np.where(miss, r, 0.0)
    log_ratio = gammaln(g - m + 1) - gammaln(np.maximum(g - m - rr, 0) + 1) - gammaln(g + 1) + gammaln(g - rr + 1)
    return np.where(miss, 1.0 - np.exp(log_ratio), 1.0)


def chance_recall(n_gallery: int, n_match: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ordering: ``mean_i P_i(k)`` (module docstring)."""
    return float(_first_hit_cdf(n_gallery, n_match, np.array([min(k, n_gallery)])).mean())


def chance_median_rank(n_gallery: int, n_match: np.ndarray) -> int:
    """Median of the pooled rank under a random ordering: smallest ``r`` with ``mean_i P_i(r) >= 1/2``."""
    cdf = _first_hit_cdf(n_gallery, n_match, np.arange(1, n_gallery + 1)).mean(axis=0)  # (G,)
    return int(np.searchsorted(cdf, 0.5 - 1e-12) + 1)


def retrieval_metrics(similarity: np.ndarray, match: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """recall@k, median and mean rank of one retrieval direction, each with its chance level.

    ``similarity`` (Q, G), ``match`` (Q, G) bool (module docstring). Returns ``n_queries``, ``n_gallery``,
    ``mean_matches`` (correct items per query), ``recall@k`` and ``chance_recall@k`` per k, ``median_rank``,
    ``chance_median_rank`` and ``mean_rank``."""
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"k must be at least 1, got {list(ks)}")
    r = ranks(similarity, match)  # (Q,)
    n_match = np.asarray(match, dtype=bool).sum(axis=1)  # (Q,)
    g = int(np.shape(similarity)[1])
    out: dict[str, Any] = {"n_queries": int(len(r)), "n_gallery": g, "mean_matches": float(n_match.mean())}
    for k in ks:
        out[f"recall@{k}"] = float((r <= k).mean())
        out[f"chance_recall@{k}"] = chance_recall(g, n_match, int(k))
    out["median_rank"] = float(np.median(r))
    out["chance_median_rank"] = chance_median_rank(g, n_match)
    out["mean_rank"] = float(r.mean())
    return out
