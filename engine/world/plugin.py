"""ConceptWorld as a plug-in: what it adds to the core's registries, like any plug-in would.

- the ``native:`` feature source (`engine.labelling.sources.register_feature_source`): a world
  subject's own concept directions, for ``atlas label MAP --features native:``;
- native steering directions (`engine.steering.native.register_native_directions`), for
  ``atlas steer --native``;
- the ``world`` built-in corpus (`engine.align.corpus.BUILTIN_CORPORA`), for ``atlas align --world``.

`install` runs when ``engine.world`` is imported (the CLI's world plug-in imports it). The entries import the
world's modules only when called: those load torch and transformers, which ``atlas --help``
should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.align.corpus import BUILTIN_CORPORA, BuiltinCorpus
from engine.labelling.sources import FeatureSource, register_feature_source
from engine.steering.native import NativeSource, register_native_directions

if TYPE_CHECKING:
    from engine.align.map import AlignmentMap
    from engine.store.store import Store

_installed = False


def _open_native(spec: str, store: Store | None, amap: AlignmentMap | None) -> FeatureSource:
    from engine.world.sources import open_native

    return open_native(spec, store, amap)


def _native_directions(store: Store, subject_model: str) -> NativeSource | None:
    from engine.world.sources import native_steering_directions

    return native_steering_directions(store, subject_model)


def _world_corpus(store: Store, size: str, seed: int) -> BuiltinCorpus:
    from engine.world.locate import SUBJECT_KEYS, ensure_registered, world_texts

    world = ensure_registered(store, size, seed)
    texts, heldout = world_texts(world)
    subjects = {alias: world.model(key).name for short, key in SUBJECT_KEYS.items() for alias in (short, key)}
    return BuiltinCorpus(texts, heldout, world.atlas_name, subjects)


def install() -> None:
    """Register ConceptWorld's feature source and native directions (once per process)."""
    global _installed
    if _installed:
        return
    register_feature_source("native", _open_native)
    register_native_directions(_native_directions)
    BUILTIN_CORPORA.add("world", _world_corpus)
    _installed = True


__all__ = ["install"]
