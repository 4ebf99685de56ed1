"""``native:`` features: a ConceptWorld subject's own concept directions, as a labelling source.

``atlas label MAP --features native:[SIZE[:SEED]]`` labels the subject's ground-truth concept
directions (centred topic means at the map's layer) through the map, which is how the labelling
evaluation scores the whole path a user runs. Registered with the core's feature-source
registry (`engine.labelling.sources.register_feature_source`), like any plug-in's source.
"""

from __future__ import annotations

import re

import numpy as np

from engine.align.map import AlignmentMap
from engine.errors import FormatError
from engine.labelling.sources import FeatureSource, make_source
from engine.steering.native import NativeSource
from engine.store.store import Store
from engine.world.config import SIZES
from engine.world.locate import find_world, world_of_model

SCHEME = "native"
_WORLD_MODEL = re.compile(rf"^world-({'|'.join(SIZES)})(?:-s(\d+))?-")


def open_native(spec: str, store: Store | None, amap: AlignmentMap | None) -> FeatureSource:
    """The features of ``native:``, ``native:SIZE`` or ``native:SIZE:SEED`` at ``amap``'s subject site."""
    if store is None or amap is None:
        raise FormatError(f"{spec}: native directions need the store and the map's subject site")
    size, seed = _native_world(spec, amap.subject_model)
    vectors = _native_directions(store, amap, size, seed)
    return make_source(f"{SCHEME}:{size}:{seed}", SCHEME, vectors, amap.subject_model, amap.subject_layer,
                       "resid_post")


def _native_world(spec: str, subject_model: str) -> tuple[str, int]:
    """(size, seed) of a ``native:`` spec; the bare form reads them from the subject's store name
    (``world-<size>[-s<seed>]-...``)."""
    parts = [p for p in spec[len(SCHEME) + 1:].split(":") if p]
    m = _WORLD_MODEL.match(subject_model)
    if not parts and m is None:
        raise FormatError(
            f"{spec}: model {subject_model!r} is not a ConceptWorld model, so it has no native concept directions; "
            "native: works for maps of world subjects (e.g. world-small-subject_a)"
        )
    size = parts[0] if parts else m.group(1)  # type: ignore[union-attr]
    if size not in SIZES or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise FormatError(f"{spec}: write native:, native:SIZE or native:SIZE:SEED (SIZE {', '.join(SIZES)})")
    seed = int(parts[1]) if len(parts) == 2 else int(m.group(2) or 0) if m else 0
    return size, seed


def _native_directions(store: Store, amap: AlignmentMap, size: str, seed: int) -> np.ndarray:
    """The map's subject's own concept directions at its layer: ConceptWorld's ground truth.

    The world is the one the subject model was registered from (its folder holds the model), else
    the world of that size and seed found in the store (`engine.world.locate.find_world`).
    """
    if amap.subject_hook != "resid_post":
        raise FormatError(f"native directions are read at resid_post; map {amap.name!r} is at {amap.subject_hook}")
    world = world_of_model(store, amap.subject_model)
    if world is None or (world.size, world.seed) != (size, seed):
        world = find_world(store, size, seed)
    keys = [k for k, wm in world.models.items() if wm.name == amap.subject_model]
    if not keys:
        names = ", ".join(wm.name for wm in world.models.values())
        raise FormatError(
            f"native:{size}:{seed}: map {amap.name!r} is on {amap.subject_model!r}, not a model of this world ({names})"
        )
    return np.asarray(world.concept_directions(keys[0], amap.subject_layer), dtype=np.float32)


def native_steering_directions(store: Store, subject_model: str) -> NativeSource | None:
    """Native directions of a ConceptWorld subject by concept label (or name) and layer, for
    `atlas steer --native`; None for a model that is not a world's."""
    world = world_of_model(store, subject_model)
    keys = [k for k, wm in world.models.items() if wm.name == subject_model] if world is not None else []
    if world is None or not keys:
        return None
    key = keys[0]
    index = {c.label.lower(): i for i, c in enumerate(world.concepts)} | {c.name: i for i, c in enumerate(world.concepts)}

    def native(label: str, layer: int) -> np.ndarray | None:
        i = index.get(label.lower())
        return None if i is None else np.asarray(world.concept_directions(key, layer)[i], dtype=np.float32)

    return native
