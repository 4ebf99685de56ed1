"""Streaming alignment fit: d=768 → 768 from 1,000,000 synthetic pairs, memory and speed.

The fit's cost is accumulating the three co-moment matrices XᵀX, XᵀY, YᵀY: 3 GEMMs of shape
(d × n) · (n × d) over the whole corpus. Its physical bound on this machine is therefore the rate
of those same GEMMs, so the benchmark times, chunk by chunk and interleaved (other work on the
machine slows all alike), `SufficientStats.update` against three bare float32 matmuls of the same
chunk, in torch and in numpy, and reports the rates and the ratio to the faster bare one. Synthetic data are generated outside the timed
regions: X has unequal spreads and a few large offsets (as residual streams have), and
Y = (X − offset)·R + noise for a fixed random rotation R, which the Procrustes fit must recover.

Peak memory is the process's peak resident set (ru_maxrss) at the end of the fit, torch and
numpy and the benchmark's own data included, next to its value just before the first chunk.

    python benchmarks/bench_align_fit.py [--pairs 1000000] [--d 768] [--chunk 8192] [--feed 8192] [--json]

``--feed`` smaller than ``--chunk`` feeds pieces the size an activation batch gives and measures
the buffering as well.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from engine.align.fit import fit_map
from engine.align.stats import SufficientStats


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def square_gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=8192, help="rows per GEMM (SufficientStats.chunk_rows)")
    ap.add_argument("--feed", type=int, default=None, help="rows per update() call (default: --chunk)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the bare GEMMs (to see the fit's own memory without their BLAS workspaces)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d, chunk, feed = args.d, args.chunk, args.feed or args.chunk

    g = torch.Generator().manual_seed(args.seed)
    spread = torch.rand(d, generator=g) * 2.5 + 0.5  # (d,)
    offset = torch.zeros(d)
    offset[:4] = 100.0  # a few massive dimensions, as in real residual streams
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g))  # (d, d) ground-truth rotation

    stats = SufficientStats(d, d, chunk_rows=chunk)
    rss_before = peak_rss_mb()
    t_fit = t_bare = t_bare_np = 0.0
    done = 0
    i = 0
    # the synthetic data are generated in place, in three fixed buffers, so that the benchmark's own
    # data do not grow the process (fresh tensors per chunk left ~400 MB in the allocator's arenas)
    Xb, Yb, Tb = (torch.empty(feed, d) for _ in range(3))
    while done < args.pairs:
        c = min(feed, args.pairs - done)
        X, Y, T = Xb[:c], Yb[:c], Tb[:c]
        torch.randn(c, d, generator=g, out=X)
        X.mul_(spread).add_(offset)  # (c, d)
        torch.sub(X, offset, out=T)
        torch.mm(T, R, out=Y)  # (c, d) = (X − offset)·R
        torch.randn(c, d, generator=g, out=T)
        Y.add_(T, alpha=0.1)
        Xn, Yn = X.numpy(), Y.numpy()
        # rotate the order of the three timed steps so drifts in machine load hit all alike
        for step in np.roll(np.arange(3), i % 3) if not args.no_baseline else (0,):
            t = time.perf_counter()
            if step == 0:
                stats.update(X, Y)
                t_fit += time.perf_counter() - t
            elif step == 1:
                X.T @ X, X.T @ Y, Y.T @ Y  # noqa: B018 - the bare GEMMs are the point
                t_bare += time.perf_counter() - t
            else:
                Xn.T @ Xn, Xn.T @ Yn, Yn.T @ Yn  # noqa: B018
                t_bare_np += time.perf_counter() - t
        done += c
        i += 1
    t = time.perf_counter()
    stats.flush()
    t_fit += time.perf_counter() - t

    t = time.perf_counter()
    amap = fit_map(stats, "procrustes", scale=False)
    t_solve = time.perf_counter() - t
    err = float(np.abs(amap.weight - R.double().numpy()).max())
    peak_fit = peak_rss_mb()  # before the reference matmul below allocates its own matrices
    t_best = min(t_bare, t_bare_np) if not args.no_baseline else float("nan")

    flops = 3 * 2 * d * d * args.pairs
    out = {
        "pairs": args.pairs,
        "d": d,
        "chunk_rows": chunk,
        "feed_rows": feed,
        "threads": torch.get_num_threads(),
        "accumulate_s": round(t_fit, 3),
        "bare_gemm_torch_s": round(t_bare, 3),
        "bare_gemm_numpy_s": round(t_bare_np, 3),
        "accumulate_gflops": round(flops / t_fit / 1e9, 1),
        "bare_gemm_torch_gflops": round(flops / t_bare / 1e9, 1) if t_bare else None,
        "bare_gemm_numpy_gflops": round(flops / t_bare_np / 1e9, 1) if t_bare_np else None,
        "ratio": round(t_best / t_fit, 3),
        "square_gemm_gflops": round(square_gemm_gflops(), 1),
        "procrustes_solve_s": round(t_solve, 3),
        "rotation_max_abs_error": err,
        "peak_rss_mb": round(peak_fit, 1),
        "rss_before_first_chunk_mb": round(rss_before, 1),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"fit d={d}→{d} from {args.pairs:,} pairs, chunk {chunk}, fed {feed} rows at a time, "
          f"{out['threads']} threads")
    print(f"  accumulate (SufficientStats.update): {t_fit:7.2f} s  {out['accumulate_gflops']:6.1f} GFLOP/s")
    print(f"  bare float32 GEMMs, same shapes, torch: {t_bare:7.2f} s  {out['bare_gemm_torch_gflops']:6.1f} GFLOP/s")
    print(f"  bare float32 GEMMs, same shapes, numpy: {t_bare_np:7.2f} s  {out['bare_gemm_numpy_gflops']:6.1f} GFLOP/s")
    print(f"  ratio (faster bare / accumulate):    {out['ratio']:.3f}")
    print(f"  square 2048 matmul (torch), for reference:   {out['square_gemm_gflops']:6.1f} GFLOP/s")
    print(f"  Procrustes solve {t_solve:.2f} s; max |W − R| = {err:.2e}")
    print(f"  peak RSS {out['peak_rss_mb']:.0f} MB (before the first chunk: {out['rss_before_first_chunk_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
