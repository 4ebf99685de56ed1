"""Milvus Lite against FAISS: build time, QPS and recall@10 vs exact search on the same vectors.

The atlas and the held-out queries are `bench_ann_scale`'s (SAE-like sparse combinations of base
directions plus noise; half the queries perturbed atlas directions, half fresh combinations).
Each spec is built on both backends through the engine's `VectorIndex` interface (FAISS in memory,
Milvus in a collection of a Milvus Lite folder in a temporary directory); exact top-10 is the FAISS
``Flat`` index. QPS is measured in batches of ``--batch`` queries and one query at a time (a
server's usual load), alternating backends chunk by chunk so both see the same machine load.
Recall@10 = |top-10 ∩ exact top-10| / 10.

    # one thread per backend, so a shared machine's load does not decide the ranking (OpenMP
    # threads spin badly on busy cores); both backends run in this one process
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice -n 10 python benchmarks/bench_milvus.py   # 100k x 256
    nice -n 10 python benchmarks/bench_milvus.py --n 20000 --specs 'Flat;HNSW32'   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ann_scale import held_out_queries, recall_at, sae_like  # noqa: E402

import indexes  # noqa: E402
from indexes.policy import ANN_SPEC  # noqa: E402


def timed(index, q: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    ids = np.concatenate([index.search(q[i : i + batch], k)[1] for i in range(0, len(q), batch)])
    return ids, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n-base", type=int, default=4096)
    ap.add_argument("--k-active", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--single", type=int, default=200, help="queries searched one at a time")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--query-seed", type=int, default=2)
    ap.add_argument("--specs", default=f"Flat;{ANN_SPEC}", help="index specs separated by ';' (default: Flat "
                    "and the engine's ANN spec)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]

    rng = np.random.default_rng(0)
    base = rng.normal(size=(args.n_base, args.d)).astype(np.float32)
    x = sae_like(args.n, base, args.k_active, args.noise, rng)
    q = held_out_queries(x, lambda m, r: sae_like(m, base, args.k_active, args.noise, r), args.queries, args.query_seed)
    ids = np.arange(args.n, dtype=np.int64)
    exact = indexes.create_index(args.d, "Flat")
    exact.add(x, ids)
    exact_ids = timed(exact, q, args.k, 1000)[0]
    print(f"atlas {args.n}x{args.d}, {len(q)} held-out queries", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        uri = str(Path(tmp) / "bench.db")
        for n_spec, spec in enumerate(specs):
            built = {}
            for backend in ("faiss", "milvus"):
                where = {"uri": uri, "collection": f"bench_{n_spec}"} if backend == "milvus" else {}
                t0 = time.perf_counter()
                ix = indexes.create_index(args.d, spec, backend, **where)
                ix.add(x, ids)
                built[backend] = (ix, time.perf_counter() - t0)
                print(f"{backend} {spec}: built in {built[backend][1]:.1f}s", flush=True)
            got: dict[str, list] = {b: [] for b in built}
            t_batch = dict.fromkeys(built, 0.0)
            for lo in range(0, len(q), 500):  # alternate backends over chunks: same load for both
                for b, (ix, _) in built.items():
                    part, dt = timed(ix, q[lo : lo + 500], args.k, args.batch)
                    got[b].append(part)
                    t_batch[b] += dt
            t_single = dict.fromkeys(built, 0.0)
            for lo in range(0, args.single, 50):
                for b, (ix, _) in built.items():
                    t_single[b] += timed(ix, q[lo : lo + 50], args.k, 1)[1]
            for b, (ix, build_s) in built.items():
                ann = np.concatenate(got[b])
                row = {"backend": b, "spec": spec, "build_s": round(build_s, 1),
                       "recall_at_10": round(recall_at(ann, exact_ids), 4),
                       "qps_batched": round(len(q) / t_batch[b], 1), "qps_single": round(args.single / t_single[b], 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
                if b == "milvus":
                    ix.drop()
    out = {"n": args.n, "d": args.d, "omp_threads": _omp_threads(), "load_avg_1m": round(os.getloadavg()[0], 1), "queries": len(q), "query_seed": args.query_seed, "batch": args.batch,
           "milvus_lite": _version("milvus_lite"), "pymilvus": _version("pymilvus"), "results": results}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def _omp_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
