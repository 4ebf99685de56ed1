"""Pairing scale on a ConceptWorld (issue 25, round 5 of docs/label-quality.md; development worlds only).

Each side is mean-pooled over windows of W consecutive words before pairing (W = 1: span pairing
with mean pooling; "text": the whole document, text pairing); one map per W and method. Prints,
per subject, the top-1 of its native concept directions (mapped onto the foundation's) and of its
labelled SAE latents (decoder rows through the map, nearest neighbour, strict ground truth) as
JSON lines.

    PYTHONPATH=$PWD python benchmarks/bench_pairing_scale.py <store>/models/world-medium-... \\
        [--subjects subject_b,subject_a] [--windows 1,2,4,8,16,32,text]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TEXT = 1 << 30  # a window longer than any document: text pairing


def windows_of(keys: np.ndarray, w: int) -> np.ndarray:
    """Word keys (``text << 32 | word``, -1 for none) -> window keys (``text << 32 | word // w``)."""
    return np.where(keys >= 0, ((keys >> 32) << 32) | ((keys & 0xFFFFFFFF) // w), -1)


def main() -> None:
    import torch

    from engine.align.fit import fit_map
    from engine.align.pairing import _pool, iter_batch_pairs, token_words
    from engine.align.stats import SufficientStats
    from engine.atlas.importers import read_directions
    from engine.labelling.criteria import label_topk
    from engine.models.hooks import Site
    from engine.world.build import load_world
    from engine.world.eval.sae_labelling import score_hits
    from engine.world.locate import world_texts
    from engine.world.sae import build_saes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="A built world folder (its SAEs built).")
    ap.add_argument("--subjects", default="subject_b,subject_a")
    ap.add_argument("--windows", default="1,2,4,8,16,32,text")
    ap.add_argument("--docs", type=int, default=4000, help="Training documents.")
    args = ap.parse_args()
    sizes = [TEXT if w == "text" else int(w) for w in args.windows.split(",")]
    torch.set_num_threads(1)
    world = load_world(args.world)
    saes = build_saes(world, progress=False)
    c = saes.config
    label_slice = {t for t, _ in world.train_docs[c.n_train_docs + c.n_val_docs:
                                                   c.n_train_docs + c.n_val_docs + c.n_label_docs]}
    train_all, val = world_texts(world)
    train = [t for t in train_all if t not in label_slice][: args.docs]
    fnd = world.foundation.load()
    lf = world.foundation.atlas_layer
    nat_f = np.asarray(world.concept_directions("foundation", lf))
    fsae = saes.get("foundation")
    atlas_keys = [e["key"] for e in fsae.ground_truth()]
    atlas_dec = read_directions(fsae.path).W_dec.astype(np.float32)
    for key in args.subjects.split(","):
        ssae = saes.get(key)
        layer = ssae.layer
        sub = world.model(key).load()
        nat = np.asarray(world.concept_directions(key, layer))
        sub_dec = read_directions(ssae.path).W_dec.astype(np.float32)
        sub_keys = [e["key"] for e in ssae.ground_truth()]

        def stats(texts: list[str], sub=sub, layer=layer) -> dict[int, SufficientStats]:
            st: dict[int, SufficientStats] = {}
            for sb, fb in iter_batch_pairs(sub, fnd, texts, Site((layer,)).resolved(sub[0]),
                                           Site((lf,)).resolved(fnd[0]), batch_size=32, lengths="own", desc=None):
                kx, ky = token_words(sb, texts), token_words(fb, texts)
                for w in sizes:
                    ux, px = _pool({layer: sb.acts[layer]}, windows_of(kx, w), "mean")
                    uy, py = _pool({-1: fb.acts[lf]}, windows_of(ky, w), "mean")
                    _, ix, iy = np.intersect1d(ux, uy, assume_unique=True, return_indices=True)
                    x, y = px[layer][ix].float().numpy(), py[-1][iy].float().numpy()
                    st.setdefault(w, SufficientStats(x.shape[1], y.shape[1], sample_size=2000)).update(x, y)
            return st

        tr, he = stats(train), stats(val[:400])
        for w in sizes:
            for method in ("procrustes", "ridge"):
                amap = fit_map(tr[w], method, heldout=he[w])
                _, nid, _ = label_topk(amap.map_directions(nat), nat_f, 1, "nn")
                _, ids, _ = label_topk(amap.map_directions(sub_dec), atlas_dec, 5, "nn")
                print(json.dumps({"world": world.name, "subject": key, "window": "text" if w == TEXT else w,
                                  "n_pairs": tr[w].count, "method": method,
                                  "native_top1": round(float((nid[:, 0] == np.arange(len(nat))).mean()), 3),
                                  "sae_top1": round(float(score_hits(sub_keys, atlas_keys, ids)["top1"] or 0), 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
