"""Finding a ConceptWorld from a store: the one way, used by every command and evaluation.

A world is found, in this order: through the folder its registered models were loaded from (a
world model is registered with its source ``<world folder>/<model key>``, so the world is that
folder's parent), else the world of that size and seed cached under the store's ``models/``
(built there if missing). `ensure_registered` also puts its models and atlas into the store.
"""

from __future__ import annotations

from pathlib import Path

from engine.align.corpus import split_heldout
from engine.errors import NotFoundError
from engine.store import layout
from engine.store.store import Store
from engine.world.build import World, build_world, load_world, world_name
from engine.world.config import MANIFEST
from engine.world.register import register_world

# World model keys by the short names the CLI accepts (`a`, `subject_a`, `subject-a`).
SUBJECT_KEYS = {"a": "subject_a", "b": "subject_b"}


def subject_key(name: str) -> str:
    """``"a"``, ``"subject_a"`` or ``"subject-a"`` → the world's model key ``"subject_a"``."""
    key = SUBJECT_KEYS.get(name.lower().replace("-", "_").removeprefix("subject_"))
    if key is None:
        raise NotFoundError(f"unknown world subject {name!r}; use a or b")
    return key


def world_of_model(store: Store, model_name: str) -> World | None:
    """The world a registered model was loaded from (its folder's parent holds the world), if any."""
    try:
        source = store.get_model(model_name).source
    except NotFoundError:
        return None
    folder = Path(source).expanduser().parent if source else None
    return load_world(folder) if folder is not None and (folder / MANIFEST).is_file() else None


def find_world(store: Store, size: str = "tiny", seed: int = 0) -> World:
    """The world of ``size`` and ``seed`` whose models the store has registered, else the one
    cached (or built now) under ``<store>/models``."""
    world = world_of_model(store, f"{world_name(size, seed)}-foundation")
    if world is not None and (world.size, world.seed) == (size, seed):
        return world
    return build_world(size=size, seed=seed, root=Path(store.path) / layout.MODELS_DIR)


def ensure_registered(store: Store, size: str = "tiny", seed: int = 0) -> World:
    """`find_world`, with its models and atlas registered in the store (once)."""
    world = find_world(store, size, seed)
    try:
        store.atlas(world.atlas_name)
    except NotFoundError:
        register_world(store, world)
    return world


def world_texts(world: World) -> tuple[list[str], list[str]]:
    """(training texts, validation texts) for fitting maps on a world.

    Both come from the world's training documents (a tenth held out by hash, for λ and the fit
    metrics). The world's own held-out documents define the ground-truth concept directions the
    evaluations score, so no fit ever sees them.
    """
    return split_heldout([t for t, _ in world.train_docs])


def corpus_lines(store: Store, size: str = "tiny", seed: int = 0, split: str = "train", *, labelled: bool = False,
                 limit: int | None = None) -> list[str]:
    """The world's ``train`` or ``heldout`` documents as corpus lines: plain texts, or JSONL rows with
    the concept's label and description (`atlas world corpus`)."""
    import json

    world = ensure_registered(store, size, seed)
    docs = world.train_docs if split == "train" else world.heldout_docs
    docs = docs[:limit] if limit is not None else docs
    if not labelled:
        return [t for t, _ in docs]
    return [json.dumps({"text": t, "label": world.concepts[k].label, "description": world.concepts[k].description},
                       ensure_ascii=False) for t, k in docs]
