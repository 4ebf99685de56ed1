"""Load `transformers` models and find their residual stream.

Reading and editing the residual stream needs one thing from a model: the ``ModuleList`` of its
transformer blocks. Block ``L``'s output is ``resid_post`` of layer ``L`` (and ``resid_pre`` of
``L+1``); its input is ``resid_pre`` of ``L``. We read and edit through our own forward hooks on
those blocks, never through ``output_hidden_states`` (in transformers 5.x those are gathered by
the library's own hooks, and the last one has the final norm applied).
"""

from __future__ import annotations

import torch

from engine.errors import ArchitectureError

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


def resolve_blocks(model: torch.nn.Module, layer_module: str | None = None) -> torch.nn.ModuleList:
    """Return the model's list of transformer blocks.

    ``layer_module`` names the attribute path by hand (e.g. ``"model.layers"``) for an
    architecture the resolver does not know.
    """
    paths = (layer_module,) if layer_module else BLOCK_PATHS
    for path in paths:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    arch = type(model).__name__
    if layer_module:
        raise ArchitectureError(f"{arch} has no ModuleList of blocks at {layer_module!r}")
    raise ArchitectureError(
        f"cannot find the transformer blocks of {arch}; name the block list by hand with "
        "--layer-module (e.g. --layer-module model.layers)"
    )
