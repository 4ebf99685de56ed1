"""Exact inner-product top-k at the GEMM rate: blocked matrix products and a threshold top-k.

Why not FAISS's own ``IndexFlatIP.search``: measured on this machine (``benchmarks/bench_exact.py``)
it ran below the bare GEMM rate. FAISS computes a (4096 × 1024) score tile at a time with the
OpenBLAS 0.3.15 bundled in the ``faiss-cpu`` wheel, which does not know this CPU and falls back
to its AVX2 "Zen" kernels, and it pushes every score of every tile through a heap. Here the
products go through numpy's BLAS (a newer OpenBLAS with AVX-512 kernels, the rate torch's matmul
reaches), and the top-k costs one comparison per score: a tile's scores are compared with each
query's current k-th best, and only the few that beat it (after the first tile of a query block,
a handful per query) are merged, with one sort over the survivors.

What the first version lost against the bare GEMM (issue 26), and what is done instead:

- the filter (a comparison and a scan per score) ran on one core while the GEMM used all: now
  each worker thread (`workers`, one per core) takes whole query blocks — its own single-threaded
  GEMM, filter and merge — so every step runs on every core (`one_blas_thread` pins numpy's BLAS
  to one thread meanwhile);
- the score tile (1024 × 16384, 64 MiB) did not fit the cache, so the filter read it back from
  memory: a (512 × 4096) tile per worker, 8 MiB, stays in the 32 MiB L3 between the GEMM that
  writes it and the comparison that reads it;
- the first tile's top-k came from a full ``argpartition`` of 1,024 columns per query (~40 ns a
  score, ~9 % of the time at 100k): only the k-th best *value* is needed as the first threshold,
  so a ``partition`` of the values gives it and the ordinary filter collects the candidates.

Results are those of exact search; where two concepts have the same score the order between
them (and which one makes the cut at rank k) may differ from FAISS's.

Names inside the kernels: ``q`` queries (nq, d), ``xb`` base vectors (n, d), ``s`` a score tile.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

QUERY_BLOCK = 512  # queries per tile: a (512, d) panel keeps a single-threaded GEMM at its full rate
BASE_BLOCK = 4096  # base rows per tile: an 8 MiB float32 score tile with QUERY_BLOCK (fits L3 per worker)
SEED_COLUMNS = 1024  # the first threshold is the k-th best of this many columns (a partition of values)


def workers() -> int:
    """Threads a search splits its query blocks over: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_BLAS_LOCK = threading.Lock()
_BLAS_HELD: list[Any] = []  # the limit in force while searches run, one entry per search (the first's object)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS at one thread inside the block (a no-op without threadpoolctl).

    The limit is the process's: the first search to enter sets it, the last to leave restores
    the original, so searches in several threads (a server) never leave it set behind them; a
    BLAS call another thread makes meanwhile runs on one thread too. threadpoolctl (>= 3.6) lets
    only the thread that first set a pthreads OpenBLAS's limit change it again and silently ignores
    the others; the last search out is often another thread than the first, so each change here
    first hands control to the thread making it (`_take_blas_control`)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with _BLAS_LOCK:
        if not _BLAS_HELD:
            _take_blas_control()
        _BLAS_HELD.append(_BLAS_HELD[0] if _BLAS_HELD else threadpool_limits(limits=1, user_api="blas"))
    try:
        yield
    finally:
        with _BLAS_LOCK:
            limit = _BLAS_HELD.pop()
            if not _BLAS_HELD:
                _take_blas_control()
                limit.restore_original_limits()
                _take_blas_control()  # and leave no thread in control, as `with threadpool_limits()` does


def _take_blas_control() -> None:
    """Clear threadpoolctl's controlling thread of pthreads OpenBLAS, so that the calling thread's
    next limit takes effect (called under `_BLAS_LOCK`; older threadpoolctl have none: nothing to do)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def merge_topk(best_s: np.ndarray, best_i: np.ndarray, rows: np.ndarray, cand_s: np.ndarray,
               cand_i: np.ndarray) -> None:
    """Merge candidates (``rows`` into the block, score, id) into the sorted top-k lists in place.

    ``best_s``/``best_i`` are (m, k), each row sorted by descending score (-inf/-1 where empty).
    """
    m, k = best_s.shape
    all_r = np.concatenate([np.repeat(np.arange(m), k), rows])
    all_s = np.concatenate([best_s.ravel(), cand_s])
    all_i = np.concatenate([best_i.ravel(), cand_i])
    order = np.lexsort((-all_s, all_r))  # by row, then by descending score
    all_r, all_s, all_i = all_r[order], all_s[order], all_i[order]
    start = np.searchsorted(all_r, np.arange(m))  # every row has its k current entries, so none is empty
    rank = np.arange(len(all_r)) - start[all_r]
    keep = rank < k
    best_s[all_r[keep], rank[keep]] = all_s[keep]
    best_i[all_r[keep], rank[keep]] = all_i[keep]


def kth_best(s: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th best value (m, 1) — -inf where the row has fewer than ``k`` columns."""
    m, n = s.shape
    if n < k:
        return np.full((m, 1), -np.inf, dtype=s.dtype)
    return np.partition(s, n - k, axis=1)[:, n - k : n - k + 1]


# called with each score tile (m, b), its first query row and its first base row, before the
# tile's top-k selection (the tile's buffer is reused for the next one)
TileHook = Callable[[np.ndarray, int, int], None]


def _block_topk(qb: np.ndarray, xb: np.ndarray, k: int, base_block: int, buf: np.ndarray,
                mask: np.ndarray, on_tile: Callable[[np.ndarray, int], None] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (sorted) of one query block over every base row; ``buf``/``mask`` are tile buffers;
    ``on_tile(tile, first base row)`` sees each score tile first."""
    m, n = len(qb), len(xb)
    best_s = np.full((m, k), -np.inf, dtype=np.float32)
    best_i = np.full((m, k), -1, dtype=np.int64)
    bound: np.ndarray | None = None
    for blo in range(0, n, base_block):
        xt = np.asarray(xb[blo : blo + base_block], dtype=np.float32)  # (b, d)
        b = len(xt)
        s = np.matmul(qb, xt.T, out=buf[: m * b].reshape(m, b))  # contiguous (m, b)
        if on_tile is not None:
            on_tile(s, blo)
        if bound is None:  # the first threshold: k-th best of the first columns; candidates are >= it
            bound = kth_best(s[:, : min(b, max(SEED_COLUMNS, k))], k)
            above = np.greater_equal(s, bound, out=mask[: m * b].reshape(m, b))
        else:  # beats the row's current k-th best
            above = np.greater(s, best_s[:, -1:], out=mask[: m * b].reshape(m, b))
        flat = np.flatnonzero(above)
        if len(flat):
            rows, cols = np.divmod(flat, b)
            merge_topk(best_s, best_i, rows, s.ravel()[flat], cols + blo)
    return best_s, best_i


def topk_inner_product(q: np.ndarray, xb: np.ndarray, k: int, ids: np.ndarray | None = None,
                       query_block: int = QUERY_BLOCK, base_block: int = BASE_BLOCK,
                       threads: int | None = None, on_tile: TileHook | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``q @ xb.T`` per query: (scores (nq, k) float32, ids (nq, k) int64).

    ``xb`` may be a memory map or a view of an index's storage (it is read tile by tile, never
    copied whole); ``ids`` maps row numbers to the caller's ids (row numbers when ``None``).
    Rows with fewer than ``k`` base vectors get -inf / -1 in the missing places. Query blocks are
    split over ``threads`` workers (default `workers`), each with a single-threaded BLAS.
    ``on_tile`` sees every score tile once (one call at a time, whatever the threads), so a caller
    can fold a column-wise statistic of the same products in (the CSLS pre-pass,
    `engine.labelling.criteria.AtlasSideStats`) without a second GEMM.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)  # (nq, d)
    nq, n = len(q), len(xb)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return out_s, out_i
    n_threads = max(1, min(threads or workers(), -(-nq // max(1, min(query_block, nq)))))
    # fewer blocks than threads: smaller blocks, so that every worker has one
    query_block = max(1, min(query_block, -(-nq // n_threads)))
    tile = min(query_block, nq) * min(base_block, n)
    starts = list(range(0, nq, query_block))

    hook_lock = threading.Lock()

    def run(part: list[int]) -> None:
        buf, mask = np.empty(tile, dtype=np.float32), np.empty(tile, dtype=bool)
        for qlo in part:
            qb = q[qlo : qlo + query_block]
            seen = None
            if on_tile is not None:
                def seen(s: np.ndarray, blo: int, qlo: int = qlo) -> None:
                    with hook_lock:
                        on_tile(s, qlo, blo)
            out_s[qlo : qlo + len(qb)], out_i[qlo : qlo + len(qb)] = _block_topk(qb, xb, k, base_block, buf, mask,
                                                                                 seen)

    if n_threads == 1:
        run(starts)
    else:
        with one_blas_thread(), ThreadPoolExecutor(n_threads) as pool:
            for f in [pool.submit(run, starts[t::n_threads]) for t in range(n_threads)]:
                f.result()
    if ids is not None:
        found = out_i >= 0
        out_i[found] = np.asarray(ids, dtype=np.int64)[out_i[found]]
    return out_s, out_i
