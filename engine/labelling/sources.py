"""Subject features to label: directions read from a source named on the command line.

A source is what `atlas label --features SOURCE` names: a subject SAE in any format the importers'
registry reads (SAELens, Gemma Scope ``params.npz``, EleutherAI sparsify, dictionary_learning
``ae.pt``, Llama Scope; the decoder rows are the features), a plain ``.npy`` / ``.safetensors``
matrix (one direction per row), or ``<scheme>:...``, a source a plug-in registered with
`register_feature_source` (ConceptWorld registers ``native:``, its subjects' own concept
directions). The readers are those of `engine.atlas.importers`; this module adds what a
labelling run needs on top of them:
a canonical spec string that can be re-opened on resume, and a fingerprint of the exact vectors,
so a run resumed on a source that changed in the meantime stops with a clear error instead of
mixing labels of two different feature sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.atlas.importers import read_directions, read_matrix
from engine.errors import FormatError, ShapeError
from engine.registry import Registry
from engine.store.vectorfiles import check_query_rows

if TYPE_CHECKING:
    from engine.align.map import AlignmentMap
    from engine.store.store import Store


@dataclasses.dataclass(frozen=True)
class FeatureSource:
    """Subject feature directions ``vectors`` (n_features, d_subject), with where they came from."""

    spec: str  # canonical: an absolute path (``path#key`` for a named tensor) or ``<scheme>:...``
    kind: str  # a registered SAE format (saelens, eai-sparsify, ...), matrix, or a registered scheme (native)
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
    h.update(x.data)  # C-contiguous: the raw float32 bytes, no copy
    return h.hexdigest()


def canonical_spec(source: str | Path, key: str | None = None) -> str:
    """The spec stored with a run: absolute paths, so a resume from another folder finds the file."""
    text = str(source)
    if _scheme_of(text) is not None:
        return text
    path, _, inline_key = text.partition("#")
    key = key or (inline_key or None)
    resolved = str(Path(path).expanduser().resolve())
    return f"{resolved}#{key}" if key else resolved


# Openers of sources named ``<scheme>:...`` (e.g. ConceptWorld's ``native:``), by scheme.
SourceOpener = Callable[[str, "Store | None", "AlignmentMap | None"], FeatureSource]
_SCHEMES: Registry[SourceOpener] = Registry("feature source scheme")
_SCHEME = re.compile(r"^([a-z][a-z0-9_]*):")


def register_feature_source(scheme: str, opener: SourceOpener) -> None:
    """Let ``atlas label --features <scheme>:...`` open features with ``opener(spec, store, amap)``.

    Plug-ins register their sources this way (ConceptWorld registers ``native``); a scheme is
    registered once.
    """
    if not _SCHEME.match(f"{scheme}:"):
        raise ValueError(f"a feature source scheme is lower-case letters, digits and '_', got {scheme!r}")
    _SCHEMES.add(scheme, opener)


def source_plugins() -> tuple[str, ...]:
    """The modules that registered feature sources: another process (a Ray worker) imports them
    to open the same sources."""
    return tuple(sorted({opener.__module__ for opener in _SCHEMES.values()}))


def _scheme_of(spec: str) -> str | None:
    m = _SCHEME.match(spec)
    return m.group(1) if m and m.group(1) in _SCHEMES else None


def open_feature_source(source: str | Path, *, key: str | None = None, store: Store | None = None,
                        amap: AlignmentMap | None = None) -> FeatureSource:
    """Read the features named by ``source`` (see the module docstring for the forms).

    ``key`` names the tensor inside a ``.safetensors`` holding several (also ``file#key``).
    ``<scheme>:...`` sources go to the opener registered for the scheme, with the ``store`` and
    the alignment map ``amap`` whose subject site they are read at.
    """
    spec = canonical_spec(source, key)
    scheme = _scheme_of(spec)
    if scheme is not None:
        return _SCHEMES[scheme](spec, store, amap)
    path, _, inline_key = spec.partition("#")
    if not Path(path).exists():
        known = "".join(f", {s}:" for s in sorted(_SCHEMES))
        raise FormatError(f"{path}: no such file or folder (features are an SAE folder, params.npz, .npy, "
                          f".safetensors{known})")
    sae = read_matrix(path, inline_key) if inline_key else read_directions(path)
    return make_source(spec, sae.source_kind, sae.W_dec, sae.model, sae.layer, sae.hook)


def make_source(spec: str, kind: str, vectors: np.ndarray, model: str | None = None, layer: int | None = None,
                hook: str | None = None) -> FeatureSource:
    """A checked `FeatureSource`: a non-empty (n_features, d) float32 matrix of directions, each by the
    rule import and search apply (`check_query_rows`: finite, non-zero, a norm float32 holds), and its
    fingerprint."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or 0 in x.shape:
        raise ShapeError(f"{spec}: features must be a non-empty (n_features, d) matrix, got {x.shape}")
    check_query_rows(x, "directions", f"{spec}: features")
    return FeatureSource(spec, kind, x, fingerprint(x), model, None if layer is None else int(layer), hook)
