"""IVF search at the GEMM rate: the lists an IVF-Flat index probes, scored by matrix products.

FAISS's ``IndexIVFFlat.search`` scores every (query, probed list) pair on its own, one vector
kernel per list vector, and pushes each score through a heap. With many queries (bulk labelling
sends tens of thousands at a time) the queries that probe one list can share it: gathered, they
are scored against the list's vectors in one GEMM, the way `indexes.exact` scores a Flat index.

Two passes per block of queries, so that the top-k costs a comparison per score, not a sort:

1. each query's nearest list (its first probe) is scored whole; its k-th best score there is
   a lower bound of the query's final k-th best, and the scores at or above it are kept;
2. every other probed list is scored; only the scores at or above the query's bound survive (a
   few per query), and one sort over the survivors of both passes gives the top k.

How each pass runs at the GEMM rate (issue 26): the (query, list) pairs are sorted by list once,
so the queries of a list are one contiguous slice of that order (one gather, no per-list search);
the lists are dealt to one worker per core (`indexes.exact.workers`), each scoring its lists with a
single-threaded BLAS and filtering what it scored, so the gather and the filter run on every core
too; a list's scores are filtered by one comparison and one flat scan. No pair is scored twice.

Results are those of FAISS's IVF search with the same ``nprobe``: the same lists (the query's
``nprobe`` nearest centroids by inner product), exact scores inside them. Where two vectors
score the same the order between them (and which one makes the cut at rank k) may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from indexes.exact import kth_best, one_blas_thread, topk_inner_product, workers

QUERY_BLOCK = 32768  # queries per pass: with nprobe 32 over 4,096 lists, ~256 queries share a list

Lists = Sequence[tuple[np.ndarray, np.ndarray]]
Found = tuple[np.ndarray, np.ndarray, np.ndarray]  # (query rows, scores, ids)


def _by_list(lists_of_pairs: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``lists_of_pairs`` (flat, list number or -1) ordered by list, and each list's start."""
    order = np.argsort(lists_of_pairs, kind="stable")
    starts = np.zeros(n_lists + 1, dtype=np.int64)
    np.cumsum(np.bincount(lists_of_pairs[lists_of_pairs >= 0], minlength=n_lists), out=starts[1:])
    return order[lists_of_pairs[order] >= 0], starts


def _score_lists(work: Sequence[int], score: Callable[[int], Found | None], n_threads: int) -> list[Found]:
    """``score(list)`` for every list of ``work``, dealt over ``n_threads`` workers (BLAS single-threaded)."""
    def run(part: Sequence[int]) -> list[Found]:
        return [f for f in (score(li) for li in part) if f is not None]

    if n_threads <= 1 or len(work) < 2:
        return run(work)
    # interleaved: neighbouring lists (similar sizes after k-means) go to different workers
    with one_blas_thread(), ThreadPoolExecutor(n_threads) as pool:
        parts = [pool.submit(run, work[t::n_threads]) for t in range(n_threads)]
        return [f for p in parts for f in p.result()]


def _above(s: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every score of ``s`` (r, L) at or above its row's ``bound`` (r, 1)."""
    flat = np.flatnonzero(s >= bound)
    return np.divmod(flat, s.shape[1])


def _scan(qb: np.ndarray, lists: Lists, probes: np.ndarray, bound: np.ndarray, k: int | None,
          n_threads: int) -> list[Found]:
    """Score every query of ``qb`` against its lists ``probes`` (m, w), keeping the scores at or above
    its ``bound`` (m, 1). With ``k`` (pass 1, w = 1) each query's bound is first set to its k-th best there."""
    width = probes.shape[1]
    order, starts = _by_list(probes.ravel(), len(lists))

    def score(li: int) -> Found | None:
        xs, ids = lists[li]
        rows = order[starts[li] : starts[li + 1]] // width  # the queries probing list li: one slice
        if not len(xs):
            return None
        s = qb[rows] @ xs.T  # (r, L)
        if k is not None:  # -inf where the list has fewer than k vectors: keeps all
            bound[rows] = kth_best(s, k)
        r, c = _above(s, bound[rows])
        return rows[r], s[r, c], ids[c]

    return _score_lists(np.flatnonzero(np.diff(starts)).tolist(), score, n_threads)


def ivf_topk(q: np.ndarray, centroids: np.ndarray, lists: Lists, k: int, nprobe: int,
             query_block: int = QUERY_BLOCK, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query over the vectors of its ``nprobe`` nearest lists.

    ``centroids`` (n_lists, d) are the coarse quantizer's; ``lists[l]`` is list ``l`` as
    (vectors (L, d) float32, ids (L,) int64), views of the index's storage (no copy).
    Returns (scores (nq, k) float32, ids (nq, k) int64), -inf / -1 where fewer than ``k`` were found.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    nq, n_lists = len(q), len(centroids)
    nprobe = max(1, min(int(nprobe), n_lists))
    n_threads = threads or workers()
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for lo in range(0, nq, query_block):
        qb = q[lo : lo + query_block]
        probe = topk_inner_product(qb, centroids, nprobe, threads=n_threads)[1]  # (m, P): FAISS's lists
        bound = np.full((len(qb), 1), -np.inf, dtype=np.float32)
        found = _scan(qb, lists, probe[:, :1], bound, k, n_threads)  # pass 1: sets the bounds
        if nprobe > 1:
            found += _scan(qb, lists, probe[:, 1:], bound, None, n_threads)  # pass 2: the other lists
        if not found:
            continue
        fq, fs, fi = (np.concatenate(parts) for parts in zip(*found))
        by = np.lexsort((-fs, fq))  # by query, then by descending score
        fq, fs, fi = fq[by], fs[by], fi[by]
        rank = np.arange(len(fq)) - np.searchsorted(fq, fq)
        keep = rank < k
        out_s[lo + fq[keep], rank[keep]] = fs[keep]
        out_i[lo + fq[keep], rank[keep]] = fi[keep]
    return out_s, out_i
