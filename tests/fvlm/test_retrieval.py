"""fvlm.retrieval: ranks with identical answers and ties, recall@k, median rank and their chance levels."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm.retrieval import (chance_median_rank, chance_recall, cosine_similarity, group_match, ranks,
                            retrieval_metrics)


def test_identical_pairs_are_retrieved_first() -> None:
    x = np.random.default_rng(0).normal(size=(50, 16))
    m = retrieval_metrics(cosine_similarity(x, x), np.eye(50, dtype=bool), ks=(1, 5, 10))
    assert m["recall@1"] == m["recall@5"] == 1.0 and m["median_rank"] == 1.0
    assert m["chance_recall@1"] == pytest.approx(1 / 50) and m["chance_recall@10"] == pytest.approx(10 / 50)
    assert m["chance_median_rank"] == 25


def test_ties_with_wrong_items_count_against_the_model() -> None:
    """A collapsed model (every similarity equal) ranks last, never first."""
    sim = np.ones((4, 4))
    np.testing.assert_array_equal(ranks(sim, np.eye(4, dtype=bool)), [4, 4, 4, 4])
    # two identical answers: either counts, the other wrong items still go first on ties
    match = group_match(["a", "a", "b", "c"], ["a", "a", "b", "c"])
    assert match[0, 1] and not match[0, 2]
    np.testing.assert_array_equal(ranks(sim, match), [3, 3, 4, 4])


def test_rank_is_the_position_of_the_best_correct_item() -> None:
    sim = np.array([[0.9, 0.5, 0.7, 0.1], [0.2, 0.1, 0.3, 0.4]])
    match = np.array([[False, True, False, False], [True, False, False, True]])
    np.testing.assert_array_equal(ranks(sim, match), [3, 1])


def test_chance_levels_match_a_random_ordering() -> None:
    rng = np.random.default_rng(1)
    g, m = 30, np.array([1, 3, 5] * 20)  # 60 queries with 1, 3 or 5 correct items among 30
    match = np.zeros((len(m), g), dtype=bool)
    for i, k in enumerate(m):
        match[i, rng.choice(g, size=k, replace=False)] = True
    sims = [rng.random((len(m), g)) for _ in range(400)]
    r = np.concatenate([ranks(s, match) for s in sims])
    assert chance_recall(g, m, 5) == pytest.approx((r <= 5).mean(), abs=0.01)
    assert abs(chance_median_rank(g, m) - np.median(r)) <= 1
    assert chance_recall(g, m, g) == 1.0


def test_invalid_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="no correct gallery item"):
        ranks(np.zeros((2, 2)), np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="same D"):
        cosine_similarity(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 1"):
        retrieval_metrics(np.eye(2), np.eye(2, dtype=bool), ks=(0,))
