"""Retrieval metrics (docs/design.md §8), checked against a brute-force ranking."""

from __future__ import annotations

import numpy as np
import pytest

from engine.align.metrics import retrieval_metrics, retrieval_ranks
from engine.errors import ShapeError


def test_perfect_retrieval():
    t = np.random.default_rng(0).normal(size=(10, 8))
    m = retrieval_metrics(t * 3.0, t, np.arange(10))  # cosine ignores scale
    assert (m.mrr, m.mpp, m.top1, m.top5, m.n) == (1.0, 0.0, 1.0, 1.0, 10)


def test_against_brute_force_ranking():
    rng = np.random.default_rng(1)
    q, t = rng.normal(size=(50, 6)), rng.normal(size=(30, 6))
    true = rng.integers(0, 30, size=50)
    ranks = []
    for i in range(50):
        cos = [q[i] @ t[j] / np.linalg.norm(q[i]) / np.linalg.norm(t[j]) for j in range(30)]
        ranks.append(1 + sum(c >= cos[true[i]] for j, c in enumerate(cos) if j != true[i]))
    ranks = np.array(ranks, dtype=float)
    np.testing.assert_array_equal(retrieval_ranks(q, t, true), ranks)
    m = retrieval_metrics(q, t, true)
    assert m.mrr == pytest.approx(np.mean(1 / ranks))
    assert m.mpp == pytest.approx(np.mean((ranks - 1) / 29))
    assert m.top1 == pytest.approx(np.mean(ranks == 1))
    assert m.top5 == pytest.approx(np.mean(ranks <= 5))


def test_ties_count_against_the_query():
    t = np.eye(4)
    m = retrieval_metrics(np.zeros((2, 4)), t, np.array([0, 3]))  # every score ties at 0
    assert (m.mrr, m.mpp, m.top1) == (0.25, 1.0, 0.0)


def test_chance_is_about_one_half_mpp():
    rng = np.random.default_rng(2)
    m = retrieval_metrics(rng.normal(size=(2000, 16)), rng.normal(size=(100, 16)), rng.integers(0, 100, 2000))
    assert 0.45 < m.mpp < 0.55


def test_shape_errors():
    with pytest.raises(ShapeError, match="share d"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((4, 5)), np.array([0, 1]))
    with pytest.raises(ShapeError, match="one entry per query"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((4, 3)), np.array([0]))
    with pytest.raises(ShapeError, match="0..3"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((4, 3)), np.array([0, 4]))
