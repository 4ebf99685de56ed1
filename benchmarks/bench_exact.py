"""Exact search against the bare GEMM rate, measured in one run (issue 14, part 2).

Three ways to answer the same queries exactly (``--n`` unit vectors of width ``--d``, ``--queries``
queries, top ``--k``), alternated ``--reps`` times so that all see the same machine load (the
machine is shared), each figure the median over the repetitions, as GFLOP/s (2·n·d·nq / s):

- ``gemm``: the bare matrix products of the same tiles, nothing else (the bound);
- ``faiss``: FAISS's own ``IndexFlatIP.search`` (its bundled OpenBLAS, heap top-k);
- ``engine``: the engine's Flat index (`indexes.FaissIndex.search` → `indexes.exact`: blocked
  GEMM through numpy's BLAS + threshold top-k);
- ``previous``: `indexes.exact` as it was at git revision ``--previous`` (default the base of
  issue 26), loaded from git into this process, so the gain is measured in the same run.

The bare GEMM uses numpy's BLAS on all cores over (1024 × 16384) tiles, the fastest tiling
measured for one multi-threaded GEMM; it does not follow the engine's tile sizes, so the bound
stays put when they change.

It also prints which BLAS core each library picked (the cause found for FAISS's rate) and checks
that the engine's results equal FAISS's (same top-1 on every query, scores within 1e-5).

    python benchmarks/bench_exact.py                       # 100k x 768, 4,096 queries, k=5
    python benchmarks/bench_exact.py --n 20000 --reps 1    # quick check

With ``--ivf NLIST`` it measures the IVF-Flat path instead (`indexes.ivf`: the queries that probe
a list scored against it in one GEMM) on SAE-like vectors (`bench_ann_scale.sae_like`): FAISS's own
``IndexIVFFlat.search`` against the engine's search of the same index, for each ``--nprobe``,
alternated as above, with the share of returned ids the two agree on, the scoring rate (the
flops of the scores an IVF search computes, 2·d per probed list vector, over its time) against a
bare GEMM of as many flops, and the previous code (``--previous``); ``--bf16`` adds the bfloat16
list scoring (spec ``bf16=1``, checked to return the float32 path's scores), ``--generator hard``
the atlas k-means cannot align lists with (`bench_ann_scale.sae_hard`); CPU seconds per method
are printed too (the robust figure on a shared machine)::

    python benchmarks/bench_exact.py --ivf 1024 --nprobe 8,32,128 --queries 16384 -k 10
    python benchmarks/bench_exact.py --ivf 1024 --n 100000 --nprobe 16,64 --queries 8192 -k 10 --reps 2 --bf16

At the moonshot's scale (a measured fraction: 32,768 of the 1M features against the whole 1M
atlas, its IVF4096 lists, the nprobe that reached recall 0.95)::

    nice -n 10 python benchmarks/bench_exact.py --ivf 4096 --n 1000000 --nprobe 256 --queries 32768 -k 10 \
        --reps 1 --bf16 --no-faiss --previous '' --recall-sample 1000
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEMM_TILE = (1024, 16384)  # the bare GEMM's (queries, base rows) per product
PREVIOUS = "01ebf20"  # the base of issue 26


def previous_module(rev: str, path: str = "indexes/exact.py") -> types.ModuleType | None:
    """``path`` as it was at git revision ``rev``, loaded as a module (None outside a git checkout)."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"previous_{path.replace('/', '_').removesuffix('.py')}")
    sys.modules[mod.__name__] = mod  # dataclasses and annotations look the module up
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    return mod


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
    ap.add_argument("--generator", default="structured", choices=["structured", "hard"],
                    help="with --ivf: the atlas's generator (bench_ann_scale.generate)")
    ap.add_argument("--recall-sample", type=int, default=0, help="with --ivf: queries whose recall@k against "
                    "exact search is measured")
    ap.add_argument("--no-faiss", action="store_true", help="with --ivf: skip FAISS's own search (slow at scale)")
    ap.add_argument("--bf16", action="store_true", help="with --ivf: also time the bfloat16 list scoring (bf16=1)")
    ap.add_argument("--device", help="measure the torch path (indexes.torch_search) on this device instead")
    ap.add_argument("--dtype", default=None, help="with --device: the GEMM's precision (default float16 on CUDA)")
    ap.add_argument("--previous", default=PREVIOUS, help="git revision of the previous code to time against ('' skips it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import faiss

    if args.ivf:
        return ivf_main(args)
    if args.device:
        return device_main(args)

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
    tile = np.empty(GEMM_TILE, dtype=np.float32)

    def gemm():
        for a in range(0, args.queries, GEMM_TILE[0]):
            for b in range(0, args.n, GEMM_TILE[1]):
                qa, xb = q[a : a + GEMM_TILE[0]], x[b : b + GEMM_TILE[1]]
                np.matmul(qa, xb.T, out=tile[: len(qa), : len(xb)])

    results: dict[str, object] = {}
    runs = {"gemm": gemm, "faiss": lambda: bare_faiss.search(q, args.k), "engine": lambda: engine.search(q, args.k)}
    old = previous_module(args.previous) if args.previous else None
    if old is not None:
        runs["previous"] = lambda: old.topk_inner_product(q, x, args.k)
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
        "engine_over_faiss": round(rate["engine"] / rate["faiss"], 3),
        **({"previous_over_gemm": round(rate["previous"] / rate["gemm"], 3)} if "previous" in rate else {}),
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
    from bench_ann_scale import generate, perturb

    from engine.util import unit_rows
    from indexes.exact import topk_inner_product
    from indexes.ivf import bf16_lists, ivf_topk

    rng = np.random.default_rng(0)
    x, fresh = generate(args.generator, args.n, args.d, rng)
    x = unit_rows(x)  # as the store indexes them
    half = args.queries // 2
    q = np.concatenate([perturb(x[rng.choice(args.n, half)], 0.9, rng), fresh(args.queries - half, rng)])
    engine = indexes.create_index(args.d, f"IVF{args.ivf},Flat")
    engine.train(x[: min(args.n, 64 * args.ivf)])
    engine.add(x, np.arange(args.n))
    centroids, lists = engine._ivf_lists()  # type: ignore[attr-defined, misc]
    low = bf16_lists(lists) if args.bf16 else None
    sample = np.random.default_rng(3).choice(len(q), min(args.recall_sample, len(q)), replace=False)
    exact_sample = topk_inner_product(q[sample], x, args.k)[1] if len(sample) else None
    sizes = np.array([len(v) for v, _ in lists])
    old = previous_module(args.previous, "indexes/ivf.py") if args.previous else None
    tile = np.empty(GEMM_TILE, dtype=np.float32)
    xg, qg = x[: GEMM_TILE[1]], q[: GEMM_TILE[0]]
    rows = []
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        faiss.extract_index_ivf(engine._index).nprobe = nprobe  # type: ignore[attr-defined]
        probe = topk_inner_product(q, centroids, nprobe)[1]
        gflop = 2 * args.d * float(sizes[probe].sum()) / 1e9  # the scores an IVF search computes
        gemm_reps = max(1, round(gflop / (2 * args.d * GEMM_TILE[0] * len(xg) / 1e9)))

        def gemm(reps: int = gemm_reps) -> None:  # bare GEMM of as many flops, the bound
            for _ in range(reps):
                np.matmul(qg, xg.T, out=tile[: len(qg), : len(xg)])

        runs = {"gemm": gemm, "faiss": lambda: engine._index.search(q, args.k),  # type: ignore[attr-defined]
                "engine": lambda: engine.search(q, args.k)}
        if args.no_faiss:
            del runs["faiss"]
        if low is not None:
            runs["engine_bf16"] = lambda p=nprobe: ivf_topk(q, centroids, lists, args.k, p, low=low)
        if old is not None:
            runs["previous"] = lambda p=nprobe: old.ivf_topk(q, centroids, lists, args.k, p)
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        results = {}
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        gemm_rate = gemm_reps * 2 * args.d * len(qg) * len(xg) / 1e9 / med["gemm"]
        row = {"nprobe": nprobe, "gflop": round(gflop, 1), "engine_s": round(med["engine"], 3),
               "engine_over_gemm": round(gflop / med["engine"] / gemm_rate, 3), "gemm_gflops": round(gemm_rate, 1)}
        if "faiss" in results:
            fi, ei = results["faiss"][1], results["engine"][1]
            row.update({"faiss_s": round(med["faiss"], 3), "speedup": round(med["faiss"] / med["engine"], 2),
                        "same_ids": float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(fi, ei)]))})
        if "previous" in med:
            row["previous_s"] = round(med["previous"], 3)
            row["previous_over_gemm"] = round(gflop / med["previous"] / gemm_rate, 3)
        if "engine_bf16" in med:
            row["engine_bf16_s"] = round(med["engine_bf16"], 3)
            row["engine_bf16_over_gemm"] = round(gflop / med["engine_bf16"] / gemm_rate, 3)
            row["bf16_same_scores"] = bool(np.allclose(results["engine_bf16"][0], results["engine"][0], atol=1e-5))
        row["cpu_s"] = {name: round(statistics.median(c), 2) for name, c in cpu.items()}
        if exact_sample is not None:  # recall@k of the IVF answer (the engine's) against exact search
            got = results["engine"][1][sample]
            row[f"recall_at_{args.k}"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got, exact_sample)]))
        rows.append(row)
        print(rows[-1], flush=True)
    out = {"n": args.n, "d": args.d, "lists": args.ivf, "generator": args.generator, "queries": args.queries, "k": args.k, "reps": args.reps,
           "rows": rows, "threads": {"faiss_omp": faiss.omp_get_max_threads()}, "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def device_main(args: argparse.Namespace) -> None:
    """1M x 1M on one GPU (``--device cuda --n 1000000 --queries 1000000``): the torch path's time,
    its rate, and its top-k checked on a sample of queries against a float32 GEMM on the same device."""
    import torch

    from indexes.torch_search import topk_inner_product_torch

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1).numpy()
    q = torch.nn.functional.normalize(torch.randn(args.queries, args.d, generator=g), dim=1).numpy()
    dev = torch.device(args.device)
    gflop = 2 * args.n * args.d * args.queries / 1e9
    times = []
    for _ in range(args.reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        s, i = topk_inner_product_torch(q, x, args.k, device=args.device, dtype=args.dtype)
        times.append(time.perf_counter() - t0)
    sample = np.random.default_rng(1).choice(args.queries, min(1024, args.queries), replace=False)
    with torch.inference_mode():
        full = torch.from_numpy(q[sample]).to(dev) @ torch.from_numpy(x).to(dev).T  # float32 reference
        want_s, want_i = (t.cpu().numpy() for t in torch.topk(full, args.k, dim=1))
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(i[sample], want_i)]))
    out = {"device": args.device, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "dtype": args.dtype or ("float16" if dev.type == "cuda" else "float32"), "n": args.n, "d": args.d,
           "queries": args.queries, "k": args.k, "seconds": [round(t, 2) for t in times],
           "gflops": round(gflop / min(times), 1), f"recall@{args.k}_vs_fp32": recall,
           "max_score_diff": float(np.abs(s[sample] - want_s).max()), "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
