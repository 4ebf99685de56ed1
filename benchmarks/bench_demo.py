"""How long `atlas demo --size tiny` takes on a fresh store: the README's first command, timed.

Each run is the whole command as a process (`python -m engine.cli demo --size tiny --store S
--out O --json`) on a new, empty store, so the ConceptWorld models, their SAEs, the maps and every
evaluation are computed from nothing, as on a newcomer's machine. It prints, per run: wall time,
the process's CPU time (user + sys of the command and its children), the load average before and
after (this machine is shared: other jobs' load inflates wall time, never CPU time), and the
demo's own per-stage timings (``timings`` in report.json), slowest first.

    python benchmarks/bench_demo.py                  # one fresh-store run
    python benchmarks/bench_demo.py --runs 3 --json  # three, and the figures as JSON
    python benchmarks/bench_demo.py --world DIR      # a copy of a built tiny world's models (world-tiny-<fp>):
                                                     # all but the models' training, NOT the fresh-store time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(work: Path, world: Path | None, quick: bool) -> dict:
    store, out = work / "store", work / "out"
    if world is not None:  # not fresh: a copy of the world's trained models (SAEs and directions are recomputed)
        shutil.copytree(world, store / "models" / world.name, ignore=shutil.ignore_patterns("saes", "directions"))
    cmd = [sys.executable, "-m", "engine.cli", "demo", "--size", "tiny", "--store", str(store), "--out", str(out),
           "--json"] + (["--quick"] if quick else [])
    env = {**os.environ, "ATLAS_QUIET": "1", "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()
    cpu0, t0 = _cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(f"atlas demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after], "fresh_store": world is None, "quick": quick,
            "timings": dict(sorted(result["timings"].items(), key=lambda kv: -kv[1])),
            "cpu_timings": result.get("cpu_timings", {}),
            "world_reused": result["world"]["reused"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--world", type=Path, help="a built tiny world folder to reuse (then not a fresh-store time)")
    ap.add_argument("--quick", action="store_true", help="time `atlas demo --quick` (what CI runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the start", file=sys.stderr)
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
            r = run_once(Path(tmp), args.world, args.quick)
        runs.append(r)
        if not args.json:
            print(f"run {i + 1}: wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, load average "
                  f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} (1 min), "
                  f"{'fresh store' if r['fresh_store'] else 'world reused'}")
            print(f"  {'stage':<20} {'wall s':>8} {'cpu s':>8}")
            for stage, s in r["timings"].items():
                cpu = r["cpu_timings"].get(stage)
                print(f"  {stage:<20} {s:8.1f} {'' if cpu is None else f'{cpu:8.1f}'}")
    if args.json:
        print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
