"""`AlignmentMap`: an affine subject → atlas map and its inverse, with provenance.

Activations map as x ↦ (x − μx)A + μy (A includes any scale), directions through the linear
part only and re-normalised (docs/design.md §5). The map carries the provenance of both sites, so
applying it to another model, layer or width is a `SiteMismatchError` rather than silent
nonsense, and the typical residual norm of the subject site (mean L2 norm measured in the fit
pass), which the steering executor multiplies its strengths by. Arrays in, arrays out: numpy
stays numpy, torch stays torch (on the input's device and dtype).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from engine.errors import FormatError, ShapeError, SiteMismatchError
from engine.store.maps import MapInfo, MapRecord

if TYPE_CHECKING:
    import torch

    from engine.store.store import Store

TENSOR_KEYS = ("weight", "inverse_weight", "subject_mean", "atlas_mean")

# Arrays in, arrays out: what a map is applied to is what it returns.
Vec = TypeVar("Vec", np.ndarray, "torch.Tensor")


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch: a process that never imported it
    (labelling and search through numpy: `atlas label`, `search`) holds none, and saves its ~1.5 s
    import."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class MapSites:
    """Where a map reads and writes: the subject site and the atlas (with its foundation site)."""

    subject_model: str
    subject_layer: int
    atlas: str
    atlas_model: str
    atlas_layer: int
    subject_hook: str = "resid_post"
    atlas_hook: str = "resid_post"


@dataclass
class AlignmentMap:
    """An affine subject → atlas map and its inverse, with provenance and fit metrics.

    ``weight`` (d_subject, d_atlas) and ``inverse_weight`` (d_atlas, d_subject) are the linear
    parts; ``subject_mean`` (d_subject,) and ``atlas_mean`` (d_atlas,) the centres. When
    ``params["normalize"]`` is set the map was fitted on unit-norm rows: activations are
    normalised on the way in and scaled to the other site's typical norm on the way out.
    """

    weight: np.ndarray
    inverse_weight: np.ndarray
    subject_mean: np.ndarray
    atlas_mean: np.ndarray
    method: str
    subject_model: str = ""
    subject_layer: int = -1
    subject_hook: str = "resid_post"
    atlas: str = ""
    atlas_model: str = ""
    atlas_layer: int = -1
    atlas_hook: str = "resid_post"
    pairing: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    n_pairs: int = 0
    corpus_fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    _torch_cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight)
        self.inverse_weight = np.asarray(self.inverse_weight)
        self.subject_mean = np.asarray(self.subject_mean)
        self.atlas_mean = np.asarray(self.atlas_mean)
        ds, da = self.weight.shape
        if self.inverse_weight.shape != (da, ds) or self.subject_mean.shape != (ds,) or self.atlas_mean.shape != (da,):
            raise ShapeError(
                f"inconsistent map tensors: weight {self.weight.shape}, inverse {self.inverse_weight.shape}, "
                f"means {self.subject_mean.shape} and {self.atlas_mean.shape}"
            )

    # -------------------------------------------------------------- shape and provenance

    @property
    def d_subject(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_atlas(self) -> int:
        return int(self.weight.shape[1])

    @property
    def normalize(self) -> bool:
        return bool(self.params.get("normalize", False))

    @property
    def subject_resid_norm(self) -> float:
        """Typical (mean L2) norm of the subject's residuals at this site, from the fit pass."""
        return float(self.metrics.get("subject_resid_norm", float("nan")))

    @property
    def atlas_resid_norm(self) -> float:
        return float(self.metrics.get("atlas_resid_norm", float("nan")))

    @property
    def subject_site(self) -> str:
        return f"{self.subject_model}@{self.subject_layer}/{self.subject_hook}"

    def check_site(self, model_name: str | None, layer: int | None, dim: int | None, hook: str | None = None) -> None:
        """Raise `SiteMismatchError` unless (model, layer, width, hook) is the subject site of this map."""
        label = f"map {self.name!r}" if self.name else "this map"
        problems = []
        if model_name is not None and self.subject_model and model_name != self.subject_model:
            problems.append(f"model {model_name!r} (fitted on {self.subject_model!r})")
        if layer is not None and self.subject_layer >= 0 and layer != self.subject_layer:
            problems.append(f"layer {layer} (fitted on layer {self.subject_layer})")
        if dim is not None and dim != self.d_subject:
            problems.append(f"width {dim} (fitted on d={self.d_subject})")
        if hook is not None and hook != self.subject_hook:
            problems.append(f"hook {hook!r} (fitted on {self.subject_hook!r})")
        if problems:
            raise SiteMismatchError(
                f"{label} was fitted at {self.subject_site}, not at " + ", ".join(problems)
                + "; fit a map for that site with `atlas align`"
            )

    def check_atlas(self, atlas: str | None, dim: int | None = None) -> None:
        """Raise `SiteMismatchError` unless the atlas (and its width) is this map's target."""
        if (atlas is not None and self.atlas and atlas != self.atlas) or (dim is not None and dim != self.d_atlas):
            raise SiteMismatchError(
                f"map {self.name or ''!r} maps into atlas {self.atlas!r} (d={self.d_atlas}), "
                f"not {atlas!r} (d={dim}); `atlas maps` lists the maps of each atlas"
            )

    # -------------------------------------------------------------- application

    def _mat(self, key: str, like: Any) -> Any:
        arr = getattr(self, key)
        if _is_tensor(like):
            import torch

            ck = (key, like.dtype, like.device)
            if ck not in self._torch_cache:
                self._torch_cache[ck] = torch.as_tensor(arr).to(like.device, like.dtype)
            return self._torch_cache[ck]
        return arr

    def _check_width(self, x: Any, d: int, side: str) -> None:
        if x.shape[-1] != d:
            raise SiteMismatchError(
                f"{side} vectors have width {x.shape[-1]}, map {self.name or ''!r} expects d={d} "
                f"({self.subject_site if side == 'subject' else self.atlas + ' @ layer ' + str(self.atlas_layer)})"
            )

    def _affine(self, x: Any, w: str, mu_in: str, mu_out: str, out_norm: float) -> Any:
        if _is_tensor(x):
            import torch

            if self.normalize:
                x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
            y = (x - self._mat(mu_in, x)) @ self._mat(w, x) + self._mat(mu_out, x)
        else:
            x = np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32))
            if self.normalize:
                x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            y = (x - getattr(self, mu_in)) @ getattr(self, w) + getattr(self, mu_out)
        return y * out_norm if self.normalize else y

    def map_activations(self, x: Vec) -> Vec:
        """Subject residuals (..., d_subject) → atlas coordinates (..., d_atlas)."""
        self._check_width(x, self.d_subject, "subject")
        return self._affine(x, "weight", "subject_mean", "atlas_mean", self.atlas_resid_norm)

    def inverse_activations(self, y: Vec) -> Vec:
        """Atlas-site residuals (..., d_atlas) → subject coordinates (..., d_subject)."""
        self._check_width(y, self.d_atlas, "atlas")
        return self._affine(y, "inverse_weight", "atlas_mean", "subject_mean", self.subject_resid_norm)

    def _directions(self, v: Any, w: str) -> Any:
        if _is_tensor(v):
            import torch

            out = v @ self._mat(w, v)
            return out / torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min(1e-12)
        out = np.asarray(v, dtype=np.result_type(np.asarray(v).dtype, np.float32)) @ getattr(self, w)
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        return out / np.where(norm > 0, norm, 1.0)

    def map_directions(self, v: Vec) -> Vec:
        """Subject directions (..., d_subject) → unit atlas directions (linear part only)."""
        self._check_width(v, self.d_subject, "subject")
        return self._directions(v, "weight")

    def inverse_directions(self, u: Vec) -> Vec:
        """Atlas directions (..., d_atlas) → unit subject directions (linear part of the inverse)."""
        self._check_width(u, self.d_atlas, "atlas")
        return self._directions(u, "inverse_weight")

    # -------------------------------------------------------------- serialisation

    def provenance(self) -> dict[str, Any]:
        """Everything but the tensors, as plain JSON-able data."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in TENSOR_KEYS and not f.name.startswith("_")
        } | {"d_subject": self.d_subject, "d_atlas": self.d_atlas}

    def to_record(self) -> MapRecord:
        """The map as the store saves it: its tensors (float32) and its provenance as plain JSON data."""
        tensors = {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in TENSOR_KEYS}
        return MapRecord(tensors, plain_json(self.provenance()))

    @classmethod
    def from_record(cls, record: MapRecord, **override: Any) -> AlignmentMap:
        """The map of a stored record (``override`` replaces provenance fields); a record that lacks a
        tensor, or whose tensors disagree with its recorded widths, is a `FormatError`."""
        missing = [k for k in TENSOR_KEYS if k not in record.tensors]
        if missing:
            raise FormatError(f"alignment-map file lacks tensors {missing}")
        prov = record.provenance
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in prov.items() if k in known and k not in TENSOR_KEYS}
        kwargs.update(override)
        arrays: dict[str, Any] = {k: record.tensors[k] for k in TENSOR_KEYS}
        amap = cls(**arrays, **kwargs)
        widths = (prov.get("d_subject", amap.d_subject), prov.get("d_atlas", amap.d_atlas))
        if (amap.d_subject, amap.d_atlas) != widths:
            raise FormatError(f"map {amap.name!r}: file has {amap.weight.shape}, database says {widths}")
        return amap

    def to_bytes(self) -> bytes:
        """The map file's bytes (as the store writes them)."""
        return self.to_record().to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, **override: Any) -> AlignmentMap:
        return cls.from_record(MapRecord.from_bytes(data), **override)


def save_map(store: Store, amap: AlignmentMap, name: str | None = None, overwrite: bool = False) -> MapInfo:
    """Store ``amap`` as ``name`` (default: its own name, else ``<subject>-L<layer>-<atlas>-<method>``):
    `Store.save_map_record` of its record, which says how a map is replaced safely."""
    return store.save_map_record(amap.to_record(), name, overwrite)


def load_map(store: Store, name: str) -> AlignmentMap:
    """A stored map (`Store.map_record`: its file checked against its checksum), with its atlas's site."""
    return AlignmentMap.from_record(store.map_record(name))


def plain_json(obj: Any) -> Any:
    """numpy scalars → Python numbers, recursively (for JSON columns and file metadata)."""
    if isinstance(obj, dict):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
