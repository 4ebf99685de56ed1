"""The retrieval table: fit every method on every (pairing, layer) and rank known concepts (docs/design.md §8).

Queries are a subject's own concept directions with a known true atlas concept; each is mapped
through a map fitted from the statistics and ranked among all targets (`engine.align.metrics`).
Nothing here chooses anything: hyper-parameters come from the held-out statistics of the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.align.fit import PairedStats
from engine.align.map import AlignmentMap
from engine.align.metrics import retrieval_metrics


@dataclass(frozen=True)
class RetrievalRow:
    """One cell of the retrieval table (docs/design.md §8)."""

    subject: str
    method: str
    pairing: str
    layer: int
    mrr: float
    mpp: float
    top1: float
    top5: float
    n_queries: int
    n_pairs: int
    heldout_r2: float | None


def evaluate_maps(
    stats: PairedStats,
    queries: dict[int, np.ndarray],
    targets: np.ndarray,
    true_index: np.ndarray,
    methods: Sequence[str],
    subject: str = "",
) -> list[RetrievalRow]:
    """Fit every method on every (pairing, layer) of ``stats`` and rank the mapped ``queries[layer]``
    (the subject's own concept directions, (n, d_subject)) among ``targets`` (N, d_atlas)."""
    rows = []
    for pairing, layer in sorted(stats.train):
        for method in methods:
            amap: AlignmentMap = stats.fit(pairing, layer, method)
            m = retrieval_metrics(amap.map_directions(queries[layer]), targets, true_index)
            rows.append(RetrievalRow(subject, method, pairing, layer, m.mrr, m.mpp, m.top1, m.top5, m.n,
                                     amap.n_pairs, amap.metrics.get("heldout_r2")))
    return rows
