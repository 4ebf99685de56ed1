"""IVF search at the GEMM rate: the lists an IVF-Flat index probes, scored by matrix products.

FAISS's ``IndexIVFFlat.search`` scores every (query, probed list) pair on its own, one vector
kernel per list vector, and pushes each score through a heap. With many queries (bulk labelling
sends tens of thousands at a time) the queries that probe one list can share it: gathered, they
are scored against the list's vectors in one GEMM, the way `indexes.exact` scores a Flat index.

Two passes per block of queries, so that the top-k costs a comparison per score, not a sort:

1. each query's nearest list (its first probe) is scored whole; its k-th best score there is
   a lower bound of the query's final k-th best;
2. every probed list is scored; only the scores at or above the query's bound survive (a few
   per query), and one sort over the survivors gives the top k.

Results are those of FAISS's IVF search with the same ``nprobe``: the same lists (the query's
``nprobe`` nearest centroids by inner product), exact scores inside them. Where two vectors
score the same the order between them (and which one makes the cut at rank k) may differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexes.exact import topk_inner_product

QUERY_BLOCK = 32768  # queries per pass: with nprobe 32 over 4,096 lists, ~256 queries share a list
BOUND_MARGIN = 1e-4  # below the first pass's k-th score (unit vectors: rounding is ~1e-6)


def _gather(probe: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries of ``probe`` (m, P) ordered by list (flat positions), and each list's start in that order."""
    flat = probe.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.zeros(n_lists + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat[flat >= 0], minlength=n_lists), out=starts[1:])
    return order[flat[order] >= 0], starts


def _bounds(q: np.ndarray, first: np.ndarray, lists: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Each query's k-th best score in its first probed list (-inf where that list has < k vectors)."""
    bound = np.full(len(q), -np.inf, dtype=np.float32)
    order = np.argsort(first, kind="stable")
    edges = np.flatnonzero(np.diff(first[order])) + 1
    for group in np.split(order, edges):
        if not len(group) or first[group[0]] < 0:
            continue
        xs, _ = lists[int(first[group[0]])]
        if len(xs) < k:
            continue
        s = q[group] @ xs.T  # (m, L)
        bound[group] = np.partition(s, len(xs) - k, axis=1)[:, len(xs) - k]
    # The second pass scores these pairs again in GEMMs of other shapes, whose last bits may differ:
    # a margin far above float32 rounding keeps the k vectors that set the bound.
    return bound - BOUND_MARGIN


def ivf_topk(q: np.ndarray, centroids: np.ndarray, lists: Sequence[tuple[np.ndarray, np.ndarray]], k: int,
             nprobe: int, query_block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query over the vectors of its ``nprobe`` nearest lists.

    ``centroids`` (n_lists, d) are the coarse quantizer's; ``lists[l]`` is list ``l`` as
    (vectors (L, d) float32, ids (L,) int64), views of the index's storage (no copy).
    Returns (scores (nq, k) float32, ids (nq, k) int64), -inf / -1 where fewer than ``k`` were found.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    nq, n_lists = len(q), len(centroids)
    nprobe = max(1, min(int(nprobe), n_lists))
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for lo in range(0, nq, query_block):
        qb = q[lo : lo + query_block]
        probe = topk_inner_product(qb, centroids, nprobe)[1]  # (m, P): the lists FAISS would probe
        bound = _bounds(qb, probe[:, 0], lists, k)
        order, starts = _gather(probe, n_lists)
        found_q, found_s, found_i = [], [], []
        for li in np.flatnonzero(np.diff(starts)):
            xs, ids = lists[int(li)]
            if not len(xs):
                continue
            rows = order[starts[li] : starts[li + 1]] // nprobe  # the queries probing list li
            s = qb[rows] @ xs.T  # (r, L)
            r, c = np.nonzero(s >= bound[rows, None])
            found_q.append(rows[r])
            found_s.append(s[r, c])
            found_i.append(ids[c])
        if not found_q:
            continue
        fq, fs, fi = np.concatenate(found_q), np.concatenate(found_s), np.concatenate(found_i)
        by = np.lexsort((-fs, fq))  # by query, then by descending score
        fq, fs, fi = fq[by], fs[by], fi[by]
        rank = np.arange(len(fq)) - np.searchsorted(fq, fq)
        keep = rank < k
        out_s[lo + fq[keep], rank[keep]] = fs[keep]
        out_i[lo + fq[keep], rank[keep]] = fi[keep]
    return out_s, out_i
