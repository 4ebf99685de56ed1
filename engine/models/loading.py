"""Load `transformers` models and find their residual stream.

Reading and editing the residual stream needs one thing from a model: the ``ModuleList`` of its
transformer blocks. Block ``L``'s output is ``resid_post`` of layer ``L`` (and ``resid_pre`` of
``L+1``); its input is ``resid_pre`` of ``L``. We read and edit through our own forward hooks on
those blocks, never through ``output_hidden_states`` (in transformers 5.x those are gathered by
the library's own hooks, and the last one has the final norm applied).

Models are loaded offline whenever ``name_or_path`` is a local folder, so a store built on a
machine without internet (ConceptWorld, copied checkpoints) never reaches for the hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from engine.errors import ArchitectureError, BadValueError, NotFoundError
from engine.models.hooks import resolve_blocks
from engine.models.kinds import MODEL_KINDS, ModelKind  # noqa: F401 - ModelKind re-exported

if TYPE_CHECKING:  # the store (SQLAlchemy, FAISS) is not needed to load a model, only to type one
    from engine.store.store import Store



# Config attributes that hold the residual width, by family (hidden_size: most; n_embd: GPT-2;
# d_model: T5/BART-style; dim: DistilBERT).
_WIDTH_ATTRS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model", "dim")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/torch dtype → torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise BadValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def load_model(
    name_or_path: str | Path,
    kind: ModelKind = "causal",
    dtype: torch.dtype | str | None = torch.float32,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local folder or a hub id, in eval mode.

    ``kind="causal"`` loads the LM head (``AutoModelForCausalLM``); ``kind="encoder"`` loads the
    bare encoder (``AutoModel``, e.g. BERT). A local folder is read with ``local_files_only``.
    ``device`` is ``auto | cpu | cuda[:N] | mps`` and ``dtype`` may be ``"auto"``
    (`engine.models.devices`); with ``device="auto"`` a model larger than one of several GPUs is
    spread over them (``device_map="auto"``). transformers' own loading bar stays off (`quiet_transformers`):
    the engine's bars say what is going on, from the CLI and from Python alike.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from engine.models.devices import auto_dtype, choose_placement, device_map_kwargs, weights_bytes

    if kind not in MODEL_KINDS:
        raise BadValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    local = Path(name_or_path).expanduser().exists()
    src = str(Path(name_or_path).expanduser()) if local else str(name_or_path)
    placement = choose_placement(device, weights_bytes(src) if local else None)
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local, **device_map_kwargs(placement)}
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, revision=revision, local_files_only=local)
        if dtype is not None:
            pick = isinstance(dtype, str) and dtype.strip().lower() == "auto"
            kwargs["dtype"] = auto_dtype(placement.device) if pick else as_dtype(dtype)
        with quiet_transformers():
            model: torch.nn.Module = auto.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        where = "folder" if local else "hub id (no internet here? pass a local folder)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotFoundError(f"cannot load {kind} model from {where} {src!r}: {first}") from e
    if placement.device_map is None:
        model.to(placement.device)
    model.eval()
    return model, tokenizer


def quiet_transformers() -> contextlib.ExitStack:
    """Turn off `transformers`' own progress bars (loading and saving weights) now.

    The engine's bars say what is going on. Like `torch.set_grad_enabled`, it takes effect at
    the call: called alone it lasts for the process (the CLI); as ``with quiet_transformers():``
    the bars come back at the end of the block if they were on before.
    """
    from transformers.utils import logging as hf_logging

    restore = contextlib.ExitStack()
    if hf_logging.is_progress_bar_enabled():
        restore.callback(hf_logging.enable_progress_bar)
    hf_logging.disable_progress_bar()
    return restore

def load_registered(
    store: Store,
    name: str,
    *,
    kind: ModelKind | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` of the model registered in ``store`` as ``name``, from its recorded source.

    ``kind=None`` loads it as the kind recorded when it was registered (``causal`` when none);
    ``revision=None`` uses the recorded revision; ``device`` and ``dtype`` as `load_model`; a block
    list registered by hand
    (``layer_module``) is attached to the model for the hooks. A model that cannot be loaded (an
    unknown name, no recorded source, a folder that moved) is `NotFoundError` naming the command
    that registers or re-points it.
    """
    from engine.models.hooks import LAYER_MODULE_ATTR

    fix = f"`atlas models add {name} --source PATH|HUB_ID`"
    info = store.get_model(name)
    if not info.source:
        raise NotFoundError(f"model {info.name!r} has no recorded source (a local folder or hub id) to load it "
                            f"from; {fix} records it")
    path = info.recorded_path
    if path is not None and not path.is_dir():
        raise NotFoundError(f"model {info.name!r} was registered from the folder {str(path)!r}, which is not there "
                            f"(moved?); {fix} points it at its new place")
    if kind is None:
        kind = cast(ModelKind, info.kind or "causal")
    try:
        model, tok = load_model(info.source, kind=kind, dtype=dtype, revision=revision or info.revision,
                                device=device)
    except NotFoundError as e:
        raise NotFoundError(f"{e}; {fix} registers model {info.name!r} from a source that loads") from e
    if info.layer_module:
        setattr(model, LAYER_MODULE_ATTR, info.layer_module)
    return model, tok


def d_model_of(model: torch.nn.Module) -> int:
    """Width of the residual stream."""
    cfg = getattr(model, "config", None)
    for attr in _WIDTH_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    # get_input_embeddings is a transformers method, unknown to torch.nn.Module's typing
    emb = cast(Any, model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "embedding_dim"):
        return int(emb.embedding_dim)
    raise ArchitectureError(f"cannot tell the residual width of {type(model).__name__}")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, added tokens included).

    Two tokenizers with the same fingerprint turn text into the same ids, which is what
    ``token`` pairing needs.
    """
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and a checksum of every parameter (cheap next to one forward pass
    over a corpus); identifies cached activations with the weights that produced them."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=True).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(f"{p.double().sum().item():.10e}{p.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSummary:
    """What the store records about a model."""

    architecture: str  # class name, e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type, e.g. "llama"
    d_model: int
    n_layers: int
    vocab_size: int | None
    source: str  # local path or hub id it was loaded from
    tokenizer_fingerprint: str | None = None


def model_info(model: torch.nn.Module, tokenizer: Any = None, layer_module: str | None = None) -> ModelSummary:
    """Architecture, residual width, number of blocks (and tokenizer fingerprint when given)."""
    cfg = getattr(model, "config", None)
    return ModelSummary(
        architecture=type(model).__name__,
        model_type=str(getattr(cfg, "model_type", "") or ""),
        d_model=d_model_of(model),
        n_layers=len(resolve_blocks(model, layer_module)),
        vocab_size=getattr(cfg, "vocab_size", None),
        source=str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
    )
