"""`atlas serve` under load on loopback: N requests from C concurrent clients, latency percentiles.

Builds a store with one labelled atlas (``--concepts`` directions of width ``--dim``, labels and
descriptions from a small vocabulary), starts ``atlas serve`` on it as its own process (uvicorn on
127.0.0.1, a free port), and sends ``--requests`` requests from ``--clients`` threads, each with
its own keep-alive connection. The mix is what the explorer's pages ask for: text lookup (40%),
a concept page (25%), a concept's neighbours (20%), the atlas list (10%) and the page itself (5%),
over concepts and words drawn at random (seeded). Prints p50 / p95 / p99 / max latency, errors
(any status other than 200, or a failed connection) and the server's CPU seconds.

    python benchmarks/bench_serve_load.py [--requests 2000] [--clients 8] [--concepts 20000] [--dim 64]

Explain and steer (a forward pass, a generation) are not in the mix: they measure the model,
not the server (benchmarks/bench_steering.py, bench_devices.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["rain", "storm", "music", "piano", "river", "forest", "city", "market", "winter", "summer", "stone",
         "glass", "engine", "garden", "ocean", "mountain", "letter", "number", "colour", "animal", "bird", "fish"]


def build_store(root: Path, n: int, dim: int) -> None:
    from engine.store.store import AtlasSource, Store

    rng = np.random.default_rng(0)
    labels = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(n)]
    descriptions = [" ".join(rng.choice(WORDS, size=8)) for _ in range(n)]
    with Store.init(root) as store:
        store.add_atlas("big", rng.normal(size=(n, dim)).astype(np.float32), labels, descriptions,
                        source=AtlasSource(model="bench", layer=0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--concepts", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        build_store(store, args.concepts, args.dim)
        print(f"store: {args.concepts:,} concepts × d={args.dim} in {time.perf_counter() - t0:.1f} s")
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ATLAS_QUIET": "1"}
        server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--store", str(store), "--port",
                                   str(port), "--log-level", "warning"], env=env, cwd=tmp,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/api/info", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
            cpu0 = server_cpu_s(server.pid)
            rng = np.random.default_rng(1)
            kinds = rng.choice(5, size=args.requests, p=[0.40, 0.25, 0.20, 0.10, 0.05])
            paths = []
            for kind in kinds:
                c = int(rng.integers(args.concepts))
                paths.append([f"/api/lookup?q={'+'.join(rng.choice(WORDS, size=int(rng.integers(1, 3))))}",
                              f"/api/concepts/big/{c}", f"/api/concepts/big/{c}/neighbors?k=10", "/api/atlases",
                              "/"][kind])
            latencies = np.zeros(args.requests)
            errors: list[str] = []
            lock = threading.Lock()

            def client(indices: list[int]) -> None:
                with httpx.Client(base_url=base, timeout=60) as c:
                    for i in indices:
                        t = time.perf_counter()
                        try:
                            r = c.get(paths[i])
                            ok = r.status_code == 200
                            what = f"{paths[i]}: {r.status_code}"
                        except httpx.HTTPError as e:
                            ok, what = False, f"{paths[i]}: {type(e).__name__}"
                        latencies[i] = time.perf_counter() - t
                        if not ok:
                            with lock:
                                errors.append(what)

            threads = [threading.Thread(target=client, args=(list(range(j, args.requests, args.clients)),))
                       for j in range(args.clients)]
            wall = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - wall
            cpu = server_cpu_s(server.pid) - cpu0
        finally:
            server.terminate()
            server.wait(30)
    ms = latencies * 1000
    print(f"{args.requests} requests, {args.clients} clients, loopback: {wall:.1f} s wall "
          f"({args.requests / wall:.0f} req/s), server CPU {cpu:.1f} s")
    print(f"latency ms: p50 {np.percentile(ms, 50):.1f}  p95 {np.percentile(ms, 95):.1f}  "
          f"p99 {np.percentile(ms, 99):.1f}  max {ms.max():.1f}")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    for name, kind in (("lookup", 0), ("concept", 1), ("neighbors", 2), ("atlases", 3), ("page", 4)):
        sel = ms[kinds == kind]
        if len(sel):
            print(f"  {name:<10} n={len(sel):<5} p50 {np.percentile(sel, 50):6.1f}  p95 {np.percentile(sel, 95):6.1f}"
                  f"  p99 {np.percentile(sel, 99):6.1f}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
