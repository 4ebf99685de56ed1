"""Native directions: a subject model's own direction for a concept, where something knows it.

A real model has no known concept directions, but a plug-in may know them for its models
(ConceptWorld knows every subject's centred topic means). `plan.direction == "native"` steers
along them instead of the direction transferred through the map, which gives the ceiling the
transferred direction is measured against. Providers register here; the core knows none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import NotFoundError

if TYPE_CHECKING:
    from engine.store.store import Store

# The subject's own unit direction for a concept label at a layer (None: not known for that label).
NativeSource = Callable[[str, int], "np.ndarray | None"]
# Given the store and a registered subject model's name: its NativeSource, or None when not its model.
NativeProvider = Callable[["Store", str], "NativeSource | None"]
_PROVIDERS: list[NativeProvider] = []


def register_native_directions(provider: NativeProvider) -> None:
    """Add a provider of native directions (each provider once)."""
    if provider in _PROVIDERS:
        raise ValueError(f"native-direction provider {provider!r} is already registered")
    _PROVIDERS.append(provider)


def native_directions(store: Store, subject_model: str) -> NativeSource:
    """The first registered provider's native directions for ``subject_model``."""
    for provider in _PROVIDERS:
        source = provider(store, subject_model)
        if source is not None:
            return source
    raise NotFoundError(f"the native concept directions of {subject_model!r} are unknown (--native works for "
                        "ConceptWorld subjects, whose ground truth is known)")
