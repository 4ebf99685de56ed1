"""Out of core on one machine: peak RAM of importing a big atlas, and one lookup on it (issue 14, part 1).

Writes ``--n`` SAE-like directions of width ``--d`` (sparse combinations of base directions plus
noise: `bench_ann_scale.sae_like`, seed 0) to a ``.npy`` a chunk at a time, then times two
commands as whole processes with ``/usr/bin/time -v`` (wall time, peak resident set size):

- ``atlas import-sae X.npy --index-spec SPEC`` into a fresh store: the import's peak RSS against
  the size of the index file it wrote (the bound: 1.5 × the index);
- ``atlas neighbors big/5 -k 3`` on that store, ``--lookups`` times (the first after the import,
  with the page cache as the import left it): wall time and peak RSS of each.

    python benchmarks/bench_import_scale.py --n 100000                 # quick check, HNSW32
    python benchmarks/bench_import_scale.py --n 1000000 --spec HNSW32  # the issue's 1M figure
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ann_scale import sae_like  # noqa: E402


def write_matrix(path: Path, n: int, d: int, n_base: int, k_active: int, noise: float, chunk: int = 50_000) -> bool:
    """The atlas directions as a ``.npy``, generated and written a chunk at a time.

    A matrix left in the work folder by an earlier run with the same parameters (recorded next to
    it) is kept: at 1M x 768 it takes minutes to write. Returns whether it was written.
    """
    params = path.with_suffix(".params.json")
    wanted = json.dumps({"n": n, "d": d, "n_base": n_base, "k_active": k_active, "noise": noise, "seed": 0})
    if path.exists() and params.exists() and params.read_text() == wanted:
        return False
    params.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n_base, d)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, chunk):
        out[lo : lo + chunk] = sae_like(min(chunk, n - lo), base, k_active, noise, rng)
    out.flush()
    del out
    params.write_text(wanted)
    return True


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall seconds and peak RSS (GB); fails loudly."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return {"wall_s": round(secs, 2), "peak_rss_gb": round(rss_kb / 2**20, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--spec", default="HNSW32", help="index spec of the import (default HNSW32, as the issue)")
    ap.add_argument("--n-base", type=int, default=4096)
    ap.add_argument("--k-active", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--lookups", type=int, default=3)
    ap.add_argument("--work", type=Path, help="folder for the matrix and the store (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="atlas-import-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATLAS_QUIET": "1"}
    try:
        matrix, store = work / "x.npy", work / "store"
        t0 = time.perf_counter()
        wrote = write_matrix(matrix, args.n, args.d, args.n_base, args.k_active, args.noise)
        print(f"{args.n}x{args.d} {'written' if wrote else 'kept from an earlier run'} in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        shutil.rmtree(store, ignore_errors=True)
        cli = [sys.executable, "-m", "engine.cli"]
        subprocess.run([*cli, "init", "--store", str(store)], env=env, check=True, capture_output=True)
        imp = timed([*cli, "import-sae", str(matrix), "--name", "big", "--model", "m", "--layer", "0",
                     "--index-spec", args.spec, "--store", str(store)], env)
        index_file = next((store / "indexes").glob("big@*.faiss"))
        index_gb = index_file.stat().st_size / 2**30
        print(f"import: {imp}, index file {index_gb:.3f} GB", flush=True)
        lookups = [timed([*cli, "neighbors", "big/5", "-k", "3", "--store", str(store)], env)
                   for _ in range(args.lookups)]
        print(f"neighbors: {lookups}", flush=True)
        out = {
            "n": args.n, "d": args.d, "spec": args.spec, "matrix_gb": round(matrix.stat().st_size / 2**30, 3),
            "index_gb": round(index_gb, 3), "import": imp,
            "import_rss_over_index": round(imp["peak_rss_gb"] / index_gb, 2), "neighbors": lookups,
            "load_avg_1min": os.getloadavg()[0],
        }
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
