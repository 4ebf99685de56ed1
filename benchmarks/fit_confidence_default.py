"""Fit the shipped label-confidence models (engine/labelling/confidence_default.json) on development worlds.

Reads the score matrices `benchmarks/bench_label_methods.py` measured on DEVELOPMENT worlds (never
the reported seeds 0-2): per world and subject, ``<prefix>.<subject>.procrustes_cos.npy`` (cosines
of the mapped subject SAE decoder rows with the atlas SAE's, a map run's scores),
``<prefix>.<subject>.corr.npy`` (co-activation correlations, an activation run's scores) and
``<prefix>.<subject>.keys.npz`` (ground-truth keys). The signals of each labelled subject latent
are computed by the code a run uses (`engine.labelling.run.Ranking.signals` over the top
candidates, the atlas-side statistic over all latents), so a run's confidence is the model's
prediction on exactly the numbers it was fitted on. Three models:

- ``map.nn``: score and margin (an nn run has no atlas-side statistic);
- ``map.stat``: score, margin, CSLS gap, mutual nearest neighbour (csls / isf runs);
- ``activations``: the same four on correlations (co-activation runs);
- ``map.nn.labelled``, ``map.stat.labelled``, ``activations.labelled``: the same for runs that
  rank only the atlas's labelled concepts (``--labelled-only``): the signals of the score matrix's
  labelled columns (on ConceptWorld an atlas latent carries a label exactly when it has a
  ground-truth key, `engine.world.sae.write_labels`).

    PYTHONPATH=$PWD python benchmarks/fit_confidence_default.py \\
        --world small:7=/work/lq/resU-small7.json --world tiny:7=/work/lq/resU-tiny7.json \\
        --world tiny:8=/work/lq/resU-tiny8.json [--out engine/labelling/confidence_default.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engine.labelling.confidence import (
    SIGNALS,
    expected_calibration_error,
    fit_confidence,
    precision_at_coverage,
)
from engine.labelling.criteria import DEFAULT_CSLS_K, DEFAULT_ISF_BETA, MIN_CANDIDATES, AtlasStat, top_k
from engine.labelling.run import Ranking

REPORTED_SEEDS = {0, 1, 2}
OUT = Path(__file__).resolve().parents[1] / "engine" / "labelling" / "confidence_default.json"


def signals_of(S: np.ndarray) -> np.ndarray:
    """The four signals of each row of a score matrix (n_subject, n_atlas), as a run computes them."""
    top = -np.sort(-S, axis=0)[:DEFAULT_CSLS_K]  # (k, n_atlas): each concept's best queries
    stat = AtlasStat(DEFAULT_CSLS_K, DEFAULT_ISF_BETA, top.mean(0).astype(np.float32),
                     np.full(S.shape[1], -np.inf), len(S), top[0].astype(np.float32))
    cs, ci = top_k(S.astype(np.float32), min(MIN_CANDIDATES, S.shape[1]))
    return Ranking("csls", DEFAULT_CSLS_K, stat).signals(cs, ci)


def load(prefix: str, subject: str, kind: str, labelled_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    S = np.load(f"{prefix}.{subject}.{kind}.npy")
    z = np.load(f"{prefix}.{subject}.keys.npz")
    sub, atl = z["sub_keys"], z["atlas_keys"]
    if labelled_only:  # the atlas latents with a label (on the world: those with a key)
        S, atl = S[:, atl != ""], atl[atl != ""]
    sig = signals_of(S)
    first = np.argmax(S, axis=1)
    lab = sub != ""
    return sig[lab], (atl[first] == sub)[lab].astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", action="append", required=True, metavar="SIZE:SEED=PREFIX")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    worlds = []
    for w in args.world:
        name, prefix = w.split("=", 1)
        size, seed = name.split(":")
        if int(seed) in REPORTED_SEEDS:
            raise SystemExit(f"seed {seed} is a reported seed: fit on development seeds only")
        worlds.append((size, int(seed), prefix))
    models, report = {}, []
    for key, kind, cols in (("map.nn", "procrustes_cos", SIGNALS[:2]), ("map.stat", "procrustes_cos", SIGNALS),
                            ("activations", "corr", SIGNALS), ("map.nn.labelled", "procrustes_cos", SIGNALS[:2]),
                            ("map.stat.labelled", "procrustes_cos", SIGNALS), ("activations.labelled", "corr", SIGNALS)):
        idx = [SIGNALS.index(c) for c in cols]
        data = {(size, seed, subj): load(prefix, subj, kind, key.endswith(".labelled")) for size, seed, prefix in worlds
                for subj in ("subject_a", "subject_b")}
        for held in data:  # leave one (world, subject) out: how well the model does on unseen data
            X = np.concatenate([v[0] for k2, v in data.items() if k2 != held])[:, idx]
            y = np.concatenate([v[1] for k2, v in data.items() if k2 != held])
            p = fit_confidence(X, y).predict(data[held][0][:, idx])
            yt = data[held][1]
            report.append({"model": key, "held_out": f"{held[0]}:{held[1]}:{held[2]}", "n": len(yt),
                           "top1": round(float(yt.mean()), 4), "ece": round(expected_calibration_error(p, yt), 4),
                           "precision@50": round(precision_at_coverage(p, yt, 0.5), 4),
                           "precision@80": round(precision_at_coverage(p, yt, 0.8), 4)})
            print(json.dumps(report[-1]), flush=True)
        X = np.concatenate([v[0] for v in data.values()])[:, idx]
        y = np.concatenate([v[1] for v in data.values()])
        meta = {"fitted_on": [{"size": s, "seed": d, "subjects": ["subject_a", "subject_b"]} for s, d, _ in worlds],
                "scores": kind, "labelled_only": key.endswith(".labelled"), "n": len(y), "note": "development seeds only; never the reported seeds 0-2",
                "command": "PYTHONPATH=$PWD python benchmarks/fit_confidence_default.py " + " ".join(
                    f"--world {w}" for w in args.world)}
        models[key] = json.loads(fit_confidence(X, y, meta=meta).to_json())
    out = {"meta": {"worlds": [f"{s}:{d}" for s, d, _ in worlds], "reported_seeds_excluded": sorted(REPORTED_SEEDS),
                    "leave_one_out": report}, "models": models}
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
