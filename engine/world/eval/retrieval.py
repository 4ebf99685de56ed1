"""Retrieval on ConceptWorld: MRR / MPP / top-k of each subject's concept directions through maps.

One pass per subject runs both models over the world's training documents and accumulates
statistics per (pairing, layer); every method is then fitted from them and scored with
`engine.align.metrics.evaluate_maps` (docs/design.md §8). The world's held-out documents define
the ground-truth directions, so no fit ever sees them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from engine.align.evaluate import RetrievalRow, evaluate_maps
from engine.align.fit import accumulate_pairs, method_config
from engine.align.methods import get_method
from engine.align.pairing import PairingConfig
from engine.models.hooks import Site, resolve_blocks, resolve_layer
from engine.models.loading import tokenizer_fingerprint
from engine.store.store import Store
from engine.world.build import World
from engine.world.locate import find_world, subject_key, world_texts


def evaluate_world_retrieval(
    store: Store | None,
    size: str = "tiny",
    seed: int = 0,
    methods: Sequence[str] = ("procrustes", "ridge", "correlation"),
    layers: Sequence[int] | None = None,
    pairings: Sequence[str] | None = None,
    subjects: Sequence[str] | None = None,
    config: PairingConfig = PairingConfig(),
    quiet: bool = False,
    world: World | None = None,
) -> list[RetrievalRow]:
    """Retrieval MRR / MPP / top-k per subject × pairing × layer × method on ConceptWorld.

    Targets are the foundation's concept directions at the atlas layer (the world atlas's
    vectors); queries are each subject's own concept directions at each of its layers. Subject A
    shares the foundation's tokenizer (``token`` pairing by default); subject B does not
    (``span`` and ``text``). ``config``: how the pass runs (pairs per pairing, batch size, device
    and dtype the models are loaded in); its pairings are ``pairings`` (None: by tokenizer, as above).
    """
    from engine.models.loading import load_model

    for m in methods:
        get_method(m)  # unknown names fail before the world is built or loaded
    if world is None:
        assert store is not None, "a store is needed to find the world when none is given"
        world = find_world(store, size, seed)
    atlas_layer = world.foundation.atlas_layer
    foundation = load_model(world.foundation.path, device=config.device, dtype=config.dtype)
    targets = np.asarray(world.concept_directions("foundation", atlas_layer))  # (K, d_f)
    true_index = np.arange(targets.shape[0])
    train, val = world_texts(world)
    rows: list[RetrievalRow] = []
    for s in subjects or ("a", "b"):
        key = subject_key(s)
        spec = world.model(key)
        sub = load_model(spec.path, device=config.device, dtype=config.dtype)
        same_tok = tokenizer_fingerprint(sub[1]) == tokenizer_fingerprint(foundation[1])
        ps = list(pairings or (("token",) if same_tok else ("span", "text")))
        if not same_tok and "token" in ps:
            ps.remove("token")  # impossible across tokenizers; the table says so by its absence
        if not ps:
            continue
        ls = [resolve_layer(sub[0], L) for L in (layers if layers is not None else range(spec.n_layers))]
        stats = accumulate_pairs(sub, foundation, train, val, Site(tuple(ls)), Site((atlas_layer,)),
                                 method_config(dataclasses.replace(config, pairings=tuple(ps)), methods), quiet=quiet)
        queries = {L: np.asarray(world.concept_directions(key, L)) for L in ls}
        rows += evaluate_maps(stats, queries, targets, true_index, methods, subject=spec.name)
    return rows


def evaluate_model_retrieval(
    store: Store,
    model: str,
    size: str = "tiny",
    seed: int = 0,
    methods: Sequence[str] = ("procrustes", "ridge"),
    layers: Sequence[int] | None = None,
    pairings: Sequence[str] | None = None,
    config: PairingConfig = PairingConfig(),
    kind: str | None = None,
    quiet: bool = False,
) -> list[RetrievalRow]:
    """Retrieval of any registered model's topic directions through maps onto the world atlas.

    ``model`` (a registered name, or a folder / hub id registered on the spot; ``kind`` encoder for
    a BERT-style model) is the subject: its topic directions (centred topic means over the world's
    held-out documents, the world's own definition) at each of ``layers`` (default: every block)
    are the queries; maps are fitted from one pass over the world's training texts (``span``
    pairing across tokenizers, ``config.max_pairs`` at most, on ``config.device`` in
    ``config.dtype``) and scored as for the world's subjects.
    """
    from engine.models.loading import load_model
    from engine.models.registry import resolve_model
    from engine.world.directions import concept_directions
    from engine.world.locate import ensure_registered

    for m in methods:
        get_method(m)
    world = ensure_registered(store, size, seed)
    atlas_layer = world.foundation.atlas_layer
    foundation = load_model(world.foundation.path, device=config.device, dtype=config.dtype)
    targets = np.asarray(world.concept_directions("foundation", atlas_layer))  # (K, d_f)
    name, sm, stok = resolve_model(store, model, kind=kind, device=config.device, dtype=config.dtype)  # type: ignore[arg-type]
    same_tok = tokenizer_fingerprint(stok) == tokenizer_fingerprint(foundation[1])
    ps = list(pairings or (("token",) if same_tok else ("span",)))
    ls = [resolve_layer(sm, L) for L in (layers if layers is not None else range(len(resolve_blocks(sm))))]
    train, val = world_texts(world)
    stats = accumulate_pairs((sm, stok), foundation, train, val, Site(tuple(ls)), Site((atlas_layer,)),
                             method_config(dataclasses.replace(config, pairings=tuple(ps)), methods), quiet=quiet)
    queries = concept_directions(sm, stok, world.heldout_docs, len(world.concepts), ls)
    return evaluate_maps(stats, queries, targets, np.arange(targets.shape[0]), methods, subject=name)
