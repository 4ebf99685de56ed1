"""Subject features to label: directions read from a source named on the command line.

A source is what `atlas label --features SOURCE` names: a subject SAE folder (SAELens, or Gemma
Scope ``params.npz``; the decoder rows are the features), a plain ``.npy`` / ``.safetensors``
matrix (one direction per row), or ``native:`` directions of ConceptWorld's subject model. The
readers are those of `engine.atlas.importers`; this module adds what a labelling run needs on top of them:
a canonical spec string that can be re-opened on resume, and a fingerprint of the exact vectors,
so a run resumed on a source that changed in the meantime stops with a clear error instead of
mixing labels of two different feature sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import FormatError, NotFoundError, ShapeError
from engine.store.store import Store

if TYPE_CHECKING:
    from engine.align.map import AlignmentMap  # imports torch: only for the annotations

NATIVE_PREFIX = "native:"


@dataclasses.dataclass(frozen=True)
class FeatureSource:
    """Subject feature directions ``vectors`` (n_features, d_subject), with where they came from."""

    spec: str  # canonical: an absolute path (``path#key`` for a named tensor) or ``native:...``
    kind: str  # saelens | gemmascope | matrix | native
    vectors: np.ndarray  # (n_features, d_subject) float32
    fingerprint: str  # sha256 of the shape and float32 bytes of ``vectors``
    model: str | None = None  # the site recorded by the source, when it records one
    layer: int | None = None
    hook: str | None = None

    @property
    def n_features(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def fingerprint(vectors: np.ndarray) -> str:
    """sha256 over the shape and the float32 bytes of ``vectors`` (what a run actually labels)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    h = hashlib.sha256(f"{x.shape[0]}x{x.shape[1]}:float32:".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def canonical_spec(source: str | Path, key: str | None = None) -> str:
    """The spec stored with a run: absolute paths, so a resume from another folder finds the file."""
    text = str(source)
    if text.startswith(NATIVE_PREFIX):
        return text
    path, _, inline_key = text.partition("#")
    key = key or (inline_key or None)
    resolved = str(Path(path).expanduser().resolve())
    return f"{resolved}#{key}" if key else resolved


def open_feature_source(source: str | Path, *, key: str | None = None, store: Store | None = None,
                        amap: AlignmentMap | None = None) -> FeatureSource:
    """Read the features named by ``source`` (see the module docstring for the forms).

    ``key`` names the tensor inside a ``.safetensors`` holding several (also ``file#key``).
    ``native:`` sources need the ``store`` and the alignment map ``amap`` whose subject site they
    are computed at.
    """
    spec = canonical_spec(source, key)
    if spec.startswith(NATIVE_PREFIX):
        if store is None or amap is None:
            raise FormatError(f"{spec}: native directions need the store and the map's subject site")
        size, seed = _native_world(spec, amap.subject_model)
        spec = f"{NATIVE_PREFIX}{size}:{seed}"
        vectors = _native_directions(store, amap, size, seed)
        return _source(spec, "native", vectors, amap.subject_model, amap.subject_layer, "resid_post")

    from engine.atlas.importers import read_directions, read_matrix

    path, _, inline_key = spec.partition("#")
    if not Path(path).exists():
        raise FormatError(f"{path}: no such file or folder (features are an SAE folder, params.npz, .npy or .safetensors)")
    sae = read_matrix(path, inline_key) if inline_key else read_directions(path)
    return _source(spec, sae.source_kind, sae.W_dec, sae.model, sae.layer, sae.hook)


_WORLD_MODEL = re.compile(r"^world-(tiny|small)(?:-s(\d+))?-")


def _native_world(spec: str, subject_model: str) -> tuple[str, int]:
    """``native:``, ``native:SIZE`` or ``native:SIZE:SEED`` → (size, seed); the bare form reads
    them from the subject's store name (``world-<size>[-s<seed>]-...``)."""
    parts = [p for p in spec[len(NATIVE_PREFIX):].split(":") if p]
    m = _WORLD_MODEL.match(subject_model)
    if not parts and m is None:
        raise FormatError(
            f"{spec}: model {subject_model!r} is not a ConceptWorld model, so it has no native concept directions; "
            "native: works for maps of world subjects (e.g. world-small-subject_a)"
        )
    size = parts[0] if parts else m.group(1)
    if size not in ("tiny", "small") or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise FormatError(f"{spec}: write native:, native:SIZE or native:SIZE:SEED (SIZE tiny or small)")
    seed = int(parts[1]) if len(parts) == 2 else int(m.group(2) or 0) if m else 0
    return size, seed


def _native_directions(store: Store, amap: AlignmentMap, size: str, seed: int) -> np.ndarray:
    """The map's subject's own concept directions at its layer: ConceptWorld's ground truth.

    The world is the one the subject model was registered from (its folder holds the model), else
    the world of that size and seed cached in the store (built if missing).
    """
    if amap.subject_hook != "resid_post":
        raise FormatError(f"native directions are read at resid_post; map {amap.name!r} is at {amap.subject_hook}")
    world = _world_of(store, amap.subject_model, size, seed)
    keys = [k for k, wm in world.models.items() if wm.name == amap.subject_model]
    if not keys:
        names = ", ".join(wm.name for wm in world.models.values())
        raise FormatError(
            f"native:{size}:{seed}: map {amap.name!r} is on {amap.subject_model!r}, not a model of this world ({names})"
        )
    return np.asarray(world.concept_directions(keys[0], amap.subject_layer), dtype=np.float32)


def _world_of(store: Store, model_name: str, size: str, seed: int):
    world = _world_at(store, model_name)
    return world if world is not None and (world.size, world.seed) == (size, seed) else world_for(store, size, seed)


def _world_at(store: Store, model_name: str):
    """The world a registered world model was loaded from (its folder holds the model), if any."""
    from engine.world.build import load_world
    from engine.world.config import MANIFEST

    try:
        source = store.get_model(model_name).source
    except NotFoundError:
        return None
    return load_world(Path(source).parent) if source and (Path(source).parent / MANIFEST).is_file() else None


def world_for(store: Store, size: str, seed: int):
    """The ConceptWorld of ``size`` and ``seed`` whose models the store has registered, else the one
    cached (or built) under ``<store>/models``."""
    from engine.world.build import world_name

    world = _world_at(store, f"{world_name(size, seed)}-foundation")
    if world is not None:
        return world
    from engine.align.fit import load_world as cached_world

    return cached_world(store, size, seed)


def _source(spec: str, kind: str, vectors: np.ndarray, model, layer, hook) -> FeatureSource:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or 0 in x.shape:
        raise ShapeError(f"{spec}: features must be a non-empty (n_features, d) matrix, got {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise FormatError(f"{spec}: feature {bad} has NaN or infinite values")
    return FeatureSource(spec, kind, x, fingerprint(x), model, None if layer is None else int(layer), hook)
