"""The activation function of a SAELens SAE, from its ``cfg.json``, in the canonical encoder form.

`engine.atlas.importers.read_saelens` reads the tensors; this adds what the encoder does with them,
as SAELens 6 encodes (sae_lens/saes/sae.py ``process_sae_in``, standard_sae.py, jumprelu_sae.py,
topk_sae.py; before SAELens 6, ``activation_fn_str`` / ``activation_fn_kwargs``)::

    x'  = x − b_dec                        if apply_b_dec_to_input (a JSON bool; default true)
    pre = x' @ W_enc + b_enc
    standard: relu(pre)
    jumprelu: relu(pre) · (pre > threshold)   = pre · (pre > max(threshold, 0))
    topk:     topk(pre · ‖W_dec row‖ if rescale_acts_by_decoder_norm else pre, k), then relu

``apply_b_dec_to_input`` folds ``b_dec`` into ``b_enc``, a negative JumpReLU threshold is clipped at
0 (SAELens' ReLU comes first), and ``rescale_acts_by_decoder_norm`` multiplies ``W_enc`` / ``b_enc``
by the decoder-row norms. Config fields the canonical form cannot express are never imported as if
plain: ``reshape_activations: hook_z`` and a ``hook_head_index`` (the SAE reads one attention head's
``hook_z``, not a residual) and transcoders are refused; the directions of a gated, AbsTopK,
matching-pursuit or temporal SAE, of one with ``normalize_activations`` ``constant_norm_rescale``
or ``layer_norm`` (per-input normalisation) or another activation function come in without an
encoder, with a `FormatWarning` naming the field. ``expected_average_only_in`` is kept: SAELens'
own ``encode`` does not scale its input either (the caller does, by ``norm_scaling_factor``), and
a `FormatWarning` says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from engine.atlas.formats.base import (
    FormatWarning,
    SAEWeights,
    fold_encoder,
    positive_int,
    read_json_object,
    row_norms,
)
from engine.errors import FormatError

_ENCODED = ("standard", "jumprelu", "topk", "batchtopk")
_NO_ENCODER_NORMS = ("constant_norm_rescale", "layer_norm", "covariance_whitening")


def _flag(cfg: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError.at(path, f"{key} must be true or false, got {value!r}"[:200])
    return value


def _drop_encoder(sae: SAEWeights, path: Path, why: str) -> SAEWeights:
    warnings.warn(FormatWarning(f"{path}: {why}; its directions are imported without an encoder "
                                "(atlas explain and activation matching will not use it)"), stacklevel=3)
    sae.W_enc = sae.b_enc = sae.threshold = None
    return sae


def with_activation(sae: SAEWeights, folder: Path) -> SAEWeights:
    """``sae`` (as read_saelens returns it) with its activation set and its encoder folded."""
    folder = Path(folder)
    cfg_path = folder / "cfg.json"
    raw = read_json_object(cfg_path)
    meta = raw.get("metadata")
    cfg = {**raw, **(meta if isinstance(meta, dict) else {})}  # as read_saelens: SAELens >= 6 nests metadata
    arch = str(cfg.get("architecture") or "standard").lower()
    if "transcoder" in arch:
        raise FormatError.at(cfg_path, f"architecture {arch!r} is a transcoder: its decoder writes another site "
                                       "than its encoder reads; import an SAE instead")
    reshape = str(cfg.get("reshape_activations") or "none")
    if reshape != "none":
        raise FormatError.at(cfg_path, f"reshape_activations={reshape!r}: the SAE reads attention heads "
                                       "(hook_z), not a residual the atlas can hold")
    if cfg.get("hook_head_index") is not None:
        raise FormatError.at(cfg_path, f"hook_head_index={cfg['hook_head_index']!r}: the SAE reads one attention "
                                       "head, not a residual the atlas can hold")
    b_dec_in = _flag(cfg, "apply_b_dec_to_input", True, cfg_path)  # SAELens' default is true
    rescale = _flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_path)
    if sae.W_enc is None or sae.b_enc is None:
        return sae
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    norm = str(cfg.get("normalize_activations") or "none")
    if arch not in _ENCODED:
        return _drop_encoder(sae, cfg_path, f"architecture {arch!r} has no canonical encoder")
    if act not in ("relu", "topk"):
        return _drop_encoder(sae, cfg_path, f"activation_fn {act!r} has no canonical encoder")
    if norm in _NO_ENCODER_NORMS:
        return _drop_encoder(sae, cfg_path, f"normalize_activations={norm!r} normalises each input at run time")
    if norm not in ("none", "None"):
        warnings.warn(FormatWarning(f"{cfg_path}: normalize_activations={norm!r}: the encoder, like SAELens' own "
                                    "encode, does not scale its input; the SAE expects residuals scaled by its "
                                    "norm_scaling_factor"), stacklevel=2)
    if b_dec_in and sae.b_dec is not None:
        sae.W_enc, sae.b_enc = fold_encoder(sae.W_enc, sae.b_enc, input_bias=sae.b_dec)
    if arch in ("topk", "batchtopk") or act == "topk":
        sae.activation = "topk"
        sae.k = positive_int(cfg.get("k") or (kwargs.get("k") if isinstance(kwargs, dict) else None), cfg_path, "k")
        if rescale:  # topk(pre · ‖W_dec row‖): the positive scale folds into the encoder
            sae.W_enc, sae.b_enc = fold_encoder(sae.W_enc, sae.b_enc, output_scale=row_norms(sae.W_dec, cfg_path))
        if arch == "batchtopk" and sae.threshold is not None:  # inference with the learnt threshold
            sae.activation, sae.k = "jumprelu", None
    elif sae.threshold is not None or arch == "jumprelu":
        sae.activation = "jumprelu"
        if sae.threshold is not None:  # relu(pre) · (pre > θ) is pre · (pre > max(θ, 0))
            sae.threshold = np.maximum(sae.threshold, 0.0).astype(np.float32)
    else:
        sae.activation = "relu"
    return sae
