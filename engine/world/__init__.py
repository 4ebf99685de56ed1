"""ConceptWorld: a deterministic world of small trained `transformers` models with known concepts.

Nothing can download model weights here, yet tests, the demo and benchmarks need real models
whose concepts are known. ConceptWorld generates a seeded corpus of documents, each about one
concept (a topic), trains two tokenizers and three models on it (a GPT-2 foundation and two
subjects of other architectures and widths, one with another tokenizer), and derives the
foundation atlas and every model's ground-truth concept directions from topic means of the
residual stream (docs/design.md §7). `build_world` builds or reuses one; `register_world` puts its models
and atlas into a store; `engine.world.locate` finds the world of a store.

Importing this package installs ConceptWorld's plug-ins into the core's registries (the
``native:`` feature source and native steering directions; `engine.world.plugin`).

Heavy imports (torch, transformers) happen when the submodules are used, not on import here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.world.plugin import install

if TYPE_CHECKING:
    from engine.world.build import World, WorldModel, build_world, load_world
    from engine.world.concepts import CONCEPTS, Concept
    from engine.world.config import WorldConfig, config_for
    from engine.world.gates import ModelGates, WorldReport
    from engine.world.register import register_world

_EXPORTS = {
    "World": "engine.world.build",
    "WorldModel": "engine.world.build",
    "build_world": "engine.world.build",
    "load_world": "engine.world.build",
    "CONCEPTS": "engine.world.concepts",
    "Concept": "engine.world.concepts",
    "WorldConfig": "engine.world.config",
    "config_for": "engine.world.config",
    "ModelGates": "engine.world.gates",
    "WorldReport": "engine.world.gates",
    "register_world": "engine.world.register",
}

__all__ = [
    "CONCEPTS",
    "Concept",
    "ModelGates",
    "World",
    "WorldConfig",
    "WorldModel",
    "WorldReport",
    "build_world",
    "config_for",
    "load_world",
    "register_world",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.world' has no attribute {name!r}")


install()
