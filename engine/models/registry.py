"""Models as store objects: register a folder or hub id, show, remove (docs/design.md §3).

Registration reads what the store records from the config and tokenizer files only, never the
weights: the architecture (the class `load_model` will build), the residual width and the number of
blocks (from a weightless instance of the model on torch's ``meta`` device, so the block list is
found by the same resolver that hooks it later, and a ``layer_module`` named by hand is checked
now), and the tokenizer's fingerprint. ``kind`` (causal | encoder) and ``layer_module`` are kept
with the row and used whenever the model is loaded.

Registering a name again with another source re-points it (weights that moved) when the new
source is the same model (architecture, width, depth, tokenizer), and is refused otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import BadNameError, BadValueError, DuplicateError, NotFoundError
from engine.models.kinds import MODEL_KINDS, ModelKind

if TYPE_CHECKING:  # torch, transformers and the loaders are imported where a model is read or loaded
    import torch

    from engine.store.models import ModelInfo
    from engine.store.store import Store


@dataclass(frozen=True)
class ModelCard:
    """What registration reads from a model's config and tokenizer files."""

    source: str  # as given: a folder or a hub id
    kind: str
    architecture: str  # the class load_model builds, e.g. "LlamaForCausalLM"
    model_type: str
    d_model: int
    n_layers: int
    vocab_size: int | None
    tokenizer_fingerprint: str
    layer_module: str | None = None


@dataclass(frozen=True)
class ModelDetails:
    """`atlas models show`: the registered row, its users, and whether its source is there."""

    info: ModelInfo
    atlases: list[str]
    maps: list[str]
    source_found: bool | None  # a folder: does it exist; a hub id: None (not checked)


def check_model_name(name: str) -> None:
    """Letters, digits, ``-_.`` and ``/`` (hub ids are names too), not starting with ``.`` or ``/``."""
    ok = isinstance(name, str) and 0 < len(name) <= 200 and not name.startswith((".", "/")) and all(
        c.isalnum() or c in "-_./" for c in name)
    if not ok:
        raise BadNameError(f"bad model name {name!r}: use letters, digits, '-', '_', '.' and '/' "
                           "(not starting with '.' or '/')")


def default_model_name(source: str) -> str:
    """A folder's name, or the hub id itself."""
    from engine.store.models import looks_like_path

    return Path(source).expanduser().resolve().name if looks_like_path(source) else source


def inspect_source(source: str | Path, kind: ModelKind = "causal", revision: str | None = None,
                   layer_module: str | None = None) -> ModelCard:
    """Read a model's card from its config and tokenizer files (a folder offline, or a hub id).

    A source that cannot be read is `NotFoundError`; an architecture whose blocks cannot be found
    is `ArchitectureError` naming ``--layer-module``.
    """
    from engine.store.models import looks_like_path

    if kind not in MODEL_KINDS:
        raise BadValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    src = str(source)
    local = looks_like_path(src)
    if local and not Path(src).expanduser().is_dir():
        raise NotFoundError(f"no model folder at {src!r} (a folder with config.json and tokenizer files, or a hub id)")
    if not local and _offline_and_not_cached(src, revision):  # known without importing transformers (~2 s)
        raise NotFoundError(f"cannot read the config and tokenizer of {kind} model hub id (no internet here? pass a "
                            f"local folder) {src!r}: the hub is offline (HF_HUB_OFFLINE) and it is not in the "
                            "local hub cache")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from engine.models.hooks import resolve_blocks
    from engine.models.loading import d_model_of, quiet_transformers, tokenizer_fingerprint

    path = str(Path(src).expanduser()) if local else src
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=local)
    except (OSError, ValueError) as e:
        where = "folder" if local else "hub id (no internet here? pass a local folder)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotFoundError(f"cannot read the config and tokenizer of {kind} model {where} {src!r}: {first}") from e
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    with quiet_transformers(), torch.device("meta"):  # shapes only: no memory, no weights
        skeleton = auto.from_config(config)
    return ModelCard(
        source=src, kind=kind, architecture=type(skeleton).__name__,
        model_type=str(getattr(config, "model_type", "") or ""), d_model=d_model_of(skeleton),
        n_layers=len(resolve_blocks(skeleton, layer_module)), vocab_size=getattr(config, "vocab_size", None),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), layer_module=layer_module,
    )


def _offline_and_not_cached(repo_id: str, revision: str | None) -> bool:
    """Whether a hub id cannot be read here: the hub is offline (``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``) and the local hub cache has no config.json for it."""
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline:
        return False
    try:
        return not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id: transformers says what is wrong with it
        return False


def _same_model(info: ModelInfo, card: ModelCard) -> list[str]:
    """What differs between a registered row and a card (fields the row records)."""
    diffs = []
    for field, recorded, new in (("architecture", info.architecture, card.architecture),
                                 ("width", info.d_model, card.d_model), ("depth", info.n_layers, card.n_layers),
                                 ("tokenizer", info.tokenizer_fingerprint, card.tokenizer_fingerprint)):
        if recorded is not None and recorded != new:
            diffs.append(f"{field} {str(recorded)[:12]} vs {str(new)[:12]}")
    return diffs


def register_model(store: Store, name: str, source: str | Path, *, kind: ModelKind = "causal",
                   revision: str | None = None, layer_module: str | None = None) -> ModelInfo:
    """Register ``source`` (a folder or hub id) as model ``name`` (`atlas models add`).

    A name registered from another source is re-pointed when the new source is the same model (its
    weights moved) and refused otherwise; a name known only from an atlas import (no source yet) gets
    its source, provided the width matches the atlas's.
    """
    from engine.store.models import looks_like_path

    check_model_name(name)
    card = inspect_source(source, kind, revision, layer_module)
    try:
        info = store.get_model(name)
    except NotFoundError:
        info = None
    if info is not None:
        diffs = _same_model(info, card)
        if diffs:
            raise DuplicateError(
                f"model {name!r} is registered as another model ({'; '.join(diffs)}); pick another name, or "
                f"`atlas models remove {name}` first"
            )
    src = str(Path(card.source).expanduser().resolve()) if looks_like_path(card.source) else card.source
    extra: dict[str, Any] = {"kind": kind, "model_type": card.model_type, "vocab_size": card.vocab_size}
    if layer_module:
        extra["layer_module"] = layer_module
    return store.add_model(name, source=src, architecture=card.architecture, d_model=card.d_model,
                           n_layers=card.n_layers, revision=revision, tokenizer_fingerprint=card.tokenizer_fingerprint,
                           extra=extra)


def find_by_source(store: Store, source: str) -> str | None:
    """The name of a registered model loaded from ``source`` (a folder, compared resolved, or a hub id)."""
    from engine.store.models import looks_like_path

    want = str(Path(source).expanduser().resolve()) if looks_like_path(source) else source
    for m in store.models():
        if m.source and m.source == want:
            return m.name
    return None


def ensure_model(store: Store, model: str, *, kind: ModelKind = "causal", revision: str | None = None,
                 layer_module: str | None = None, required: bool = True) -> tuple[str, str | None]:
    """``(name, note)`` of ``model`` given as a registered name, a folder or a hub id.

    A folder or hub id not registered yet is registered on the spot under its folder name (or hub
    id). With ``required=False`` a hub id that cannot be read (no network) is left unregistered
    and the note says how to register it; a folder must always be readable.
    """
    from engine.store.models import looks_like_path

    try:
        return store.get_model(model).name, None
    except NotFoundError:
        pass
    known = find_by_source(store, model)
    if known is not None:
        return known, None
    name = default_model_name(model)
    try:
        register_model(store, name, model, kind=kind, revision=revision, layer_module=layer_module)
    except NotFoundError as e:
        if looks_like_path(model):
            raise
        if required:
            raise NotFoundError(f"no model named {model!r} in the store (`atlas models` lists them); as a hub id: {e}; "
                                f"`atlas models add NAME --source PATH|HUB_ID` registers a model") from e
        return name, (f"model {name!r} is not registered ({e}); `atlas models add {name} --source PATH|HUB_ID` "
                      "registers it before it is aligned to")
    return name, None


def model_details(store: Store, name: str) -> ModelDetails:
    """The registered model ``name``, the atlases and maps that use it, and whether its folder exists."""
    info = store.get_model(name)
    users = store.model_users(name)
    path = info.recorded_path
    return ModelDetails(info, users["atlases"], users["maps"], None if path is None else path.is_dir())


def remove_model(store: Store, name: str) -> None:
    """Forget model ``name`` (never its files); refused while an atlas or map uses it."""
    store.remove_model(name)


def loading_hint(name: str) -> str:
    """The command that (re-)registers a model's source, for error messages."""
    return f"`atlas models add {name} --source PATH|HUB_ID`"


def resolve_model(
    store: Store,
    name_or_path: str,
    *,
    kind: ModelKind | None = None,
    dtype: torch.dtype | str | None = "float32",
    revision: str | None = None,
    layer_module: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[str, torch.nn.Module, Any]:
    """``(name, model, tokenizer)`` of a model given as a registered name, or a folder / hub id.

    A folder or hub id not yet in the store is registered first (`ensure_model`: under its folder
    name or hub id, from its config and tokenizer files), then every model loads the one way,
    `load_registered`. ``kind=None``: as registered (a new model registers as ``causal``).
    """
    from engine.models.loading import load_registered

    name, _ = ensure_model(store, name_or_path, kind=kind or "causal", revision=revision, layer_module=layer_module)
    model, tok = load_registered(store, name, kind=kind, dtype=dtype, revision=revision, device=device)
    return name, model, tok
