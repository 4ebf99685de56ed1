"""Retrieval metrics, as this project defines them (docs/design.md §8).

For each query (a subject concept direction mapped into the atlas) with a known true atlas
concept, the rank is the position of the true concept among all N atlas concepts by cosine.
Ties count against the query: rank = 1 + #(other concepts scoring ≥ the true one), so a map
that sends everything to zero scores chance-or-worse, never perfect.

- MRR: mean of 1/rank.
- MPP (mean percentile position): mean of (rank − 1)/(N − 1); 0 is perfect, 0.5 is chance.
- top-1 / top-5: share of queries whose true concept ranks first / in the first five.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ShapeError
from engine.util import unit_rows


@dataclass(frozen=True)
class RetrievalMetrics:
    mrr: float
    mpp: float
    top1: float
    top5: float
    n: int  # number of queries


def retrieval_ranks(queries: np.ndarray, targets: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true target among all targets by cosine (ties pessimistic)."""
    q = np.asarray(queries, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    idx = np.asarray(true_index, dtype=np.int64)
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        raise ShapeError(f"queries (n, d) and targets (N, d) must share d; got {q.shape} and {t.shape}")
    if idx.shape != (q.shape[0],):
        raise ShapeError(f"true_index must have one entry per query, shape ({q.shape[0]},); got {idx.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= t.shape[0]):
        raise ShapeError(f"true_index values must lie in 0..{t.shape[0] - 1}")
    scores = unit_rows(q, np.float64) @ unit_rows(t, np.float64).T  # (n, N) cosines
    true = scores[np.arange(len(idx)), idx][:, None]  # (n, 1)
    # others at or above the true score; the true concept itself is counted by the "1 +"
    ahead = (scores >= true).sum(axis=1) - 1
    return 1 + ahead


def retrieval_metrics(queries: np.ndarray, targets: np.ndarray, true_index: np.ndarray) -> RetrievalMetrics:
    """MRR, MPP, top-1 and top-5 of ranking ``targets`` (N, d) for each of ``queries`` (n, d)."""
    ranks = retrieval_ranks(queries, targets, true_index).astype(np.float64)
    n_targets = np.asarray(targets).shape[0]
    if len(ranks) == 0:
        nan = float("nan")
        return RetrievalMetrics(nan, nan, nan, nan, 0)
    mpp = float(np.mean((ranks - 1) / (n_targets - 1))) if n_targets > 1 else 0.0
    return RetrievalMetrics(
        mrr=float(np.mean(1.0 / ranks)),
        mpp=mpp,
        top1=float(np.mean(ranks <= 1)),
        top5=float(np.mean(ranks <= 5)),
        n=int(len(ranks)),
    )
