"""Exact inner-product top-k at the GEMM rate: blocked matrix products and a threshold top-k.

Why not FAISS's own ``IndexFlatIP.search``: measured on this machine (``benchmarks/bench_exact.py``)
it ran well below the bare GEMM rate. FAISS computes a (4096 × 1024) score tile at a time with the
OpenBLAS 0.3.15 bundled in the ``faiss-cpu`` wheel, which does not know this CPU and falls back
to its AVX2 "Zen" kernels, and it pushes every score of every tile through a heap. Here the
products go through numpy's BLAS (a newer OpenBLAS with AVX-512 kernels, the rate torch's matmul
reaches) in larger tiles, and the top-k costs one comparison per score: a tile's scores are
compared with each query's current k-th best, and only the few that beat it (after the first tile
of a query block, a handful per query) are merged, with one sort over the survivors. A tile is
compared in column chunks no wider than the columns already seen, so each chunk leaves about ``k``
survivors a query even while the k-th best is still young (a large ``k``, a query block's first tile).

Results are those of exact search; where two concepts have the same score the order between
them (and which one makes the cut at rank k) may differ from FAISS's.

Names inside the kernels: ``q`` queries (nq, d), ``xb`` base vectors (n, d), ``s`` a score tile.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QUERY_BLOCK = 1024  # queries per tile: a (1024, d) panel keeps the GEMM at its full rate
BASE_BLOCK = 16384  # base rows per tile: a 64 MiB float32 score tile with QUERY_BLOCK
SEED_COLUMNS = 1024  # the first top-k comes from this many columns: a full-tile argpartition costs
#                      ~40 ns a score (as much as the GEMM), a comparison under 1 ns


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


def _first_tile(s: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (sorted) of each row of a score tile, ids offset by ``offset``."""
    m, n = s.shape
    kk = min(k, n)
    part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (m, 1))
    ps = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    best_s = np.full((m, k), -np.inf, dtype=np.float32)
    best_i = np.full((m, k), -1, dtype=np.int64)
    best_s[:, :kk] = np.take_along_axis(ps, order, axis=1)
    best_i[:, :kk] = np.take_along_axis(part, order, axis=1) + offset
    return best_s, best_i


# called with each score tile (m, b), its first query row and its first base row, before the
# tile's top-k selection (the tile's buffer is reused for the next one)
TileHook = Callable[[np.ndarray, int, int], None]


def topk_inner_product(q: np.ndarray, xb: np.ndarray, k: int, ids: np.ndarray | None = None,
                       query_block: int = QUERY_BLOCK, base_block: int = BASE_BLOCK,
                       on_tile: TileHook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``q @ xb.T`` per query: (scores (nq, k) float32, ids (nq, k) int64).

    ``xb`` may be a memory map or a view of an index's storage (it is read tile by tile, never
    copied whole); ``ids`` maps row numbers to the caller's ids (row numbers when ``None``).
    Rows with fewer than ``k`` base vectors get -inf / -1 in the missing places. ``on_tile``
    sees every score tile once, so a caller can fold a column-wise statistic of the same products
    in (the CSLS pre-pass, `engine.labelling.criteria.AtlasSideStats`) without a second GEMM.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)  # (nq, d)
    nq, n = len(q), len(xb)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return out_s, out_i
    tile = np.empty((min(query_block, nq), min(base_block, n)), dtype=np.float32)
    above = np.empty(tile.shape, dtype=bool)
    for qlo in range(0, nq, query_block):
        qb = q[qlo : qlo + query_block]  # (m, d)
        m = len(qb)
        best_s = best_i = None
        for blo in range(0, n, base_block):
            xt = np.asarray(xb[blo : blo + base_block], dtype=np.float32)  # (b, d)
            s = np.matmul(qb, xt.T, out=tile[:m, : len(xt)])  # (m, b)
            if on_tile is not None:
                on_tile(s, qlo, blo)
            start = 0
            if best_s is None or best_i is None:
                start = min(len(xt), max(SEED_COLUMNS, k))
                best_s, best_i = _first_tile(s[:, :start], k, blo)
                s = s[:, start:]
            pos = 0
            while pos < s.shape[1]:  # column chunks no wider than the columns seen so far: ~k survivors a row each
                width = min(s.shape[1] - pos, max(blo + start + pos, SEED_COLUMNS))
                part = s[:, pos : pos + width]
                mask = np.greater(part, best_s[:, -1:], out=above[:m, :width])  # beats the row's k-th best
                flat = np.flatnonzero(mask)  # (cheaper than a 2-D nonzero)
                if len(flat):
                    rows, cols = np.divmod(flat, width)
                    merge_topk(best_s, best_i, rows, part[rows, cols], cols.astype(np.int64) + (blo + start + pos))
                pos += width
        assert best_s is not None and best_i is not None
        out_s[qlo : qlo + m], out_i[qlo : qlo + m] = best_s, best_i
    if ids is not None:
        found = out_i >= 0
        out_i[found] = np.asarray(ids, dtype=np.int64)[out_i[found]]
    return out_s, out_i

