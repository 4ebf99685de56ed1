"""SAE-latent labelling per method x criterion on a built ConceptWorld (issue 25, in memory).

For each subject (A: token pairing; B: span pairing, each word's last piece) one pass pairs the
subject's SAE layer with the foundation's atlas layer over ``--docs`` training documents outside
the SAEs' labelling slice, then scores, against the latents' ground truth (top-1 / top-5 of the
labelled subject latents, `engine.world.eval.sae_labelling.score_hits`):

- maps (``--methods``, any registered method) x criteria (``nn``, ``csls``, ``isf``) on the decoder rows;
  ``native``: the subject's concept directions mapped onto the foundation's (top-1 over the concepts);
- co-activation (`engine.labelling.coactivation`): Pearson correlation of the two SAEs' activations
  (``coact[enc]``), or of the subject SAE with projections on the atlas directions (``coact[proj]``,
  an atlas without an encoder), each under ``nn`` and ``csls``; the weighted-mean residual of each
  subject latent read by the atlas encoder (``wmean[enc]``) or by cosine with the directions;
- ``oracle``: the share of labelled subject latents whose label some atlas latent carries.

With ``--calibrate`` (two or more ``--world``) the label confidence (`engine.labelling.confidence`)
is fitted on the other worlds' labelled latents and measured on each: ECE and precision at 50% /
80% coverage, for Procrustes + nn and for co-activation.

    PYTHONPATH=$PWD python benchmarks/bench_label_methods.py --world /work/lq/store-small7/models/world-small-... \\
        --world /work/lq/store-tiny7/models/world-tiny-... --calibrate --json /tmp/label-methods.json

Worlds are folders `atlas world build` made (``<store>/models/world-<size>-<fingerprint>``) with
their SAEs. Development seeds only: defaults are chosen on seeds that are not the reported ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _signals(S: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    from engine.labelling.confidence import label_signals

    order = np.argsort(-S, 1)[:, :2]
    top = np.take_along_axis(S, order, 1)
    r_s = np.sort(S, 1)[:, -k:].mean(1)
    r_t = np.sort(S, 0)[-k:, :].mean(0)
    csls = -np.sort(-(2 * S - r_s[:, None] - r_t[None, :]), 1)[:, :2]
    mutual = S.argmax(0)[order[:, 0]] == np.arange(len(S))
    return order[:, 0], label_signals(top, order, csls_scores=csls, mutual=mutual)


def measure_world(path: str, docs: int, methods: list[str]) -> tuple[list[dict], dict]:
    """Rows of one world, and its score matrices (for calibration)."""
    import torch

    from engine.align.fit import fit_map
    from engine.align.pairing import iter_batch_pairs, pair_batches
    from engine.align.stats import SufficientStats
    from engine.atlas.encoder import AtlasEncoder
    from engine.atlas.importers import read_directions
    from engine.labelling.coactivation import (
        CoactivationStats,
        ProjectionEncoder,
        WeightedMeans,
        sparse_codes,
        weighted_mean_scores,
    )
    from engine.labelling.criteria import label_topk, top_k, unit_rows
    from engine.models.hooks import Site
    from engine.world.build import load_world
    from engine.world.eval.sae_labelling import score_hits
    from engine.world.locate import world_texts
    from engine.world.sae import build_saes

    torch.set_num_threads(1)
    world = load_world(Path(path))
    saes = build_saes(world, progress=False)
    fsae = saes.get("foundation")
    atlas_keys = [e["key"] for e in fsae.ground_truth()]
    aw = read_directions(fsae.path)
    atlas_dec = aw.W_dec.astype(np.float32)
    atlas_enc = AtlasEncoder.from_tensors(aw.encoder())
    fnd = world.foundation.load()
    Lf = world.foundation.atlas_layer
    c = saes.config
    label_slice = {t for t, _ in world.train_docs[c.n_train_docs + c.n_val_docs:
                                                   c.n_train_docs + c.n_val_docs + c.n_label_docs]}
    train_all, val = world_texts(world)
    train = [t for t in train_all if t not in label_slice][:docs]
    val = val[:400]
    rows: list[dict] = []
    mats: dict = {}

    def pairs(sub, L, texts, pairing):
        xs, ys = [], []
        for sb, fb in iter_batch_pairs(sub, fnd, texts, Site((L,)).resolved(sub[0]), Site((Lf,)).resolved(fnd[0]),
                                       batch_size=32, quiet=True):
            ch = pair_batches(sb, fb, texts, pairing, [L], Lf)
            xs.append(ch.x[L].float().numpy())
            ys.append(ch.y.float().numpy())
        return np.concatenate(xs), np.concatenate(ys)

    for key in ("subject_a", "subject_b"):
        t0 = time.perf_counter()
        ssae = saes.get(key)
        L = ssae.layer
        sw = read_directions(ssae.path)
        sub_dec = sw.W_dec.astype(np.float32)
        sub_enc = AtlasEncoder.from_tensors(sw.encoder())
        sub_keys = [e["key"] for e in ssae.ground_truth()]
        sub = world.model(key).load()
        pairing = "token" if key == "subject_a" else "span"
        x, y = pairs(sub, L, train, pairing)
        xv, yv = pairs(sub, L, val, pairing)
        base = {"world": world.name, "subject": key, "layer": L, "pairing": pairing, "n_pairs": len(x)}

        def add(method, ids, extra=None, base=base, sub_keys=sub_keys):
            s = score_hits(sub_keys, atlas_keys, ids)
            rows.append({**base, "method": method, "n": s["n"], "top1": round(float(s["top1"] or 0), 4),
                         "top5": round(float(s["top5"] or 0), 4), **(extra or {})})
            print(json.dumps(rows[-1]), flush=True)

        labelled = [k for k in sub_keys if k is not None]
        carried = {k for k in atlas_keys if k}
        oracle = float(np.mean([k in carried for k in labelled])) if labelled else 0.0
        rows.append({**base, "method": "oracle", "n": len(labelled), "top1": round(oracle, 4), "top5": round(oracle, 4)})
        tr = SufficientStats(x.shape[1], y.shape[1], sample_size=20000)
        tr.update(x, y)
        he = SufficientStats(x.shape[1], y.shape[1], sample_size=2000)
        he.update(xv, yv)
        nat = np.asarray(world.concept_directions(key, L))
        nat_f = np.asarray(world.concept_directions("foundation", Lf))
        for m in methods:
            params = {"subject_vectors": sub_dec, "atlas_vectors": atlas_dec} if m == "self_learning" else {}
            amap = fit_map(tr, m, heldout=he, **params)
            mapped = amap.map_directions(sub_dec)
            if m == "procrustes":
                mats[(key, "procrustes")] = unit_rows(mapped) @ unit_rows(atlas_dec).T
            for crit in ("nn", "csls", "isf"):
                _, ids, _ = label_topk(mapped, atlas_dec, 5, crit)
                _, nid, _ = label_topk(amap.map_directions(nat), nat_f, 1, crit, csls_k=3)
                add(f"{m}+{crit}", ids, {"native_top1": round(float((nid[:, 0] == np.arange(len(nat))).mean()), 4)})
        ax = sparse_codes(sub_enc.encode(x))
        for name, enc in (("enc", atlas_enc), ("proj", ProjectionEncoder(atlas_dec, centre=y.mean(0)))):
            st = CoactivationStats(sub_dec.shape[0], atlas_dec.shape[0])
            ay = enc.encode(y)
            st.update(ax, sparse_codes(ay) if name == "enc" else ay)
            add(f"coact[{name}]+nn", st.top_matches(5)[1])
            stat = st.atlas_side(k=10)
            from engine.labelling.criteria import rerank
            cs, ci = st.top_matches(32)
            add(f"coact[{name}]+csls", rerank(cs, ci, "csls", stat, 5)[1])
            if name == "enc":
                mats[(key, "coact")] = st.correlation()
        wm = WeightedMeans(sub_dec.shape[0], y.shape[1])
        wm.update(ax, y)
        add("wmean[enc]+nn", top_k(weighted_mean_scores(wm.means(), atlas_enc), 5)[1])
        add("wmean[dirs]+nn", top_k(weighted_mean_scores(wm.means(), directions=atlas_dec, centre=y.mean(0)), 5)[1])
        mats[(key, "keys")] = (np.asarray([k or "" for k in sub_keys]), np.asarray([k or "" for k in atlas_keys]))
        print(f"# {world.name} {key}: {len(x)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, mats


def calibrate(all_mats: dict[str, dict]) -> list[dict]:
    """Fit the confidence on the other worlds, measure on each (per subject and scoring)."""
    from engine.labelling.confidence import expected_calibration_error, fit_confidence, precision_at_coverage

    data: dict = {}
    for w, mats in all_mats.items():
        for key in ("subject_a", "subject_b"):
            sub, atl = mats[(key, "keys")]
            for kind in ("procrustes", "coact"):
                first, sig = _signals(mats[(key, kind)])
                lab = sub != ""
                data[(w, key, kind)] = (sig[lab], (atl[first] == sub)[lab].astype(float))
    out = []
    for (w, key, kind), (X, y) in data.items():
        others = [v for (w2, k2, kd2), v in data.items() if w2 != w and k2 == key and kd2 == kind]
        model = fit_confidence(np.concatenate([o[0] for o in others]), np.concatenate([o[1] for o in others]))
        p = model.predict(X)
        out.append({"world": w, "subject": key, "scores": kind, "n": len(y), "top1": round(float(y.mean()), 4),
                    "ece": round(expected_calibration_error(p, y), 4),
                    "precision@50": round(precision_at_coverage(p, y, 0.5), 4),
                    "precision@80": round(precision_at_coverage(p, y, 0.8), 4)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", action="append", required=True, help="A built world folder (repeat for several).")
    ap.add_argument("--docs", type=int, default=1500, help="Map-fitting documents per subject.")
    ap.add_argument("--methods", default="procrustes,ridge,whiten,rcsls,self_learning")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    rows, all_mats = [], {}
    for w in args.world:
        r, mats = measure_world(w, args.docs, args.methods.split(","))
        rows += r
        all_mats[w] = mats
    calib = calibrate(all_mats) if args.calibrate and len(all_mats) > 1 else []
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "calibration": calib}, indent=1))


if __name__ == "__main__":
    main()
