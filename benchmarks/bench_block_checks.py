"""What the per-block checksums of atlas files (`engine.store.blocksums`) cost reads, in one run.

One store, two atlases of the same ``--n`` × ``--d`` vectors (Flat): ``checked``, as imported now
(its vector and index files' block checksums recorded), and ``unchecked``, its row's checksums
removed, which reads exactly as the code before them did (stamp check only). Alternated ``--reps``
times (checked, unchecked, checked, ...) so both see the same machine load, each figure the
median, wall and CPU seconds of this process:

- ``open+search``: a freshly opened store's first search (``--queries`` queries, top ``-k``):
  opening the index, which now checks every block of the index file once;
- ``search``: the same search again on that store (the index and its checks are cached);
- ``row``: a freshly opened store's `Store.neighbors` of one concept (its row's blocks of the
  vector file, then the index open and search as above);
- ``vectors``: a freshly opened store's `Store.atlas_vectors` read whole, a chunk of rows at a time
  (every block of the vector file checked first; the chunks keep memory flat, so the figure is
  the read, not the allocation of a normalised copy).

The page cache is warm for both (each file is read once before timing): the figures are the
checks' CPU cost, not disk reads.

    python benchmarks/bench_block_checks.py                     # 100k x 768, 1,024 queries
    python benchmarks/bench_block_checks.py --n 20000 --reps 3  # quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import update  # noqa: E402

from engine.store.schema import AtlasRow  # noqa: E402
from engine.store.store import AtlasSource, Store  # noqa: E402
from engine.store.vectorfiles import row_chunks  # noqa: E402


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    queries = rng.normal(size=(args.queries, args.d)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        store = Store.init(root)
        for name in ("checked", "unchecked"):
            store.add_atlas(name, x, source=AtlasSource(model="m", layer=0))
        with store.session() as s:
            s.execute(update(AtlasRow).where(AtlasRow.name == "unchecked").values(vector_blocks=None, index_blocks=None))
        for p in [*root.glob("vectors/*"), *root.glob("indexes/*")]:
            p.read_bytes()  # warm the page cache for both
        del x

        def ops(name: str) -> dict[str, tuple[float, float]]:
            out = {}
            st = Store.open(root)
            out["open+search"] = timed(lambda: st.search_arrays(name, queries, args.k))
            out["search"] = timed(lambda: st.search_arrays(name, queries, args.k))
            st.close()
            st = Store.open(root)
            out["row"] = timed(lambda: st.neighbors(f"{name}/{args.n // 2}", k=args.k))
            st.close()
            st = Store.open(root)
            out["vectors"] = timed(lambda: [np.linalg.norm(c, axis=1) for _, c in row_chunks(st.atlas_vectors(name))])
            st.close()
            return out

        runs: dict[str, list[dict[str, tuple[float, float]]]] = {"checked": [], "unchecked": []}
        ops("checked"), ops("unchecked")  # warm-up: imports, FAISS, BLAS threads
        for _ in range(args.reps):
            for name in ("checked", "unchecked"):
                runs[name].append(ops(name))
        store.close()

    report: dict[str, dict[str, float]] = {}
    print(f"{args.n} x {args.d} Flat, {args.queries} queries, k={args.k}, {args.reps} reps (median)")
    print(f"{'':14}{'checked wall':>14}{'unchecked':>12}{'ratio':>8}{'checked cpu':>14}{'unchecked':>12}{'+cpu s':>9}")
    for op in runs["checked"][0]:
        cw, uw = (statistics.median(r[op][0] for r in runs[n]) for n in ("checked", "unchecked"))
        cc, uc = (statistics.median(r[op][1] for r in runs[n]) for n in ("checked", "unchecked"))
        report[op] = {"checked_wall_s": cw, "unchecked_wall_s": uw, "checked_cpu_s": cc, "unchecked_cpu_s": uc}
        print(f"{op:14}{cw:14.4f}{uw:12.4f}{cw / uw:8.2f}{cc:14.4f}{uc:12.4f}{cc - uc:9.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "figures": report}, indent=2))


if __name__ == "__main__":
    main()
