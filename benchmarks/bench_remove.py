"""Removal time against the number of label rows: set-based deletes, indexed cascades.

Two questions, each on a fresh store per size (setup not timed):

- ``others``: removing a small atlas (1,000 concepts, its map and a 5,000-row labelling run)
  while *other* atlases' runs hold L label rows. It must stay flat in L: the deletes touch only
  the removed atlas's rows, found through indexes (feature_labels.run_id, feature_labels.concept_id:
  migration 0002), never a scan of the label table.
- ``own``: removing an atlas whose own runs hold R label rows (`Store.remove_atlas(cascade=True)`:
  one set-based DELETE per table). The time per row must stay flat in R (linear total: each row is
  deleted once).

Label rows are inserted directly (the values do not matter to a delete; a real labelling run
writes the same rows). Time is wall clock of `remove_atlas`, best of ``--repeat`` fresh stores.

    python benchmarks/bench_remove.py                      # L and R up to 1,000,000
    python benchmarks/bench_remove.py --sizes 0,10000,100000   # quick check
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

from engine.align.map import AlignmentMap, save_map  # noqa: E402
from engine.store.store import AtlasSource, Store  # noqa: E402

D = 16


def _atlas_with_run(store: Store, name: str, n_concepts: int, n_rows: int, rng) -> None:
    """Atlas ``name`` with a map and one run holding ``n_rows`` label rows (k=5 per feature)."""
    store.add_atlas(
        name, rng.normal(size=(n_concepts, D)).astype(np.float32), source=AtlasSource(model="x", layer=1),
    )
    amap = AlignmentMap(rng.normal(size=(8, D)), rng.normal(size=(D, 8)), np.zeros(8), np.zeros(D), "procrustes",
                        subject_model="subj", subject_layer=1, atlas=name, atlas_model="x", atlas_layer=1,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    save_map(store, amap, f"{name}-map")
    n_features = max(1, n_rows // 5)
    run = store.add_run(f"{name}-run", f"{name}-map", feature_source="bench", fingerprint="0" * 64,
                        n_features=n_features, k=5, batch_size=10_000)
    job = store.label_pass(run.name)
    chunk = 100_000
    for lo in range(0, n_features, chunk // 5):
        hi = min(n_features, lo + chunk // 5)
        ids = rng.integers(0, n_concepts, size=(hi - lo, 5))
        scores = rng.random(size=(hi - lo, 5)).astype(np.float32)
        job.commit_batch(lo, hi, scores, ids)


def _time_remove(sizes: list[int], own: bool, repeat: int) -> list[dict]:
    out = []
    for size in sizes:
        best = float("inf")
        for r in range(repeat):
            rng = np.random.default_rng(r)
            with tempfile.TemporaryDirectory() as tmp:
                store = Store.init(Path(tmp) / "st")
                store.add_model("subj", d_model=8)
                if own:
                    _atlas_with_run(store, "victim", 1_000, size, rng)
                else:
                    _atlas_with_run(store, "victim", 1_000, 5_000, rng)
                    if size:
                        _atlas_with_run(store, "others", 10_000, size, rng)
                store.close()
                store = Store.open(Path(tmp) / "st")
                t0 = time.perf_counter()
                gone = store.remove_atlas("victim", cascade=True)
                best = min(best, time.perf_counter() - t0)
                store.close()
        rows = gone.n_labels
        out.append({"label_rows": size, "removed_rows": rows, "seconds": round(best, 4),
                    "us_per_removed_row": round(1e6 * best / max(rows, 1), 3)})
        print(json.dumps({"case": "own" if own else "others", **out[-1]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,100000,1000000", help="label-row counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    others = _time_remove(sizes, own=False, repeat=args.repeat)
    own = _time_remove([s for s in sizes if s > 0], own=True, repeat=args.repeat)
    flat = max(o["seconds"] for o in others) / max(min(o["seconds"] for o in others), 1e-9)
    per_row = [o["us_per_removed_row"] for o in own]
    print(f"removing a 1,000-concept atlas beside 0..{sizes[-1]:,} other label rows: "
          f"{', '.join(str(o['seconds']) + ' s' for o in others)} (max/min {flat:.2f}x)")
    if per_row:
        counts = ", ".join(format(o["removed_rows"], ",") for o in own)
        print(f"removing an atlas with its own {counts} label rows: "
              f"{', '.join(str(o['seconds']) + ' s' for o in own)} ({', '.join(map(str, per_row))} µs per row)")


if __name__ == "__main__":
    main()
