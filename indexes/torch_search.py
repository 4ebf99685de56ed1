"""Exact inner-product top-k on a torch device: blocked GEMMs, a shortlist, an fp32 re-score.

The same answer as `indexes.exact.topk_inner_product` (exact search, ties aside) computed by
torch, so that bulk labelling runs on a GPU (``atlas label --device cuda``; issue 26):

- the base vectors go to the device once per search, in the GEMM precision (``dtype``: float16 on
  CUDA, float32 on the CPU) and, where the GEMM is not float32, also in float32 for the re-score;
- queries go in blocks; each block is scored against the base in tiles sized to the device's
  memory (`tile_budget`), and each tile's best ``shortlist`` columns per query are merged into the
  block's running shortlist with one ``topk`` over (running + new);
- in float16/bfloat16 the shortlist is wider than ``k`` (`shortlist_size`) and every candidate is
  re-scored in float32 (one batched product with its rows), so the rounding of the fast GEMM
  (~1e-3 on cosines) decides only which candidates are looked at, not their order: the k returned
  are the exact top k unless a true top-k vector scored below ``shortlist`` others in float16.

On the CPU (float32, no re-score) it is the reference the tests compare with brute force; the
engine's numpy path (`indexes.exact`) stays the faster one there.
Torch is imported on first use, never by ``import indexes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CPU_TILE_BYTES = 256 << 20  # a score tile on the CPU: the cache does not help beyond this
GPU_MEMORY_SHARE = 0.25  # of the device's free memory, for one block's score tiles
SHORTLIST_EXTRA = 32  # candidates beyond 2k kept for the fp32 re-score of a float16/bfloat16 GEMM

_DEVICE: str | None = None  # `set_search_device`: None searches with numpy (`indexes.exact`)
# The base vectors last searched, on their device: (key, float32 copy, GEMM-precision copy). A labelling
# run searches one index batch after batch; its base goes to the device once, not once per batch.
_RESIDENT: list[tuple[tuple[Any, ...], Any, Any]] = []


def set_search_device(device: str | None) -> None:
    """Search Flat indexes of this process on a torch ``device`` (``cpu``, ``cuda``, ``cuda:1``);
    None: with numpy (`indexes.exact`), the default. Checked here: a CUDA device must exist."""
    global _DEVICE
    if device is not None:
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"search device {device!r}: torch sees no CUDA device")
    _DEVICE = device


def search_device() -> str | None:
    """The device `set_search_device` chose (None: numpy)."""
    return _DEVICE


def shortlist_size(k: int, n: int, exact_gemm: bool) -> int:
    """Candidates kept per query before the re-score: ``k`` for a float32 GEMM, else 2k + `SHORTLIST_EXTRA`."""
    return min(n, k if exact_gemm else 2 * k + SHORTLIST_EXTRA)


def tile_budget(device: Any) -> int:
    """Bytes one block's score tiles may take on ``device`` (a ``torch.device``)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_SHARE)
    return CPU_TILE_BYTES


def resident(xb: np.ndarray, dev: Any, low: Any) -> tuple[Any, Any]:
    """``xb`` on ``dev`` in float32 and in ``low`` (the same tensor where ``low`` is float32), kept
    for the next search of the same array (same memory, shape, device and precision)."""
    import torch

    key = (xb.__array_interface__["data"][0], xb.shape, str(dev), str(low))
    if _RESIDENT and _RESIDENT[0][0] == key:
        return _RESIDENT[0][1], _RESIDENT[0][2]
    _RESIDENT.clear()  # the previous base leaves the device first
    x32 = torch.as_tensor(np.ascontiguousarray(xb, dtype=np.float32)).to(dev)  # (n, d)
    xl = x32 if low == torch.float32 else x32.to(low)
    _RESIDENT.append((key, x32, xl))
    return x32, xl


def topk_inner_product_torch(q: np.ndarray, xb: np.ndarray, k: int, ids: np.ndarray | None = None,
                             device: str = "cpu", dtype: str | None = None,
                             query_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``q @ xb.T`` per query on a torch ``device``: (scores (nq, k) float32, ids (nq, k) int64).

    ``dtype`` of the GEMM: ``float16``, ``bfloat16`` or ``float32`` (default float16 on CUDA, float32
    elsewhere); scores returned are float32 products whatever it is. ``ids`` maps row numbers to
    the caller's ids. Rows with fewer than ``k`` base vectors get -inf / -1 in the missing places.
    """
    import torch

    dev = torch.device(device)
    low = getattr(torch, dtype) if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    nq, n = len(q), len(xb)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return out_s, out_i
    exact_gemm = low == torch.float32
    c = shortlist_size(k, n, exact_gemm)
    x32, xl = resident(xb, dev, low)
    elem = torch.finfo(low).bits // 8
    budget = tile_budget(dev)
    qblock = query_block or max(1, min(nq, 8192, budget // max(1, 64 * elem * 1024)))
    base_block = max(c, min(n, budget // max(1, 2 * qblock * elem)))  # 2x: topk's own workspace
    with torch.inference_mode():
        for lo in range(0, nq, qblock):
            q32 = torch.as_tensor(np.ascontiguousarray(q[lo : lo + qblock], dtype=np.float32)).to(dev)
            ql = q32 if exact_gemm else q32.to(low)
            best_s = torch.full((len(q32), 0), -torch.inf, device=dev, dtype=torch.float32)
            best_i = torch.zeros((len(q32), 0), device=dev, dtype=torch.int64)
            for blo in range(0, n, base_block):
                s = ql @ xl[blo : blo + base_block].T  # (m, b) in the GEMM's precision
                ts, ti = torch.topk(s, min(c, s.shape[1]), dim=1)
                ts = ts.float()
                merged_s, merged_i = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + blo], 1)
                best_s, pos = torch.topk(merged_s, min(c, merged_s.shape[1]), dim=1)
                best_i = torch.gather(merged_i, 1, pos)
            if not exact_gemm:  # fp32 re-score of the shortlist: (m, c, d) · (m, d)
                best_s = torch.einsum("mcd,md->mc", x32[best_i], q32)
            top_s, pos = torch.topk(best_s, min(k, best_s.shape[1]), dim=1)
            top_i = torch.gather(best_i, 1, pos)
            kk = top_s.shape[1]
            out_s[lo : lo + len(q32), :kk] = top_s.cpu().numpy()
            out_i[lo : lo + len(q32), :kk] = top_i.cpu().numpy()
    if ids is not None:
        found = out_i >= 0
        out_i[found] = np.asarray(ids, dtype=np.int64)[out_i[found]]
    return out_s, out_i
