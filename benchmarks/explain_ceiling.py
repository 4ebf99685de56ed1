"""Per-token explanation ceiling on a ConceptWorld (issue 25, round 5 of docs/label-quality.md).

The foundation's own residuals (no map) on 300 held-out documents, ranked against its concept
directions: the share of member words (each word's last token) whose top concept is their own,
centred (as `atlas explain`), whitened on the query side only (as `atlas explain --whiten`) and
whitened on both sides (a Mahalanobis cosine), at several whitening ridges; and how many member
words go to the most common top concept (hubness). Chance is one over the number of concepts.

    PYTHONPATH=$PWD python benchmarks/explain_ceiling.py <store>/models/world-small-...
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.world.build import load_world
    from engine.world.eval.label_methods import token_concepts
    from engine.world.locate import world_texts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="A built world folder.")
    ap.add_argument("--docs", type=int, default=300, help="Held-out documents measured.")
    ap.add_argument("--population", type=int, default=400, help="Training documents the whitening is fitted on.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = load_world(args.world)
    fm, ftok = world.foundation.load()
    layer = world.foundation.atlas_layer
    docs = world.heldout_docs[: args.docs]
    texts = [t for t, _ in docs]
    member = {w.lower(): c for c, con in enumerate(world.concepts) for w in con.members}
    acts, concept_of = [], []
    for b in collect(fm, ftok, texts, Site((layer,)), 32, desc=None, dtype=torch.float32):
        acts.append(b.acts[layer].numpy())
        concept_of += token_concepts(b, texts, member)  # the concept of the word each token ends, else -1
    x = np.concatenate(acts)
    wc = np.asarray(concept_of)
    words = wc >= 0
    directions = np.asarray(world.concept_directions("foundation", layer))
    train, _ = world_texts(world)
    pop = np.concatenate([b.acts[layer].numpy() for b in collect(fm, ftok, train[: args.population], Site((layer,)), 32,
                                                                 desc=None, dtype=torch.float32)])
    mu = pop.mean(0)
    ev, vecs = np.linalg.eigh(np.cov((pop - mu).T))
    ev = np.clip(ev, 0, None)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def top1(scores: np.ndarray) -> float:
        return round(float((scores[words].argmax(1) == wc[words]).mean()), 4)

    q = x - mu
    d = unit(directions)
    plain = unit(q) @ d.T
    out = {"world": world.name, "n_member_words": int(words.sum()), "chance": round(1 / len(directions), 4),
           "centred": top1(plain),
           "largest_hub_share": round(collections.Counter(plain[words].argmax(1).tolist()).most_common(1)[0][1]
                                      / int(words.sum()), 4)}
    for ridge in (0.0, 0.01, 0.1, 1.0):
        w = (vecs * (ev + ridge * ev.mean()) ** -0.5) @ vecs.T
        out[f"whitened_query_ridge{ridge}"] = top1(unit(q @ w) @ d.T)
        out[f"whitened_both_ridge{ridge}"] = top1(unit(q @ w) @ unit(directions @ w).T)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
