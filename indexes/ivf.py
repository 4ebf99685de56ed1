"""IVF search at the GEMM rate: the lists an IVF-Flat index probes, scored by matrix products.

FAISS's ``IndexIVFFlat.search`` scores every (query, probed list) pair on its own, one vector
kernel per list vector, and pushes each score through a heap. With many queries (bulk labelling
sends tens of thousands at a time) the queries that probe one list can share it: gathered, they
are scored against the list's vectors in one GEMM, the way `indexes.exact` scores a Flat index.

Two passes per block of queries, so that the top-k costs a comparison per score, not a sort:

1. each query's nearest list (its first probe) is scored whole; its k-th best score there is
   a lower bound of the query's final k-th best, and the scores at or above it are kept;
2. every other probed list is scored; only the scores at or above the query's bound survive (a
   few per query), and one sort over the survivors of both passes gives the top k. The lists of
   probe ranks 2 to ``EARLY_LISTS + 1`` go first; the k-th best found by then is a higher bound
   for the rest (at 100k, nprobe 64: 6 survivors per query instead of 50), with ``low`` only.

How each pass runs at the GEMM rate (issue 26): the probes come from one product with the
centroids and a ``partition`` of each query's centroid scores (the nprobe-th best is a threshold;
no sort of the lists), and the (list, query) pairs of pass 2 are read off the transposed mask of
probed lists, so they come out ordered by list: the queries of a list are one contiguous slice
(one gather, no per-list search). The lists are dealt to one worker per core
(`indexes.exact.workers`), each scoring its lists with a single-threaded BLAS and filtering what it
scored, so the gather and the filter run on every core too. No pair is scored twice.

``precision="bfloat16"`` (the spec's ``bf16=1``) scores pass 2 with a bfloat16 GEMM (torch,
oneDNN: twice the float32 rate on CPUs with AVX512-BF16, half the bytes gathered) against a
bfloat16 copy of the lists (`bf16_lists`), and re-scores the survivors in float32. It stays
exact: a bfloat16 score differs from the float32 one by at most `bf16_margin` · |q| · |x|
(rounding of both inputs and of the output, float32 accumulation), so every vector whose float32
score reaches the query's bound has a bfloat16 score at or above ``bound - margin``; those few
are re-scored in float32 from the list's own vectors and filtered by the bound as in float32.
Products are padded to few shapes (`padded`): oneDNN compiles a kernel per shape.

Results are those of FAISS's IVF search with the same ``nprobe``: the same lists (the query's
``nprobe`` nearest centroids by inner product), exact scores inside them. Where two vectors
score the same the order between them (and which one makes the cut at rank k) may differ; where
two centroids tie at a query's nprobe-th place, both lists are probed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexes.exact import kth_best, one_blas_thread, workers

QUERY_BLOCK = 32768  # queries per pass: with nprobe 32 over 4,096 lists, ~256 queries share a list
# the first pass's bound comes from one list; the lists of ranks 2 to EARLY_LISTS + 1 are scored
# next, and the k-th best found so far (a higher bound: fewer survivors) filters the rest
EARLY_LISTS = 3
PROBE_CHUNK = 2048  # queries whose centroid scores are held at once (2048 x 4096 lists: 32 MiB)
BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)

Lists = Sequence[tuple[np.ndarray, np.ndarray]]
Found = tuple[np.ndarray, np.ndarray, np.ndarray]  # (query rows, scores, ids)


def bf16_margin(d: int) -> float:
    """Largest |bfloat16 score - float32 score| of two vectors of width ``d``, over |q|·|x|: each
    input rounded (2u + u²), the products summed in float32 (d·2^-24, with room), the sum rounded
    to bfloat16 on output (u times the sum)."""
    u, gamma = BF16_UNIT, 1.1 * d * 2.0**-24
    return (2 * u + u * u + gamma) * (1 + u) + u


def padded(n: int) -> int:
    """``n`` rounded up to one of few sizes (a multiple of 1/8 of its power of two, at least 16).

    oneDNN builds (JIT-compiles) a GEMM kernel for every new shape and caches ~1,000 of them:
    lists and their query counts all differ, so unpadded, most products pay a kernel's build
    (measured: 55 GFLOP/s against 150 with the shape cached); padded, a few dozen shapes
    serve a whole search, for at most 1/8 more flops."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


@dataclass
class LowLists:
    """The lists in bfloat16 for pass 2: each transposed (d, L') and zero-padded to ``padded(L)``
    columns, and the largest vector norm (for the margin)."""

    transposed: list[Any]
    max_norm: float


def bf16_lists(lists: Lists) -> LowLists:
    """A bfloat16 copy of ``lists`` (half their bytes), built a list at a time."""
    import torch

    out, max_norm = [], 0.0
    for v, _ in lists:
        a = np.asarray(v, dtype=np.float32)
        t = torch.zeros((a.shape[1], padded(len(a)) if len(a) else 0), dtype=torch.bfloat16)
        if len(a):
            t[:, : len(a)] = torch.from_numpy(np.ascontiguousarray(a.T))
            max_norm = max(max_norm, float(np.sqrt((a * a).sum(axis=1).max())))
        out.append(t)
    return LowLists(out, max_norm)


Pairs = tuple[np.ndarray, np.ndarray]  # query rows ordered by list, each list's start (n_lists + 1,)


def probes(q: np.ndarray, centroids: np.ndarray, nprobe: int, n_threads: int, early: int = 0
           ) -> tuple[np.ndarray, list[Pairs]]:
    """Each query's nearest list (m,), and its other ``nprobe - 1`` nearest lists as (query, list)
    pairs ordered by list: one set of pairs for ranks 2 to ``early + 1`` and one for the rest
    (only the rest where ``early`` is 0; sets without pairs are left out)."""
    m, n_lists = len(q), len(centroids)
    chunks = list(range(0, m, PROBE_CHUNK))
    early = min(early, nprobe - 1)
    cuts = [c for c in (early + 1, nprobe) if 1 < c]  # ranks ending each set

    def chunk(lo: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        s = q[lo : lo + PROBE_CHUNK] @ centroids.T  # (c, n_lists)
        first = np.argmax(s, axis=1)
        out, done = [], np.zeros(s.shape, dtype=bool)
        done[np.arange(len(s)), first] = True
        for cut in dict.fromkeys(cuts):
            mask = s >= kth_best(s, cut) if cut < n_lists else np.ones(s.shape, dtype=bool)
            new = mask & ~done
            done |= mask
            li, qi = np.nonzero(new.T)  # ordered by list, then by query
            out.append((li, qi + lo))
        return first, out

    if n_threads > 1 and len(chunks) > 1:
        with one_blas_thread(), ThreadPoolExecutor(n_threads) as pool:
            parts = list(pool.map(chunk, chunks))
    else:
        parts = [chunk(lo) for lo in chunks]
    first = np.concatenate([p[0] for p in parts])
    sets = []
    for j in range(len(parts[0][1]) if parts else 0):
        li = np.concatenate([p[1][j][0] for p in parts])
        qi = np.concatenate([p[1][j][1] for p in parts])
        if not len(li):
            continue
        if len(parts) > 1:  # each chunk is ordered by list; the whole is not
            order = np.argsort(li.astype(np.uint16) if n_lists <= 1 << 16 else li, kind="stable")
            li, qi = li[order], qi[order]
        sets.append((qi, np.searchsorted(li, np.arange(n_lists + 1))))
    return first, sets


def _by_list(lists_of_queries: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Query rows ordered by their list (``lists_of_queries`` (m,)), and each list's start."""
    order = np.argsort(lists_of_queries, kind="stable")
    return order, np.searchsorted(lists_of_queries[order], np.arange(n_lists + 1))


def _score_lists(work: Sequence[int], score: Callable[[int], Found | None], n_threads: int) -> list[Found]:
    """``score(list)`` for every list of ``work``, dealt over ``n_threads`` workers (BLAS single-threaded)."""
    def run(part: Sequence[int]) -> list[Found]:
        return [f for f in (score(li) for li in part) if f is not None]

    if n_threads <= 1 or len(work) < 2:
        with one_blas_thread():
            return run(work)
    # interleaved: neighbouring lists (similar sizes after k-means) go to different workers
    with one_blas_thread(), ThreadPoolExecutor(n_threads) as pool:
        parts = [pool.submit(run, work[t::n_threads]) for t in range(n_threads)]
        return [f for p in parts for f in p.result()]


def _above(s: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every score of ``s`` (r, L) at or above its row's ``bound`` (r, 1)."""
    flat = np.flatnonzero(s >= bound)
    return np.divmod(flat, s.shape[1])


def _work(starts: np.ndarray) -> list[int]:
    return np.flatnonzero(np.diff(starts)).tolist()


def _first_pass(qb: np.ndarray, lists: Lists, first: np.ndarray, bound: np.ndarray, k: int,
                n_threads: int) -> list[Found]:
    """Score each query against its nearest list; set its ``bound`` to its k-th best there (-inf
    where the list has fewer than k vectors) and keep the scores at or above it."""
    order, starts = _by_list(first, len(lists))

    def score(li: int) -> Found | None:
        xs, ids = lists[li]
        if not len(xs):
            return None
        rows = order[starts[li] : starts[li + 1]]
        s = qb[rows] @ xs.T  # (r, L)
        bound[rows] = kth_best(s, k)
        r, c = _above(s, bound[rows])
        return rows[r], s[r, c], ids[c]

    return _score_lists(_work(starts), score, n_threads)


def _second_pass(qb: np.ndarray, lists: Lists, rows_by_list: np.ndarray, starts: np.ndarray, bound: np.ndarray,
                 n_threads: int, low: LowLists | None) -> list[Found]:
    """Score each query against its other probed lists (its rows of ``rows_by_list``, ordered by
    list); keep the scores at or above its ``bound``. With ``low``, a bfloat16 GEMM first (see the
    module's doc), its survivors re-scored in float32."""
    if low is None:
        def score(li: int) -> Found | None:
            xs, ids = lists[li]
            rows = rows_by_list[starts[li] : starts[li + 1]]
            s = qb[rows] @ xs.T  # (r, L)
            r, c = _above(s, bound[rows])
            return rows[r], s[r, c], ids[c]

        return _score_lists(_work(starts), score, n_threads)

    import torch

    q16 = torch.from_numpy(qb).to(torch.bfloat16).view(torch.int16).numpy()  # gathered by numpy (memcpy rows)
    norms = np.sqrt(np.einsum("ij,ij->i", qb, qb))[:, None]
    # a bfloat16 score of a vector that may make the cut is at or above this
    low_bound = (bound - bf16_margin(qb.shape[1]) * norms * low.max_norm).astype(np.float32)

    local = threading.local()  # each worker's gather buffer

    def score_low(li: int) -> Found | None:
        xs, ids = lists[li]
        rows = rows_by_list[starts[li] : starts[li + 1]]
        m = padded(len(rows))
        if getattr(local, "buf", None) is None or len(local.buf) < m:
            local.buf = np.zeros((max(m, len(qb)), q16.shape[1]), dtype=np.int16)
        np.take(q16, rows, axis=0, out=local.buf[: len(rows)])
        local.buf[len(rows) : m] = 0
        g = torch.from_numpy(local.buf[:m]).view(torch.bfloat16)  # (r', d): padded rows, a cached kernel
        s = torch.mm(g, low.transposed[li])[: len(rows), : len(xs)].float().numpy()  # bfloat16 scores
        r, c = _above(s, low_bound[rows])
        r = rows[r]
        exact = np.einsum("ij,ij->i", qb[r], np.asarray(xs[c], dtype=np.float32))  # float32 re-score
        keep = exact >= bound[r, 0]
        return r[keep], exact[keep], ids[c[keep]]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker per core, like the BLAS
    try:
        return _score_lists(_work(starts), score_low, n_threads)
    finally:
        torch.set_num_threads(threads)


def ivf_topk(q: np.ndarray, centroids: np.ndarray, lists: Lists, k: int, nprobe: int,
             query_block: int = QUERY_BLOCK, threads: int | None = None, low: LowLists | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query over the vectors of its ``nprobe`` nearest lists.

    ``centroids`` (n_lists, d) are the coarse quantizer's; ``lists[l]`` is list ``l`` as
    (vectors (L, d) float32, ids (L,) int64), views of the index's storage (no copy). ``low``
    (`bf16_lists` of the same lists) scores the probed lists in bfloat16 first (the same results).
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
        # the early set only for bfloat16, where each survivor costs a float32 re-score (in float32 a
        # third set of small products costs more than the survivors it saves: measured at 100k)
        first, sets = probes(qb, centroids, nprobe, n_threads, early=EARLY_LISTS if low is not None else 0)
        bound = np.full((len(qb), 1), -np.inf, dtype=np.float32)
        found = _first_pass(qb, lists, first, bound, k, n_threads)  # sets the bounds
        for rows_by_list, starts in sets:
            if found:  # the k-th best found so far: a higher bound for the next set of lists
                found = [_top(found, k, bound)]
            found += _second_pass(qb, lists, rows_by_list, starts, bound, n_threads, low)
        if found:
            fq, fs, fi = _top(found, k, bound)
            rank = np.arange(len(fq)) - np.searchsorted(fq, fq)
            out_s[lo + fq, rank] = fs
            out_i[lo + fq, rank] = fi
    return out_s, out_i


def _top(found: list[Found], k: int, bound: np.ndarray) -> Found:
    """The best ``k`` of ``found`` per query, ordered by query then descending score; a query's
    ``bound`` is raised to its k-th best where it has k."""
    fq, fs, fi = (np.concatenate(parts) for parts in zip(*found))
    by = np.lexsort((-fs, fq))  # by query, then by descending score
    fq, fs, fi = fq[by], fs[by], fi[by]
    rank = np.arange(len(fq)) - np.searchsorted(fq, fq)
    kth = rank == k - 1
    bound[fq[kth], 0] = np.maximum(bound[fq[kth], 0], fs[kth])
    keep = rank < k
    return fq[keep], fs[keep], fi[keep]
