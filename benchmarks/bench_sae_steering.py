"""Steering with SAE latents against steering with topic means, through the same maps (ConceptWorld).

    PYTHONPATH=$PWD python benchmarks/bench_sae_steering.py --size tiny --seed 0 --subject a \\
        --store /tmp/sae-seeds/tiny-0 --strengths 0.25,0.5,1.0

Prints the summary lines of `engine.world.eval.sae_steering.evaluate_sae_steering` (site and
strength chosen on held-out template prompts; faithfulness on the neutral prompts) and how many
concepts had a foundation SAE latent whose ground truth is their topic (coverage).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subject", default="a")
    ap.add_argument("--store", default="/tmp/sae-seeds/tiny-0")
    ap.add_argument("--strengths", default="0.25,0.5,1.0")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    from engine.steering.faithfulness import SteeringGrid
    from engine.store import layout
    from engine.store.store import Store
    from engine.util import to_plain
    from engine.world.eval.sae_steering import evaluate_sae_steering

    path = Path(args.store)
    store = Store.open(path) if (path / layout.DB_FILE).is_file() else Store.init(path)
    t = time.perf_counter()
    grid = SteeringGrid(tuple(float(s) for s in args.strengths.split(",")))
    report, info = evaluate_sae_steering(store, args.size, args.seed, subject=args.subject, grid=grid, quiet=True)
    print(f"{time.perf_counter() - t:.0f} s; coverage {info['coverage']} of {info['n_concepts']} concepts")
    for line in report.summary:
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"info": info, "report": to_plain(report)}, indent=1))


if __name__ == "__main__":
    main()
