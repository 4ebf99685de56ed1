"""The residual stream of a model: its blocks, and the hooks that read and edit it.

Reading and editing the residual stream needs one thing from a model: the ``ModuleList`` of its
transformer blocks. Block ``L``'s output is ``resid_post`` of layer ``L`` (and ``resid_pre`` of
``L+1``); its input is ``resid_pre`` of ``L``. We read and edit through our own forward hooks on
those blocks, never through ``output_hidden_states`` (in transformers 5.x those are gathered by
the library's own hooks, attached at the first forward pass, and do not show edits made by hooks
registered later; docs/design.md §10).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from engine.errors import ArchitectureError, BadValueError, ShapeError

Hook = Literal["resid_post", "resid_pre"]
SITES: tuple[str, ...] = ("resid_post", "resid_pre")


@dataclass(frozen=True)
class Site:
    """Where activations are read in one model: block index(es), hook point, and the block list.

    ``layers`` may count from the end (negative), resolved against the model when used;
    ``layer_module`` names the block list by hand for an architecture `resolve_blocks` does not know.
    """

    layers: tuple[int, ...]
    hook: str = "resid_post"  # resid_post: a block's output; resid_pre: its input
    layer_module: str | None = None

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(v) for v in self.layers)
        if not layers:
            raise ShapeError("a site needs at least one layer")
        if self.hook not in SITES:
            raise BadValueError(f"hook must be one of {SITES}, got {self.hook!r}")
        object.__setattr__(self, "layers", layers)

    @property
    def layer(self) -> int:
        """The site's one layer (a site of several layers has none)."""
        if len(self.layers) != 1:
            raise ShapeError(f"this site has {len(self.layers)} layers, not one: {list(self.layers)}")
        return self.layers[0]

    def resolved(self, model: torch.nn.Module) -> Site:
        """The same site with its layers as non-negative block indices of ``model`` (checked)."""
        return Site(tuple(resolve_layer(model, L, self.layer_module) for L in self.layers), self.hook,
                    self.layer_module)


class _StopForward(Exception):
    """Raised by the last needed hook to skip the rest of the forward pass."""


@dataclass
class ResidualCapture:
    """What `read_residuals` fills: ``acts[layer]`` is the last forward's residual ``(B, T, d)``."""

    layers: tuple[int, ...]
    site: str
    acts: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.acts.clear()


def _hidden_of_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden_output(output: Any, h: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``h``, in the same container."""
    if isinstance(output, tuple):
        return (h, *output[1:])
    if isinstance(output, list):
        return [h, *output[1:]]
    return h


def _hidden_of_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ShapeError("cannot find the hidden states among the block's inputs")


def _with_hidden_input(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """The block's ``(args, kwargs)`` with its hidden states replaced by ``h``."""
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


# fn(layer, h (B, T, d)) -> None (read only) or the tensor that replaces h.
ResidualFn = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextlib.contextmanager
def residual_hooks(
    model: torch.nn.Module,
    fns: Mapping[int, ResidualFn],
    site: str = "resid_post",
    *,
    layer_module: str | None = None,
    prepend: bool = True,
) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Call ``fns[layer](layer, h)`` on the residual stream at ``site`` of each layer; removed on exit.

    The one mechanism under every reader and editor of the residual stream. Layers may count
    from the end (``-1``); ``fn`` receives the normalised index. ``fn`` returning None leaves the
    stream as it is (a reader); returning a tensor replaces the hidden states, repacked into the
    block's output (tensor, tuple or list) for ``resid_post`` or into its inputs for ``resid_pre``
    (an editor). ``prepend=True`` runs ``fn`` before hooks already on the block. Yields the
    installed handles; they are removed on exit, also on error (removing twice is harmless).
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    blocks = resolve_blocks(model, layer_module)
    resolved: dict[int, ResidualFn] = {}
    for layer, fn in fns.items():
        idx = resolve_layer(model, layer, layer_module)
        if idx in resolved:
            raise ValueError(f"layer {layer} names block {idx} a second time")
        resolved[idx] = fn
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def post_hook(layer: int, fn: ResidualFn):
        def hook(_module, _args, output):
            h = fn(layer, _hidden_of_output(output))
            return None if h is None else _with_hidden_output(output, h)

        return hook

    def pre_hook(layer: int, fn: ResidualFn):
        def hook(_module, args, kwargs):
            h = fn(layer, _hidden_of_input(args, kwargs))
            return None if h is None else _with_hidden_input(args, kwargs, h)

        return hook

    try:
        for layer, fn in resolved.items():
            if site == "resid_post":
                handles.append(blocks[layer].register_forward_hook(post_hook(layer, fn), prepend=prepend))
            else:
                handles.append(blocks[layer].register_forward_pre_hook(pre_hook(layer, fn), prepend=prepend,
                                                                        with_kwargs=True))
        yield handles
    finally:
        for handle in handles:
            handle.remove()  # idempotent


@contextlib.contextmanager
def read_residuals(
    model: torch.nn.Module,
    layers: Sequence[int],
    site: str = "resid_post",
    *,
    layer_module: str | None = None,
    prepend: bool = True,
    stop_after_last: bool = False,
) -> Iterator[ResidualCapture]:
    """Install hooks that read the residual stream at ``site`` of ``layers``; removed on exit.

    ``prepend=True`` puts the reader before hooks already on the block (the library's own and
    any edit registered earlier), so it reads the stream as the block produced it; pass
    ``prepend=False`` to read after edits that were installed before this reader. With
    ``stop_after_last`` the deepest hook ends the forward pass (use `forward_to_layers`): the
    later blocks and the LM head are never run.
    """
    if site not in SITES:
        raise BadValueError(f"site must be one of {SITES}, got {site!r}")
    idx = sorted({resolve_layer(model, layer, layer_module) for layer in layers})
    capture = ResidualCapture(tuple(idx), site)
    last = idx[-1] if idx else None

    def read(layer: int, h: torch.Tensor) -> None:
        capture.acts[layer] = h.detach()
        if stop_after_last and layer == last:
            raise _StopForward

    with residual_hooks(model, dict.fromkeys(idx, read), site, layer_module=layer_module, prepend=prepend):
        yield capture


def forward_to_layers(model: torch.nn.Module, **inputs: torch.Tensor) -> None:
    """Run a forward pass that may be cut short by a reader with ``stop_after_last``."""
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False) if _takes_use_cache(model) else model(**inputs)
    except _StopForward:
        pass


def _takes_use_cache(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache") and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False
    )


# Attribute paths of the block list, tried in order. Covers GPT-2 / GPT-J (transformer.h),
# GPT-NeoX (gpt_neox.layers), Llama / Mistral / Qwen2 / Gemma / Gemma2 / Phi (model.layers),
# BERT-style encoders (encoder.layer, bert.encoder.layer, ...).
BLOCK_PATHS: tuple[str, ...] = (
    "transformer.h",
    "gpt_neox.layers",
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "layers",
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.layer",
    "distilbert.transformer.layer",
    "h",
)


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# Attribute set on a loaded model whose block list was named by hand when it was registered
# (`engine.models.loading.load_registered`), so every reader and editor finds the same blocks.
LAYER_MODULE_ATTR = "_atlas_layer_module"


def resolve_blocks(model: torch.nn.Module, layer_module: str | None = None) -> torch.nn.ModuleList:
    """Return the model's list of transformer blocks.

    ``layer_module`` names the attribute path by hand (e.g. ``"model.layers"``) for an
    architecture the resolver does not know; without it, the path the model was registered with
    (if any) is used.
    """
    layer_module = layer_module or getattr(model, LAYER_MODULE_ATTR, None)
    paths = (layer_module,) if layer_module else BLOCK_PATHS
    for path in paths:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    arch = type(model).__name__
    if layer_module:
        found = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
        hint = f"; ModuleLists in this model: {', '.join(found[:6])}" if found else ""
        raise ArchitectureError(f"{arch} has no ModuleList of blocks at {layer_module!r}{hint}")
    raise ArchitectureError(
        f"cannot find the transformer blocks of {arch}; name the block list by hand with "
        "--layer-module (e.g. --layer-module model.layers)"
    )


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """``"all"`` → None (every block); ``"0-11"``, ``"2,5,8"``, ``"0-3,7"``, ``"-1"`` → layer numbers
    (negative ones count from the end); anything else is `BadValueError`."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in spec.split(",")):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError(part)
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise BadValueError(f"layers must look like 2, 0-11, 2,5,8 or all; got {spec!r}") from None
    return tuple(dict.fromkeys(out))


def resolve_layer(model: torch.nn.Module, layer: int, layer_module: str | None = None) -> int:
    """Normalise a layer index (negative counts from the end) and check it is in range."""
    n = len(resolve_blocks(model, layer_module))
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ArchitectureError(f"layer {layer} is out of range for {type(model).__name__} with {n} layers (0..{n - 1})")
    return idx
