"""Bulk labelling of SAE latents on ConceptWorld: a subject SAE labelled through maps onto an SAE atlas.

The realistic form of the labelling evaluation (real atlases are SAE dictionaries, real bulk
labelling labels another SAE through a map): the foundation SAE is the atlas
``world-<size>-sae`` (`engine.world.sae.register_sae_atlas`), and each subject SAE's decoder rows
are labelled through a map exactly as a user does, ``atlas label MAP --features <SAE folder>``
(`engine.labelling.run.label_features`, the sparsify folder read by the same reader as any
checkpoint). Both SAEs carry ground-truth labels (`engine.world.ground_truth`): a latent's label
is right when its atlas hit has the same ground truth (same topic, or same word).

Per subject × layer × pairing × method (layer: the subject block whose SAE is labelled; every
block by default, SAEs beyond the world's default-layer ones trained on first use):

- ``top1`` / ``top5``: share of labelled subject latents whose first hit (any of the first five)
  has their ground-truth label; ``mrr``: mean 1/rank of the first such hit among the first
  ``K_HITS`` (0 beyond); ``chance_top1``: the top-1 a uniformly random atlas latent would get;
  ``top1_topic`` / ``top1_word``: top-1 over the topic / word latents alone;
- ``concept_mrr``: retrieval of the atlas latents of a concept from the subject's side: the
  subject's own concept direction (centred topic mean) mapped into the atlas, ranked against
  every atlas latent by cosine; mean 1/rank of the first latent whose ground truth is that
  concept's topic, over the concepts that have one.

Maps are fitted from one pass over ``MAX_DOCS`` of the world's training documents per subject (every pairing
the tokenizers allow), each method from the same statistics (`PairedStats.fit`), saved as
``eval-sae.<subject>.L<layer>.<pairing>.<method>`` and used through the store like any map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.align.fit import accumulate_pairs, method_config
from engine.align.map import AlignmentMap, MapSites, load_map, save_map
from engine.align.methods import get_method
from engine.align.pairing import PairingConfig
from engine.models.hooks import Site
from engine.models.loading import tokenizer_fingerprint
from engine.store.store import Store
from engine.world.locate import ensure_registered, world_texts

RUN_PREFIX = "eval-sae."
K_HITS = 10
MAX_DOCS = 2000  # map-fitting documents: ~120k token pairs, 25x the widest world model's d^2 / d
SUBJECT_KEYS = ("subject_a", "subject_b")


@dataclasses.dataclass(frozen=True)
class SAELabellingRow:
    subject: str
    pairing: str
    method: str
    layer: int
    map: str
    n: int  # labelled subject latents scored
    n_latents: int  # all latents of the subject SAE
    top1: float
    top5: float
    mrr: float
    chance_top1: float
    top1_topic: float | None
    top1_word: float | None
    concept_mrr: float | None
    run: str
    features: str = "sae"


def score_hits(subject_keys: Sequence[str | None], atlas_keys: Sequence[str | None], hits: np.ndarray
               ) -> dict[str, float | int | None]:
    """Top-1 / top-5 / MRR of ``hits`` ``(n_subject, K)`` (atlas ordinals, -1 for none) against ground truth.

    Only subject latents with a label are scored; an atlas latent without one never matches.
    """
    atlas = np.asarray([k if k is not None else "" for k in atlas_keys], dtype=object)
    sel = [i for i, k in enumerate(subject_keys) if k is not None]
    if not sel:
        return {"n": 0, "top1": 0.0, "top5": 0.0, "mrr": 0.0, "chance_top1": 0.0, "top1_topic": None,
                "top1_word": None}
    keys = np.asarray([subject_keys[i] for i in sel], dtype=object)
    h = hits[sel]
    got = np.where(h >= 0, atlas[np.clip(h, 0, None)], "")
    match = got == keys[:, None]
    first = np.where(match.any(1), match.argmax(1) + 1, 0)
    rr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    counts = {k: int((atlas == k).sum()) for k in set(keys)}
    top1 = match[:, 0]
    is_topic = np.asarray([k.startswith("topic:") for k in keys])

    def part(mask: np.ndarray) -> float | None:
        return float(top1[mask].mean()) if mask.any() else None

    return {"n": len(sel), "top1": float(top1.mean()), "top5": float(match[:, :5].any(1).mean()),
            "mrr": float(rr.mean()), "chance_top1": float(np.mean([counts[k] / len(atlas) for k in keys])),
            "top1_topic": part(is_topic), "top1_word": part(~is_topic)}


def concept_retrieval_mrr(mapped: np.ndarray, atlas_vectors: np.ndarray, atlas_keys: Sequence[str | None],
                          concept_names: Sequence[str]) -> float | None:
    """Mean 1/rank of the first atlas latent of concept c's topic, querying with ``mapped[c]``."""
    a = atlas_vectors / np.maximum(np.linalg.norm(atlas_vectors, axis=1, keepdims=True), 1e-12)
    q = mapped / np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-12)
    scores = q @ a.T  # (K, n_atlas)
    rrs = []
    for c, name in enumerate(concept_names):
        relevant = np.asarray([k == f"topic:{name}" for k in atlas_keys])
        if not relevant.any():
            continue
        best = scores[c][relevant].max()
        rank = 1 + int((scores[c] > best).sum())  # ties count for the query
        rrs.append(1.0 / rank)
    return float(np.mean(rrs)) if rrs else None


@dataclasses.dataclass(frozen=True)
class MapFitting:
    """How the SAE evaluation fits its maps: the pairings (None: the ones the tokenizers allow), the
    first ``max_docs`` map-fitting texts (None: all), ``max_pairs`` pairs at most, and where the
    models run."""

    pairings: Sequence[str] | None = None
    max_docs: int | None = MAX_DOCS
    max_pairs: int | None = None
    device: str = "cpu"
    dtype: str = "float32"


def evaluate_sae_labelling(store: Store, size: str = "small", seed: int = 0,
                           methods: Sequence[str] = ("procrustes", "ridge", "correlation"),
                           subjects: Sequence[str] = SUBJECT_KEYS, *, fitting: MapFitting = MapFitting(),
                           quiet: bool = False, layers: Sequence[int] | None = None) -> list[SAELabellingRow]:
    """Score labelling each subject SAE through maps onto ``world-<size>-sae``; see the module docstring.

    ``layers``: the subject blocks whose SAEs are scored, the same for every subject (default:
    every block of each subject; a layer a subject lacks is an error, before anything is
    trained). A subject SAE at a layer the world's SAE stage did not train is trained on first
    use and cached (`engine.world.sae.ensure_sae`). Maps are fitted on the first ``max_docs`` of
    the world's map-fitting texts (all: None), with their validation texts whole; one pass per
    subject gives every layer's maps.
    """
    from engine.labelling.export import iter_labels
    from engine.labelling.run import label_features
    from engine.models.loading import load_model
    from engine.world.sae import build_saes, ensure_sae, register_sae_atlas

    for m in methods:
        get_method(m)
    world = ensure_registered(store, size, seed)
    wanted = {key: subject_layers(world, key, layers) for key in subjects}  # bad layers fail before any work
    saes = build_saes(world, progress=not quiet)
    register_sae_atlas(store, world, saes)
    atlas_sae = saes.get("foundation")
    atlas_keys = [e["key"] for e in atlas_sae.ground_truth()]
    atlas_vectors = atlas_sae.decoder()
    foundation = load_model(world.foundation.path, device=fitting.device, dtype=fitting.dtype)
    names = [c.name for c in world.concepts]
    rows: list[SAELabellingRow] = []
    for key in subjects:
        wm = world.model(key)
        sub_saes = {L: ensure_sae(world, saes, key, L, progress=not quiet) for L in wanted[key]}
        sub_keys = {L: [e["key"] for e in s.ground_truth()] for L, s in sub_saes.items()}
        natives = {L: np.asarray(world.concept_directions(key, L)) for L in sub_saes}
        for p, method, amap in sae_maps(store, world, saes, key, methods, fitting, quiet=quiet,
                                        foundation=foundation, layers=wanted[key]):
            assert amap.name is not None  # a stored map
            L = amap.subject_layer
            sub_sae = sub_saes[L]
            run = label_features(store, amap.name, str(sub_sae.path), k=K_HITS, name=f"{RUN_PREFIX}{amap.name}",
                                 overwrite=True, quiet=quiet)
            hits = np.full((run.n_features, K_HITS), -1, dtype=np.int64)
            for fl in iter_labels(store, run.name):
                hits[fl.feature, : len(fl.hits)] = [h.ordinal for h in fl.hits]
            s = score_hits(sub_keys[L], atlas_keys, hits)
            cmrr = concept_retrieval_mrr(amap.map_directions(natives[L]), atlas_vectors, atlas_keys, names)
            rows.append(SAELabellingRow(
                subject=wm.name, pairing=p, method=method, layer=L, map=amap.name, n=int(s["n"] or 0),
                n_latents=sub_sae.n_latents, top1=float(s["top1"] or 0), top5=float(s["top5"] or 0),
                mrr=float(s["mrr"] or 0), chance_top1=float(s["chance_top1"] or 0),
                top1_topic=s["top1_topic"], top1_word=s["top1_word"], concept_mrr=cmrr, run=run.name))
    return rows


def subject_layers(world: Any, key: str, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against subject ``key``'s blocks (None: all of them, 0..n_layers-1)."""
    from engine.world.sae import check_layers

    wm = world.model(key)
    return list(range(wm.n_layers)) if layers is None else check_layers(wm, layers)


def sae_maps(store: Store, world: Any, saes: Any, key: str, methods: Sequence[str],
             fitting: MapFitting = MapFitting(), *, quiet: bool = False, foundation: Any = None,
             layers: Sequence[int] | None = None) -> list[tuple[str, str, AlignmentMap]]:
    """Maps of subject ``key`` at ``layers`` (default: its SAE's layer, the default one) onto
    ``world-<size>-sae``, one per layer, pairing the tokenizers allow (or of ``fitting.pairings``) and
    method, fitted from one pass over the first ``fitting.max_docs`` map-fitting texts and stored as
    ``eval-sae.<subject>.L<layer>.<pairing>.<method>`` (replacing earlier ones). Returns
    ``(pairing, method, stored map)``, by layer, pairing, method."""
    from engine.models.loading import load_model
    from engine.world.sae import ensure_sae, sae_atlas_name

    atlas = store.atlas(sae_atlas_name(world))
    wm = world.model(key)
    Ls = [saes.get(key, wm.default_layer).layer] if layers is None else subject_layers(world, key, layers)
    device, dtype, max_docs = fitting.device, fitting.dtype, fitting.max_docs
    foundation = foundation or load_model(world.foundation.path, device=device, dtype=dtype)
    sub = load_model(wm.path, device=device, dtype=dtype)
    same_tok = tokenizer_fingerprint(sub[1]) == tokenizer_fingerprint(foundation[1])
    ps = [p for p in (fitting.pairings or (("token",) if same_tok else ("span", "text"))) if same_tok or p != "token"]
    if not ps:
        return []
    train, val = world_texts(world)
    train = train[:max_docs] if max_docs else train
    stats = accumulate_pairs(sub, foundation, train, val, Site(tuple(Ls)), Site((atlas.layer,)),
                             method_config(PairingConfig(tuple(ps), max_pairs=fitting.max_pairs), methods), quiet=quiet)
    out = []
    for L in Ls:
        # the two feature dictionaries, for a method that needs them (self_learning)
        vectors = {"subject_vectors": ensure_sae(world, saes, key, L, progress=not quiet).decoder(),
                   "atlas_vectors": saes.get("foundation").decoder()}
        for p in ps:
            for method in methods:
                sites = MapSites(wm.name, L, atlas.name, atlas.model, atlas.layer)
                params = {n: vectors[n] for n in get_method(method).needs}
                info = save_map(store, stats.fit(p, L, method, sites, **params),
                                f"{RUN_PREFIX}{wm.name}.L{L}.{p}.{method}", overwrite=True)
                out.append((p, method, load_map(store, info.name)))
    return out
