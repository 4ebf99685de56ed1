"""The blocked torch search (`indexes.torch_search`): exact top-k on a torch device, checked on the
CPU against brute force (float32, and bfloat16 with the fp32 re-score), through a Flat index with
`set_search_device`, and on CUDA where a GPU is present (``-m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import indexes
from indexes import torch_search
from indexes.exact import topk_inner_product
from indexes.torch_search import set_search_device, topk_inner_product_torch
from tests.conftest import clustered_directions

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int = 1200, d: int = 48, nq: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = _unit(clustered_directions(n, d, seed=4))
    x[600:650] = x[550:600]  # exact duplicates: ties across tiles
    q = _unit(np.concatenate([x[rng.choice(n, nq // 2)] + 0.05 * rng.normal(size=(nq // 2, d)).astype(np.float32),
                              rng.normal(size=(nq - nq // 2, d)).astype(np.float32)]))
    return x, q


def _check_exact(q, x, got_s, got_i, k):
    """Scores are brute force's top-k; every returned row's true score is the one reported."""
    full = q @ x.T
    want_s = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, got_i, 1), got_s, atol=1e-5)
    assert all(len(set(r)) == len(r) for r in got_i.tolist())


@pytest.fixture(autouse=True)
def _fresh():
    yield
    set_search_device(None)
    torch_search._RESIDENT.clear()


@pytest.mark.parametrize("tile_bytes", [4096, 1 << 20, torch_search.CPU_TILE_BYTES])
def test_cpu_float32_equals_brute_force_over_tiles_and_blocks(monkeypatch, tile_bytes):
    monkeypatch.setattr(torch_search, "CPU_TILE_BYTES", tile_bytes)  # small: many base tiles per block
    x, q = _data()
    s, i = topk_inner_product_torch(q, x, 10, device="cpu", query_block=37)
    _check_exact(q, x, s, i, 10)


def test_bfloat16_gemm_with_fp32_rescore_returns_the_exact_top_k():
    """The fast GEMM only chooses the shortlist: the returned scores are float32 products, and the
    top k are brute force's (bfloat16 keeps 8 bits of mantissa: its own order is often wrong)."""
    x, q = _data()
    low = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(x).bfloat16().T).float().numpy()
    assert (np.argmax(low, 1) != np.argmax(q @ x.T, 1)).any() or np.abs(low - q @ x.T).max() > 1e-3
    s, i = topk_inner_product_torch(q, x, 10, device="cpu", dtype="bfloat16")
    _check_exact(q, x, s, i, 10)


def test_fewer_base_vectors_than_k_and_caller_ids():
    x, q = _data(n=6, nq=4)
    ids = np.arange(6, dtype=np.int64) * 7 + 3
    s, i = topk_inner_product_torch(q, x, 9, ids=ids, device="cpu")
    assert (i[:, 6:] == -1).all() and np.isinf(s[:, 6:]).all()
    np.testing.assert_array_equal(np.sort(i[:, :6], 1), np.tile(ids, (4, 1)))
    empty_s, empty_i = topk_inner_product_torch(q, x[:0], 3, device="cpu")
    assert (empty_i == -1).all() and np.isinf(empty_s).all()


def test_flat_index_searches_on_the_chosen_device_with_the_same_rows():
    """`set_search_device` sends a Flat index's many-query searches through torch: the same rows
    (up to ties) as the numpy path, the base kept on the device across searches."""
    x, q = _data()
    ids = np.arange(len(x), dtype=np.int64) * 2 + 1
    ix = indexes.create_index(x.shape[1], "Flat")
    ix.add(x, ids)
    numpy_s, numpy_i = ix.search(q, 10)
    set_search_device("cpu")
    torch_s, torch_i = ix.search(q, 10)
    np.testing.assert_allclose(torch_s, numpy_s, atol=1e-5)
    _check_exact(q, x, torch_s, (torch_i - 1) // 2, 10)
    clear = torch_s > torch_s[:, -1:] + 1e-5  # above the k-th score by more than rounding: no tie decides
    assert all(set(t[c]) == set(n[c]) for t, n, c in zip(torch_i, numpy_i, clear))
    assert len(torch_search._RESIDENT) == 1
    ix.search(q[:50], 10)
    assert len(torch_search._RESIDENT) == 1  # the second search reused the device copy
    np.testing.assert_allclose(topk_inner_product(q, x, 10)[0], torch_s, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_cuda_search_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        set_search_device("cuda")
    assert torch_search.search_device() is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_search_equals_brute_force(dtype):
    x, q = _data(n=20000, d=96, nq=3000)
    s, i = topk_inner_product_torch(q, x, 10, device="cuda", dtype=dtype)
    _check_exact(q, x, s, i, 10)
