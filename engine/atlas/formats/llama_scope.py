"""Llama Scope releases (OpenMOSS Language-Model-SAEs): per-layer folders with ``hyperparams.json``.

As published (``fnlp/Llama3_1-8B-Base-LX{R,A,M}-{8,32}x``, folder
``Llama3_1-8B-Base-L{layer}{R,A,M}-{8,32}x``): ``hyperparams.json`` (the LM-SAEs SAEConfig:
``d_model``, ``d_sae`` / ``expansion_factor``, ``act_fn`` relu | jumprelu | topk,
``jump_relu_threshold``, ``top_k``, ``hook_point_in`` / ``hook_point_out``, ``norm_activation``,
``dataset_average_activation_norm`` {in, out}, ``apply_decoder_bias_to_pre_encoder``,
``sparsity_include_decoder_norm``) and ``checkpoints/final.safetensors`` with ``encoder.weight``
(d_sae, d_model), ``encoder.bias``, ``decoder.weight`` (d_model, d_sae), ``decoder.bias``.

Encoding, as LM-SAEs' ``SparseAutoEncoder.encode`` does it: ``x ← x · √d_model / avg_norm_in``
(dataset-wise norm), ``x ← x − decoder.bias`` if ``apply_decoder_bias_to_pre_encoder``,
``pre = encoder(x)``; the activation gates on ``pre · ‖decoder column‖`` when
``sparsity_include_decoder_norm`` and keeps ``pre``. For JumpReLU that is a per-feature threshold
``jump_relu_threshold / ‖column‖``; for TopK the decoder norm is folded into the encoder, so the
reported activation is ``pre · ‖column‖``. SAELens' loader (sae_lens/loading/pretrained_sae_loaders.py,
``llama_scope_sae_huggingface_loader``) reads the same files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from engine.atlas.formats.base import (
    SAEWeights,
    check_2d,
    check_shape,
    fold_encoder,
    need,
    positive_int,
    read_json_object,
    read_safetensors,
    row_norms,
)
from engine.errors import FormatError

NAME = "llama-scope"
HYPERPARAMS = "hyperparams.json"
WEIGHTS = ("checkpoints/final.safetensors", "final.safetensors")
_HOOK_RE = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|resid_mid|mlp_out|attn_out)")
# Folder prefix → model id, as SAELens' Llama Scope loader names it.
_MODELS = {"Llama3_1-8B-Base": "meta-llama/Llama-3.1-8B"}


def _weights(folder: Path) -> Path | None:
    return next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)


def detect(path: Path) -> bool:
    return path.is_dir() and (path / HYPERPARAMS).is_file() and _weights(path) is not None


def _model(cfg: dict[str, Any], folder: Path) -> str | None:
    if cfg.get("model_name"):
        return str(cfg["model_name"])
    return next((m for prefix, m in _MODELS.items() if folder.name.startswith(prefix)), None)


def read(folder: str | Path) -> SAEWeights:
    folder = Path(folder)
    w_path = _weights(folder)
    if not (folder / HYPERPARAMS).is_file() or w_path is None:
        raise FormatError(f"{folder}: not a Llama Scope SAE folder ({HYPERPARAMS} + {WEIGHTS[0]})")
    cfg_path = folder / HYPERPARAMS
    cfg = read_json_object(cfg_path)
    t = read_safetensors(w_path)
    need(t, ("encoder.weight", "decoder.weight"), w_path, "a Llama Scope SAE")
    w_dec = check_2d("decoder.weight", w_path, t["decoder.weight"]).T.copy()  # (d_model, d_sae) → rows
    n, d = w_dec.shape
    if cfg.get("d_model") not in (None, d):
        raise FormatError.at(cfg_path, f"says d_model={cfg.get('d_model')}; decoder.weight is {(d, n)}")
    d_sae = cfg.get("d_sae") or (d * int(cfg["expansion_factor"]) if cfg.get("expansion_factor") else None)
    if d_sae not in (None, n):
        raise FormatError.at(cfg_path, f"says d_sae={d_sae}; decoder.weight is {(d, n)}")
    hook_in, hook_out = str(cfg.get("hook_point_in") or ""), str(cfg.get("hook_point_out") or cfg.get("hook_point_in") or "")
    if hook_in != hook_out:
        raise FormatError.at(cfg_path, f"is a transcoder ({hook_in} → {hook_out}): its decoder writes another site "
                                       "than its encoder reads; import an SAE (R, A or M) folder instead")
    m = _HOOK_RE.search(hook_in)
    b_dec = check_shape(w_path, "decoder.bias", t.get("decoder.bias", np.zeros(d, np.float32)), (d,))
    sae = SAEWeights(W_dec=w_dec, b_dec=b_dec, model=_model(cfg, folder), layer=int(m.group(1)) if m else None,
                     hook=m.group(2) if m else None, source_kind=NAME)
    norm = str(cfg.get("norm_activation", "dataset-wise"))
    avg = cfg.get("dataset_average_activation_norm") or {}
    if norm == "dataset-wise" and isinstance(avg, dict) and avg.get("in"):
        scale = math.sqrt(d) / float(avg["in"])
    elif norm in ("none", "dataset-wise"):
        scale = 1.0
    else:  # token-wise: x · √d / ‖x‖ per token is not an affine map; the directions come in, no encoder
        return sae
    w_enc = check_shape(w_path, "encoder.weight", t["encoder.weight"], (n, d)).T
    b_enc = check_shape(w_path, "encoder.bias", t.get("encoder.bias", np.zeros(n, np.float32)), (n,))
    b_in = b_dec if cfg.get("apply_decoder_bias_to_pre_encoder") else None
    norms = row_norms(w_dec, w_path) if cfg.get("sparsity_include_decoder_norm", True) else np.ones(n)
    act = str(cfg.get("act_fn", "relu")).lower()
    if act == "jumprelu":
        sae.W_enc, sae.b_enc = fold_encoder(w_enc, b_enc, input_scale=scale, input_bias=b_in)
        thr = float(cfg.get("jump_relu_threshold", 0.0))
        sae.threshold, sae.activation = (thr / norms).astype(np.float32), "jumprelu"
    elif act == "topk":
        sae.W_enc, sae.b_enc = fold_encoder(w_enc, b_enc, input_scale=scale, input_bias=b_in, output_scale=norms)
        sae.activation, sae.k = "topk", positive_int(cfg.get("top_k", 50), cfg_path, "top_k")
    elif act == "relu":
        sae.W_enc, sae.b_enc = fold_encoder(w_enc, b_enc, input_scale=scale, input_bias=b_in)
        sae.activation = "relu"
    else:
        raise FormatError.at(cfg_path, f"act_fn {act!r} is not one of relu, jumprelu, topk")
    return sae
