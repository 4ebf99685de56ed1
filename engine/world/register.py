"""Put a built ConceptWorld into a store: its three models and the foundation atlas.

The atlas is ``world-<size>``: one concept per world concept, labelled with the concept's label
and description, whose vector is the foundation's concept direction (centred topic mean) at its
atlas layer. The subjects' own directions are ground truth for evaluation only and are not
registered: they stay in the world folder (`World.concept_directions`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import NotFoundError
from engine.store.store import AtlasSource, Store
from engine.world.build import World


def register_world(store: Store, world: World, replace: bool = False) -> dict[str, Any]:
    """Register ``world``'s models and its foundation atlas in ``store``; return what was registered.

    Models are upserted (their rows point at the world's model folders). The atlas is added
    once; if an atlas of that name exists it is kept, unless ``replace`` (then it is removed and
    added again from this world).
    """
    registered_models = []
    for wm in world.models.values():
        store.add_model(
            wm.name,
            source=str(wm.path),
            architecture=wm.architecture,
            d_model=wm.d_model,
            n_layers=wm.n_layers,
            revision=world.fingerprint,
            tokenizer_fingerprint=wm.tokenizer_fingerprint,
            extra={"world": world.name, "world_key": wm.key,
                   "default_layer": wm.default_layer, "tokenizer_kind": wm.tokenizer_kind},
        )
        registered_models.append(wm.name)

    existing = True
    try:
        store.atlas(world.atlas_name)
    except NotFoundError:
        existing = False
    if existing and replace:
        store.remove_atlas(world.atlas_name)
        existing = False
    if not existing:
        layer = world.foundation.atlas_layer
        vectors = world.concept_directions("foundation", layer)  # (K, d_foundation)
        store.add_atlas(
            world.atlas_name, vectors, labels=[c.label for c in world.concepts],
            descriptions=[c.description for c in world.concepts], raw_residuals=True,
            extra={"world": world.name, "size": world.size, "seed": world.seed,
                   "concept_names": [c.name for c in world.concepts],
                   "members": {c.name: list(c.members) for c in world.concepts},
                   "definition": "centred topic means of resid_post over held-out documents"},
            source=AtlasSource(model=world.foundation.name, layer=layer, hook="resid_post", kind="conceptworld",
                               ref=f"{world.name}@{world.fingerprint}", revision=world.fingerprint),
        )
    return {"models": registered_models, "atlas": world.atlas_name, "atlas_existed": existing}


def concept_ordinals(store: Store, world: Any) -> np.ndarray:
    """Atlas ordinal of each world concept, matched by label (the world atlas's labels are the
    concept labels; by position where a label is missing)."""
    by_label = {label: i for i, label in enumerate(store.labels(world.atlas_name))}
    return np.asarray([by_label.get(c.label, i) for i, c in enumerate(world.concepts)], dtype=np.int64)
