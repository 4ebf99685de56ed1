"""SAE-latent bulk labelling across world seeds: mean and spread per subject, layer, pairing and method.

Runs `atlas eval labelling --world --features sae` (`evaluate_sae_labelling`) on each seed's world
(built and its SAEs trained if missing; one store per seed) and prints, per (subject, layer,
pairing, method), the mean and the spread (max - min) over seeds of top-1, top-5 and MRR, then
every pair of rows of a subject whose mean top-1 differs by more than both rows' spreads (the
issue's separation test). ``--layers`` as in `atlas eval labelling` (default: every layer of
each subject; SAEs at layers the world was built without are trained on first use).

    PYTHONPATH=$PWD python benchmarks/bench_sae_seeds.py --size tiny --seeds 0,11,12 \\
        --store-pattern /tmp/sae-seeds/{size}-{seed} --json /tmp/sae-seeds.json

The store pattern gets ``{size}`` and ``{seed}``; building a `small` world takes ~10 min per seed
on a quiet 2-core machine, `tiny` about one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--seeds", default="0,11,12")
    ap.add_argument("--store-pattern", default="/tmp/sae-seeds/{size}-{seed}")
    ap.add_argument("--methods", default="procrustes,ridge,correlation")
    ap.add_argument("--max-docs", type=int, default=2000)
    ap.add_argument("--layers", default="", help="Subject layers, e.g. 1 (default: every layer of each subject).")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--add-json", action="append", default=[],
                    help="Also count the seeds of an earlier run's --json output (seeds measured separately).")
    args = ap.parse_args()

    from engine.store import layout
    from engine.store.store import Store
    from engine.util import to_plain
    from engine.world.eval.sae_labelling import evaluate_sae_labelling

    seeds = [int(s) for s in args.seeds.split(",") if s]
    per_seed: dict[int, list[dict]] = {}
    for earlier in args.add_json:
        d = json.loads(Path(earlier).read_text())
        per_seed.update({int(k): v for k, v in d["per_seed"].items()})
    for seed in seeds:
        path = Path(args.store_pattern.format(size=args.size, seed=seed))
        store = Store.open(path) if (path / layout.DB_FILE).is_file() else Store.init(path)
        t = time.perf_counter()
        rows = evaluate_sae_labelling(store, size=args.size, seed=seed, methods=args.methods.split(","),
                                      max_docs=args.max_docs, quiet=True,
                                      layers=[int(v) for v in args.layers.split(",") if v] or None)
        per_seed[seed] = [to_plain(r) for r in rows]
        print(f"seed {seed}: {len(rows)} rows in {time.perf_counter() - t:.0f} s", flush=True)

    groups: dict[tuple[str, int, str, str], list[dict]] = defaultdict(list)
    for rows in per_seed.values():
        for r in rows:
            subject = "subject_a" if "subject-a" in r["subject"] else "subject_b"
            groups[(subject, r["layer"], r["pairing"], r["method"])].append(r)
    table = []
    for (subject, layer, pairing, method), rs in sorted(groups.items()):
        row = {"subject": subject, "layer": layer, "pairing": pairing, "method": method, "seeds": len(rs),
               "n": round(sum(r["n"] for r in rs) / len(rs), 1)}
        for m in ("top1", "top5", "mrr", "chance_top1", "concept_mrr"):
            vals = [r[m] for r in rs if r[m] is not None]
            row[m] = round(sum(vals) / len(vals), 3) if vals else None
            row[f"{m}_spread"] = round(max(vals) - min(vals), 3) if vals else None
        table.append(row)
    print(f"\n{'subject':10} {'layer':5} {'pairing':7} {'method':12} {'top1':>14} {'top5':>14} {'mrr':>14} {'chance':>7}")
    for r in table:
        print(f"{r['subject']:10} {r['layer']:5} {r['pairing']:7} {r['method']:12} "
              + " ".join(f"{r[m]:.3f} ± {r[m + '_spread'] / 2:.3f}" for m in ("top1", "top5", "mrr"))
              + f" {r['chance_top1']:7.3f}")
    separated = []
    for a, b in itertools.combinations(table, 2):
        if a["subject"] != b["subject"]:
            continue
        gap = abs(a["top1"] - b["top1"])
        if gap > max(a["top1_spread"], b["top1_spread"]):
            separated.append({"a": f"L{a['layer']}/{a['pairing']}/{a['method']}",
                              "b": f"L{b['layer']}/{b['pairing']}/{b['method']}",
                              "subject": a["subject"], "gap_top1": round(gap, 3),
                              "spread": max(a["top1_spread"], b["top1_spread"])})
    print("\nseparated (|mean top-1 gap| > the larger seed spread, max - min):")
    for s in separated:
        print(f"  {s['subject']}: {s['a']} vs {s['b']}: gap {s['gap_top1']:.3f} > spread {s['spread']:.3f}")
    if not separated:
        print("  none")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"size": args.size, "seeds": sorted(per_seed), "per_seed": per_seed,
                                                   "table": table, "separated": separated}, indent=1))


if __name__ == "__main__":
    main()
