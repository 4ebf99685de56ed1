"""Labelling per method x criterion on built ConceptWorlds, in memory (issue 25).

The measuring code is `engine.world.eval.label_methods` (`atlas eval labelling --world --compare`
runs the same); this script takes world folders (``<store>/models/world-<size>-<fingerprint>``,
built with their SAEs), prints a JSON line per row and writes them all with ``--json``. With
``--calibrate`` (two or more worlds) the label confidence is also fitted on the other worlds and
measured on each (leave one world out; development seeds only).

    PYTHONPATH=$PWD python benchmarks/bench_label_methods.py --world /work/lq/store-tiny7/models/world-tiny-... \\
        --world /work/lq/store-tiny8/models/world-tiny-... --calibrate --json /tmp/label-methods.json \\
        [--matrices /tmp/mats]  # score matrices for benchmarks/fit_confidence_default.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from engine.world.build import load_world
    from engine.world.eval.label_methods import (
        EXPLAIN_DOCS,
        FEATURES,
        calibrate,
        default_methods,
        load_confidence,
        measure_world,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", action="append", required=True, help="A built world folder (repeat for several).")
    ap.add_argument("--docs", type=int, default=1500, help="Map-fitting documents per subject.")
    ap.add_argument("--methods", default=",".join(default_methods()))
    ap.add_argument("--features", default=",".join(FEATURES), help="Tables: sae, native, explain.")
    ap.add_argument("--explain-docs", type=int, default=EXPLAIN_DOCS)
    ap.add_argument("--confidence", help="Confidence models JSON (default: engine/labelling/confidence_default.json).")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--matrices", type=Path, help="Save each world's score matrices here as "
                    "<size><seed>.<subject>.{corr,procrustes_cos}.npy and .keys.npz "
                    "(what benchmarks/fit_confidence_default.py reads).")
    args = ap.parse_args()
    rows, all_mats = [], {}
    conf = load_confidence(args.confidence)
    for w in args.world:
        r, mats = measure_world(load_world(Path(w)), args.docs, args.methods.split(","), args.features.split(","),
                                conf, args.explain_docs, quiet=False)
        rows += r
        all_mats[w] = mats
        if args.matrices:
            save_matrices(args.matrices, f"{r[0]['size']}{r[0]['seed']}", mats)
    calib = calibrate(all_mats, quiet=False) if args.calibrate and len(all_mats) > 1 else []
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "calibration": calib}, indent=1))


def save_matrices(folder: Path, prefix: str, mats: dict) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for key in ("subject_a", "subject_b"):
        if (key, "keys") not in mats:
            continue
        for kind, name in (("coact", "corr"), ("procrustes", "procrustes_cos")):
            if (key, kind) in mats:
                np.save(folder / f"{prefix}.{key}.{name}.npy", mats[(key, kind)].astype(np.float32))
        sub, atl = mats[(key, "keys")]
        np.savez(folder / f"{prefix}.{key}.keys.npz", sub_keys=sub, atlas_keys=atl)


if __name__ == "__main__":
    main()
