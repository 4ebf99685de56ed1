"""Labelling throughput: a whole `label_features` run against the bare FAISS search inside it.

Setup (not timed): a store with a 100,000-concept atlas (d=768, Flat), a map from a d=512
subject site (a random semi-orthogonal matrix: the map's values do not change the cost), and
100,000 subject features in a ``.npy``. Then, timed:

- ``bare``: the engine's atlas index searching the already projected, unit-norm queries, in the
  run's batch size: the floor any labelling run has to pay;
- ``labelling``: `engine.labelling.run.label_features` end to end from a freshly opened store:
  load and check the map, read and fingerprint the features, load and verify the index, project
  (one GEMM per batch), search, and commit every batch's rows with the run's progress.

The target is ``labelling / bare <= 1.3``: projection and database writes must not dominate.
``bare`` is timed before and after the run and averaged, because the machine is shared; the run
is also split from inside (time in the index's search vs the rest), two figures taken in one
time window and so under the same load.

    python benchmarks/bench_labelling.py                       # the full 100k x 100k run
    python benchmarks/bench_labelling.py --features 10000 --concepts 10000   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexes  # noqa: E402
from engine.align.map import AlignmentMap  # noqa: E402
from engine.labelling import run as labelling  # noqa: E402
from engine.search import project  # noqa: E402
from engine.store.store import Store  # noqa: E402


class SearchClock:
    """Wall time spent inside the index's search during the run (the rest is the run's own work)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._real = indexes.FaissIndex.search

    def __enter__(self) -> SearchClock:
        clock, real = self, self._real

        def timed(index, queries, k):
            t0 = time.perf_counter()
            try:
                return real(index, queries, k)
            finally:
                clock.seconds += time.perf_counter() - t0

        indexes.FaissIndex.search = timed
        return self

    def __exit__(self, *exc) -> None:
        indexes.FaissIndex.search = self._real


def bare_search(index, queries: np.ndarray, k: int, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(queries), batch):
        index.search(queries[lo : lo + batch], k)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--concepts", type=int, default=100_000)
    ap.add_argument("--d-subject", type=int, default=512)
    ap.add_argument("--d-atlas", type=int, default=768)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=labelling.DEFAULT_BATCH)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-labelling-") as tmp:
        root = Path(tmp)
        store = Store.init(root / "store")
        t0 = time.perf_counter()
        atlas = rng.normal(size=(args.concepts, args.d_atlas)).astype(np.float32)
        store.add_atlas("atlas", atlas, [f"concept {i}" for i in range(args.concepts)], model="foundation",
                        layer=12, index_spec="Flat")
        del atlas
        store.add_model("subject", d_model=args.d_subject)
        q, _ = np.linalg.qr(rng.normal(size=(args.d_atlas, args.d_subject)))  # (d_atlas, d_subject)
        w = q.T.astype(np.float32)  # (d_subject, d_atlas), orthonormal rows
        amap = AlignmentMap(w, w.T, np.zeros(args.d_subject), np.zeros(args.d_atlas), "procrustes",
                            subject_model="subject", subject_layer=20, atlas="atlas")
        store.save_map(amap, "map")
        feats = rng.normal(size=(args.features, args.d_subject)).astype(np.float32)
        np.save(root / "features.npy", feats)
        t_setup = time.perf_counter() - t0
        print(f"setup {t_setup:.0f}s: atlas {args.concepts}x{args.d_atlas} Flat, "
              f"{args.features} features d={args.d_subject}", flush=True)

        index = store.index("atlas")
        queries = np.concatenate([project(amap, feats[lo : lo + args.batch])
                                  for lo in range(0, args.features, args.batch)])
        t_bare_1 = bare_search(index, queries, args.k, args.batch)
        print(f"bare FAISS search: {t_bare_1:.1f}s", flush=True)
        store.close()

        t0, c0 = time.perf_counter(), time.process_time()
        with SearchClock() as clock, Store.open(root / "store") as fresh:
            run = labelling.label_features(fresh, "map", str(root / "features.npy"), k=args.k,
                                           batch_size=args.batch, name="bench", quiet=True)
            assert run.status == "done" and run.n_done == args.features
            t_label, cpu_label = time.perf_counter() - t0, time.process_time() - c0
            n_rows = fresh.count_run_labels("bench")
        print(f"labelling end to end: {t_label:.1f}s ({n_rows} rows)", flush=True)

        t_bare_2 = bare_search(index, queries, args.k, args.batch)
        print(f"bare FAISS search again: {t_bare_2:.1f}s", flush=True)
        t0 = time.perf_counter()
        for lo in range(0, args.features, args.batch):
            project(amap, feats[lo : lo + args.batch])
        t_project = time.perf_counter() - t0

    t_bare = (t_bare_1 + t_bare_2) / 2
    print(f"search inside the run: {clock.seconds:.1f}s, the rest: {t_label - clock.seconds:.1f}s", flush=True)
    out = {
        "features": args.features, "concepts": args.concepts, "d_subject": args.d_subject,
        "d_atlas": args.d_atlas, "k": args.k, "batch": args.batch, "rows": n_rows,
        "bare_search_s": t_bare, "bare_search_runs_s": [t_bare_1, t_bare_2], "labelling_s": t_label,
        "ratio": t_label / t_bare, "projection_s": t_project,
        # the same run seen from inside, one time window: search vs everything else
        "search_in_run_s": clock.seconds, "rest_of_run_s": t_label - clock.seconds,
        "ratio_in_run": t_label / clock.seconds, "labelling_cpu_s": cpu_label,
        "features_per_s": args.features / t_label,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
