"""The IVF GEMM path (`indexes.ivf`): probes from a partition of the centroid scores, the staged
bounds, and the bfloat16 scoring of the lists (``bf16=1``), checked against brute force over the
lists FAISS probes (its own ``IndexIVFFlat.search``, which is exact inside the probed lists)."""

from __future__ import annotations

import numpy as np
import pytest

import indexes
from indexes import faiss_backend, ivf
from indexes.ivf import bf16_lists, bf16_margin, ivf_topk, padded, probes
from tests.conftest import clustered_directions


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(x: np.ndarray, spec: str) -> faiss_backend.FaissIndex:
    ix = indexes.create_index(x.shape[1], spec)
    assert isinstance(ix, faiss_backend.FaissIndex)
    ix.add(x, np.arange(len(x), dtype=np.int64) * 3 + 7)
    return ix


def _same_as_faiss(ix, q: np.ndarray, got_s: np.ndarray, got_i: np.ndarray, x: np.ndarray, k: int) -> None:
    """The scores FAISS's IVF search finds (exact inside the same lists), each id's true score the one reported."""
    want_s, want_i = ix._index.search(q, k)
    found = want_i >= 0
    np.testing.assert_array_equal(got_i >= 0, found)
    np.testing.assert_allclose(got_s[found], want_s[found], rtol=1e-5, atol=1e-5)
    rows = (np.where(found, got_i, 7) - 7) // 3
    np.testing.assert_allclose(np.take_along_axis(q @ x.T, rows, 1)[found], got_s[found], atol=1e-5)
    assert all(len(set(r) - {-1}) == (r >= 0).sum() for r in got_i)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nprobe", [1, 2, 5, 16])
def test_probes_are_faiss_lists_ordered_by_list(monkeypatch, nprobe, threads):
    """Each query's first list is its nearest centroid, its early set ranks 2..early+1 and the rest
    the others of its nprobe nearest (FAISS's quantizer's answer), pairs ordered by list across chunks."""
    monkeypatch.setattr(ivf, "PROBE_CHUNK", 37)  # several chunks, merged
    rng = np.random.default_rng(1)
    c = _unit(rng.normal(size=(16, 12)).astype(np.float32))
    q = _unit(rng.normal(size=(200, 12)).astype(np.float32))
    want = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :nprobe]
    first, sets = probes(q, c, nprobe, threads, early=3)
    np.testing.assert_array_equal(first, want[:, 0])
    got: list[list[set[int]]] = [[] for _ in sets]
    for j, (rows, starts) in enumerate(sets):
        assert len(starts) == 17 and starts[-1] == len(rows)
        per: list[set[int]] = [set() for _ in range(200)]
        for li in range(16):
            part = rows[starts[li] : starts[li + 1]]
            assert (np.diff(part) > 0).all()  # each list's queries once, in order
            for r in part.tolist():
                per[r].add(li)
        got[j] = per
    expect = [[set(w[1:4].tolist()), set(w[4:].tolist())] for w in want]
    sizes = [s for s in (min(3, nprobe - 1), max(0, nprobe - 4)) if s]
    assert len(sets) == len(sizes)
    for r in range(200):
        have = [got[j][r] for j in range(len(sets))]
        assert have == [e for e, n in zip(expect[r], (min(3, nprobe - 1), max(0, nprobe - 4))) if n]


def test_padded_sizes_are_few_and_close():
    sizes = [padded(n) for n in range(1, 5000)]
    assert all(p >= n for n, p in zip(range(1, 5000), sizes))
    assert all(p <= n * 1.125 for n, p in zip(range(1, 5000), sizes) if n >= 128)
    assert len(set(sizes)) < 120  # a few dozen kernels per power of two range at most


def _near_ties(n: int = 3000, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Clustered directions with many near-ties (copies moved by 1e-4, below bfloat16's resolution)
    and exact duplicates, queries near indexed vectors and far from all."""
    rng = np.random.default_rng(7)
    x = _unit(clustered_directions(n, d, seed=8))
    x[1500:2000] = _unit(x[1000:1500] + 1e-4 * rng.normal(size=(500, d)).astype(np.float32))
    x[2000:2100] = x[1900:2000]
    q = _unit(np.concatenate([x[rng.choice(n, 600)] + 0.03 * rng.normal(size=(600, d)).astype(np.float32),
                              rng.normal(size=(faiss_backend.IVF_GEMM_MIN_QUERIES, d)).astype(np.float32)]))
    return x, q


@pytest.mark.parametrize("nprobe", [1, 4, 16])
def test_bf16_scoring_returns_the_float32_answers(nprobe):
    """``bf16=1``: the lists scored in bfloat16 first, then the survivors in float32 — the same
    answers as FAISS's exact IVF search, near-ties below bfloat16's resolution included."""
    x, q = _near_ties()
    ix = _index(x, f"IVF16,Flat|nprobe={nprobe},bf16=1")
    assert ix._ivf_lists() is not None
    got_s, got_i = ix.search(q, 10)
    assert ix._low is not None  # the bfloat16 lists were built and used
    _same_as_faiss(ix, q, got_s, got_i, x, 10)
    # queries of any norm: the margin scales with it
    big_s, big_i = ix.search(3.0 * q, 10)
    _same_as_faiss(ix, 3.0 * q, big_s, big_i, x, 10)


def test_bf16_margin_covers_the_rounding():
    """The bfloat16 product of random vectors stays within the stated margin of the float32 one."""
    import torch

    rng = np.random.default_rng(0)
    for d in (8, 96, 768):
        a = rng.standard_t(2, size=(300, d)).astype(np.float32)  # heavy tails: large and small entries
        b = rng.standard_t(2, size=(200, d)).astype(np.float32)
        exact = a.astype(np.float64) @ b.T.astype(np.float64)
        low = torch.mm(torch.from_numpy(a).bfloat16(), torch.from_numpy(np.ascontiguousarray(b.T)).bfloat16())
        err = np.abs(low.float().numpy() - exact)
        scale = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :]
        assert (err <= bf16_margin(d) * scale).all()


def test_staged_bounds_and_blocks_keep_the_answers(monkeypatch):
    """Several query blocks, one worker or two, early sets of every size: the same answers."""
    x, q = _near_ties()
    ix = _index(x, "IVF16,Flat|nprobe=8")
    ivf_lists = ix._ivf_lists()
    assert ivf_lists is not None
    centroids, lists = ivf_lists
    want_s, _ = ix.search(q, 10)
    low = bf16_lists(lists)
    for early in (0, 1, 7, 20):  # used with low only; the float32 runs check they do not depend on it
        monkeypatch.setattr(ivf, "EARLY_LISTS", early)
        for kw in ({"query_block": 97}, {"threads": 1}, {"low": low, "query_block": 300}):
            s, _ = ivf_topk(q, centroids, lists, 10, 8, **kw)
            np.testing.assert_allclose(s, want_s, atol=1e-5)
