"""Exact search against the bare GEMM rate, measured in one run (issue 14, part 2).

Three ways to answer the same queries exactly (``--n`` unit vectors of width ``--d``, ``--queries``
queries, top ``--k``), alternated ``--reps`` times so that all see the same machine load (the
machine is shared), each figure the median over the repetitions, as GFLOP/s (2·n·d·nq / s):

- ``gemm``: the bare matrix products of the same tiles, nothing else (the bound);
- ``faiss``: FAISS's own ``IndexFlatIP.search`` (its bundled OpenBLAS, heap top-k);
- ``engine``: the engine's Flat index (`indexes.FaissIndex.search` → `indexes.exact`: blocked
  GEMM through numpy's BLAS + threshold top-k).

It also prints which BLAS core each library picked (the cause found for FAISS's rate) and checks
that the engine's results equal FAISS's (same top-1 on every query, scores within 1e-5).

    python benchmarks/bench_exact.py                       # 100k x 768, 4,096 queries, k=5
    python benchmarks/bench_exact.py --n 20000 --reps 1    # quick check
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexes  # noqa: E402
from indexes.exact import BASE_BLOCK, QUERY_BLOCK  # noqa: E402


def blas_cores() -> dict[str, str]:
    """The OpenBLAS core each library's BLAS chose on this CPU (``?`` where it cannot be asked)."""
    import faiss

    out = {}
    for name, pattern, fn in (
        ("faiss", os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs", "libopenblas*"),
         "openblas_get_corename"),
        ("numpy", os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"),
         "scipy_openblas_get_corename64_"),
    ):
        out[name] = "?"
        for lib in glob.glob(pattern):
            try:
                f = getattr(ctypes.CDLL(lib), fn)
                f.restype = ctypes.c_char_p
                cfg = getattr(ctypes.CDLL(lib), fn.replace("corename", "config"))
                cfg.restype = ctypes.c_char_p
                out[name] = f"{f().decode()} ({cfg().decode()})"
            except (OSError, AttributeError):
                continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(args.queries, args.d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gflop = 2 * args.n * args.d * args.queries / 1e9
    bare_faiss = faiss.IndexFlatIP(args.d)
    bare_faiss.add(x)
    engine = indexes.create_index(args.d, "Flat")
    engine.add(x, np.arange(args.n))
    tile = np.empty((QUERY_BLOCK, BASE_BLOCK), dtype=np.float32)

    def gemm():
        for a in range(0, args.queries, QUERY_BLOCK):
            for b in range(0, args.n, BASE_BLOCK):
                qa, xb = q[a : a + QUERY_BLOCK], x[b : b + BASE_BLOCK]
                np.matmul(qa, xb.T, out=tile[: len(qa), : len(xb)])

    results: dict[str, object] = {}
    runs = {"gemm": gemm, "faiss": lambda: bare_faiss.search(q, args.k), "engine": lambda: engine.search(q, args.k)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    rate = {name: gflop / statistics.median(ts) for name, ts in times.items()}
    fs, fi = results["faiss"]  # type: ignore[misc]
    es, ei = results["engine"]  # type: ignore[misc]
    out = {
        "n": args.n, "d": args.d, "queries": args.queries, "k": args.k, "reps": args.reps,
        "gflops": {k: round(v, 1) for k, v in rate.items()},
        "engine_over_gemm": round(rate["engine"] / rate["gemm"], 3),
        "faiss_over_gemm": round(rate["faiss"] / rate["gemm"], 3),
        "same_top1": float(np.mean(fi[:, 0] == ei[:, 0])),
        "max_score_diff": float(np.abs(fs - es).max()),
        "blas": blas_cores(), "threads": {"faiss_omp": faiss.omp_get_max_threads()},
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
