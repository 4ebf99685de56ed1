"""The steering executor: residual-stream edits as forward hooks, and generation under them.

An edit is a unit direction at one subject layer with a strength in units of that site's
typical residual norm (docs/design.md §6): ``add`` moves every edited position by
``strength × norm × u``; ``clamp`` sets the projection onto ``u`` to ``strength × norm``.
Strength in norm units is what makes one number mean the same thing at every layer and in every
model (a prototype here found 0.5–2 × norm steers and ≥ 4 × norm breaks the text).

Why hooks on block outputs, registered with ``prepend=True``: block ``L``'s output is the
residual ``resid_post`` of ``L`` that block ``L+1`` reads, in every architecture
`engine.models.hooks.resolve_blocks` knows; putting the edit first means the library's own hooks (and
any reader installed later) see the edited stream (docs/design.md §10). The hooks are installed by
`engine.models.hooks.residual_hooks`, the one mechanism that reads and edits the stream.

Why positions are counted from the KV cache: with ``positions="new"`` only positions at or after
the prompt length are edited. Without the cache every forward pass sees the whole sequence; with
it, a step sees one new token whose absolute position is the cache length. A pre-hook on the
model reads that length before each forward pass, so both paths edit the same positions by the
same vectors and greedy decoding gives the same token ids with and without the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from engine.errors import BadValueError, ShapeError, SiteMismatchError
from engine.models.hooks import ResidualFn, residual_hooks, resolve_layer
from engine.models.loading import d_model_of
from engine.registry import Registry

Mode = str  # a name in STEERING_MODES: "add", "clamp", or one registered with `register_mode`
# fn(h (B, t, d), u (d,) or (B, 1, d) unit, target (a number, or (B, 1, 1) per row)) -> edited h, out of place
Target = float | torch.Tensor
ModeFn = Callable[[torch.Tensor, torch.Tensor, Target], torch.Tensor]
STEERING_MODES: Registry[ModeFn] = Registry("steering mode")
Positions = Literal["all", "new"]
POSITIONS: tuple[str, ...] = ("all", "new")


def register_mode(name: str) -> Callable[[ModeFn], ModeFn]:
    """Register ``fn(h, u, target) -> h`` as steering mode ``name`` (once)."""
    return STEERING_MODES.register(name)


@register_mode("add")
def _add(h: torch.Tensor, u: torch.Tensor, target: Target) -> torch.Tensor:
    """h + target·u at every edited position."""
    return h + target * u


@register_mode("clamp")
def _clamp(h: torch.Tensor, u: torch.Tensor, target: Target) -> torch.Tensor:
    """Set the projection of h on u to ``target``; the rest of h is unchanged."""
    proj = (h * u).sum(-1, keepdim=True)  # (B, t, 1)
    return h + (target - proj) * u


@dataclass(frozen=True)
class SteeringEdit:
    """One edit at one subject layer; ``direction`` is scaled to unit norm on creation.

    ``direction`` is one vector ``(d,)`` for every sequence, or one per batch row ``(n_rows, d)``
    (row ``i`` steers prompt ``i`` of a `generate` call: many trials, one batch). ``norm`` is the
    site's typical residual norm (mean L2 norm of residuals at the layer), so ``strength=1`` adds
    (or clamps the projection to) one typical residual's length. A per-row edit may also take one
    strength per row (``(n_rows,)``), so cells of several strengths share one batch.
    """

    layer: int
    direction: np.ndarray  # (d_subject,) or (n_rows, d_subject), unit rows
    strength: float | np.ndarray  # a number, or (n_rows,) for a per-row edit
    norm: float
    mode: Mode = "add"
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in STEERING_MODES:
            raise BadValueError(f"mode must be one of {sorted(STEERING_MODES)}, got {self.mode!r}")
        u = np.asarray(self.direction, dtype=np.float64)
        if u.ndim not in (1, 2) or 0 in u.shape:
            raise ShapeError(f"a steering direction must be (d,) or (n_rows, d), got shape {u.shape}")
        n = np.linalg.norm(u, axis=-1, keepdims=True)
        if not np.all(np.isfinite(n)) or np.any(n == 0.0):
            raise ShapeError(f"steering direction {self.label or self.layer!r} is zero or not finite")
        if not (math.isfinite(self.norm) and self.norm > 0):
            raise BadValueError(f"norm must be a positive number (the site's typical residual norm), got {self.norm}")
        object.__setattr__(self, "direction", (u / n).astype(np.float32))
        if np.ndim(self.strength):
            st = np.asarray(self.strength, dtype=np.float64)
            if st.ndim != 1 or u.ndim != 2 or len(st) != len(u):
                raise ShapeError(f"per-row strengths need a per-row direction with as many rows; got strengths of "
                                 f"shape {st.shape} for directions of shape {u.shape}")
            if not np.all(np.isfinite(st)):
                raise BadValueError("strengths must be finite numbers")
            object.__setattr__(self, "strength", st)

    @property
    def dim(self) -> int:
        return int(self.direction.shape[-1])

    @property
    def n_rows(self) -> int | None:
        """Rows of a per-row edit (None: one direction for every row)."""
        return int(self.direction.shape[0]) if self.direction.ndim == 2 else None

    @property
    def target(self) -> float | np.ndarray:
        """Length added (``add``) or projection set (``clamp``): ``strength × norm`` (per row: ``(n_rows,)``)."""
        if isinstance(self.strength, np.ndarray):
            return self.strength * self.norm
        return float(self.strength * self.norm)

    def rows(self, index: Sequence[int]) -> SteeringEdit:
        """The edit for a subset of rows (itself when it is not per-row)."""
        if self.n_rows is None:
            return self
        pick = list(index)
        strength = self.strength[pick] if isinstance(self.strength, np.ndarray) else self.strength
        return dataclasses.replace(self, direction=self.direction[pick], strength=strength)


@dataclass
class _LayerEdit:
    """The edits of one layer, ready for the hot path: (mode function, direction, target) in
    order, directions cast once per dtype and device. Per-row directions are stored as
    ``(n_rows, 1, d)`` so they broadcast over positions, per-row targets as ``(n_rows, 1, 1)``."""

    edits: list[tuple[ModeFn, torch.Tensor, Target]]  # [(fn, u (d,) or (n_rows, 1, d), target)]
    n_rows: int | None = None
    _cast: dict[tuple[torch.dtype, torch.device], list[tuple[ModeFn, torch.Tensor, Target]]] = field(
        default_factory=dict)

    @classmethod
    def build(cls, edits: Sequence[SteeringEdit]) -> _LayerEdit:
        rows = {e.n_rows for e in edits if e.n_rows is not None}
        if len(rows) > 1:
            raise ShapeError(f"per-row edits at one layer disagree on the number of rows: {sorted(rows)}")

        def as_tensor(u: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32))
            return t.unsqueeze(1) if t.ndim == 2 else t  # (n_rows, 1, d) or (d,)

        def as_target(t: float | np.ndarray) -> Target:
            return torch.from_numpy(np.asarray(t, dtype=np.float32)).view(-1, 1, 1) if isinstance(t, np.ndarray) else t

        return cls([(STEERING_MODES[e.mode], as_tensor(e.direction), as_target(e.target)) for e in edits],
                   rows.pop() if rows else None)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (B, t, d) edited out of place."""
        if self.n_rows is not None and h.shape[0] != self.n_rows:
            raise ShapeError(f"a per-row edit has {self.n_rows} rows, the batch has {h.shape[0]}")
        key = (h.dtype, h.device)
        if key not in self._cast:
            self._cast[key] = [(fn, u.to(h.device, h.dtype), t.to(h.device, h.dtype) if isinstance(t, torch.Tensor) else t)
                               for fn, u, t in self.edits]
        for fn, u, target in self._cast[key]:
            h = fn(h, u, target)
        return h


class SteeringHooks:
    """Installed edits; `remove` takes every hook off and may be called any number of times."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.offset = 0  # absolute position of the first token of the current forward pass

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of this forward pass (0 without a cache)."""
    # transformers <= 5.23 passes the cache as `past_key_values`; 5.24 renamed it `cache`.
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    pos = kwargs.get("cache_position")
    return int(pos[0]) if isinstance(pos, torch.Tensor) and pos.numel() else 0


def check_edits(model: torch.nn.Module, edits: Sequence[SteeringEdit], layer_module: str | None = None) -> None:
    """Raise `SiteMismatchError` when an edit's direction does not fit the model's residual width."""
    d = d_model_of(model)
    for e in edits:
        if e.dim != d:
            raise SiteMismatchError(
                f"steering direction {e.label or ''} has dimension {e.dim}, but "
                f"{type(model).__name__} has a residual stream of width {d}: the direction (or its "
                "map) belongs to another model"
            )
        resolve_layer(model, e.layer, layer_module)


@contextlib.contextmanager
def steer(
    model: torch.nn.Module,
    edits: Sequence[SteeringEdit],
    positions: Positions = "all",
    prompt_length: int = 0,
    *,
    layer_module: str | None = None,
) -> Iterator[SteeringHooks]:
    """Install ``edits`` as forward hooks on the model's blocks; always removed on exit.

    ``positions="new"`` edits only positions ``>= prompt_length`` (the generated tokens).
    With no edits this installs nothing, so unsteered runs pay nothing.
    """
    if positions not in POSITIONS:
        raise BadValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    check_edits(model, edits, layer_module)
    by_layer: dict[int, list[SteeringEdit]] = {}
    for e in edits:
        by_layer.setdefault(resolve_layer(model, e.layer, layer_module), []).append(e)
    hooks = SteeringHooks()

    def make_edit(le: _LayerEdit) -> ResidualFn:
        def edit(_layer: int, h: torch.Tensor) -> torch.Tensor | None:  # h (B, t, d)
            if positions == "new":
                first = prompt_length - hooks.offset  # index of the first position to edit
                if first >= h.shape[1]:
                    return None
                if first > 0:
                    return torch.cat([h[:, :first], le.apply(h[:, first:])], dim=1)
            return le.apply(h)

        return edit

    def track_offset(_module, _args, kwargs):
        hooks.offset = _cache_length(kwargs)

    fns = {layer: make_edit(_LayerEdit.build(group)) for layer, group in sorted(by_layer.items())}
    try:
        if positions == "new" and by_layer:
            hooks.handles.append(model.register_forward_pre_hook(track_offset, with_kwargs=True, prepend=True))
        with residual_hooks(model, fns, "resid_post", layer_module=layer_module, prepend=True) as handles:
            hooks.handles.extend(handles)
            yield hooks
    finally:
        hooks.remove()


# ----------------------------------------------------------------------------- generation


# ----------------------------------------------------------------------------- measurements


