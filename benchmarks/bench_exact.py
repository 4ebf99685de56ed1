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

With ``--ivf NLIST`` it measures the IVF-Flat path instead (`indexes.ivf`: the queries that probe
a list scored against it in one GEMM) on SAE-like vectors (`bench_ann_scale.sae_like`): FAISS's own
``IndexIVFFlat.search`` against the engine's search of the same index, for each ``--nprobe``,
alternated as above, with the share of returned ids the two agree on::

    python benchmarks/bench_exact.py --ivf 1024 --nprobe 8,32,128 --queries 16384 -k 10
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
    ap.add_argument("--k", "-k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ivf", type=int, help="measure the IVF-Flat path with this many lists")
    ap.add_argument("--nprobe", default="8,32,128", help="with --ivf: the nprobe values to measure")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import faiss

    if args.ivf:
        return ivf_main(args)

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


def ivf_main(args: argparse.Namespace) -> None:
    import faiss

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ann_scale import perturb, sae_like

    rng = np.random.default_rng(0)
    base = rng.normal(size=(4096, args.d)).astype(np.float32)
    x = sae_like(args.n, base, 3, 0.3, rng)
    half = args.queries // 2
    q = np.concatenate([perturb(x[rng.choice(args.n, half)], 0.9, rng), sae_like(args.queries - half, base, 3, 0.3, rng)])
    engine = indexes.create_index(args.d, f"IVF{args.ivf},Flat")
    engine.train(x[: min(args.n, 64 * args.ivf)])
    engine.add(x, np.arange(args.n))
    rows = []
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        faiss.extract_index_ivf(engine._index).nprobe = nprobe
        runs = {"faiss": lambda: engine._index.search(q, args.k), "engine": lambda: engine.search(q, args.k)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        results = {}
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        fi, ei = results["faiss"][1], results["engine"][1]
        rows.append({"nprobe": nprobe, "faiss_s": round(med["faiss"], 3), "engine_s": round(med["engine"], 3),
                     "speedup": round(med["faiss"] / med["engine"], 2),
                     "same_ids": float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(fi, ei)]))})
        print(rows[-1], flush=True)
    out = {"n": args.n, "d": args.d, "lists": args.ivf, "queries": args.queries, "k": args.k, "reps": args.reps,
           "rows": rows, "threads": {"faiss_omp": faiss.omp_get_max_threads()}, "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
