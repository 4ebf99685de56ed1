"""EleutherAI sparsify (``eai-sparsify``): a folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Layout as `SparseCoder.save_to_disk` writes it (sparsify/sparse_coder.py): ``sae.safetensors``
holds ``encoder.weight`` (num_latents, d_in), ``encoder.bias`` (num_latents,), ``W_dec``
(num_latents, d_in) and ``b_dec`` (d_in,); ``cfg.json`` holds the `SparseCoderConfig` fields
(``activation`` topk | groupmax, ``k``, ``num_latents`` / ``expansion_factor``, ``transcode``, ...)
plus ``d_in``. The folder is named after the hookpoint (``layers.12``, ``layers.12.mlp``,
``gpt_neox.layers.5``, ``h.6``), which gives the layer; the trainer's ``config.json`` one folder up
names the model. Encoding is ``topk(relu((x − b_dec) @ encoder.weightᵀ + encoder.bias), k)``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from engine.atlas.formats.base import (
    FormatWarning,
    SAEWeights,
    check_2d,
    check_shape,
    fold_encoder,
    need,
    positive_int,
    read_json_object,
    read_safetensors,
)
from engine.errors import FormatError

NAME = "eai-sparsify"
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"

_HOOKPOINT = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.(\w+))?$")
_SUBMODULE_HOOK = {"mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out"}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def hookpoint_site(name: str) -> tuple[int | None, str | None]:
    """Layer and hook of a sparsify hookpoint name: ``layers.12`` → (12, resid_post)."""
    m = _HOOKPOINT.search(name)
    if not m:
        return None, None
    sub = m.group(2)
    return int(m.group(1)), "resid_post" if sub is None else _SUBMODULE_HOOK.get(sub, sub)


def read(folder: str | Path) -> SAEWeights:
    folder = Path(folder)
    if not detect(folder):
        raise FormatError(f"{folder}: not a sparsify SAE folder (it has {CFG} and {WEIGHTS})")
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    cfg = read_json_object(cfg_path)
    t = read_safetensors(w_path)
    need(t, ("encoder.weight", "W_dec"), w_path, "a sparsify SAE")
    w_dec = check_2d("W_dec", w_path, t["W_dec"])
    n, d = w_dec.shape
    if cfg.get("d_in") not in (None, d):
        raise FormatError.at(cfg_path, f"says d_in={cfg.get('d_in')}; W_dec is {w_dec.shape}")
    if cfg.get("num_latents") not in (None, 0, n):
        raise FormatError.at(cfg_path, f"says num_latents={cfg.get('num_latents')}; W_dec is {w_dec.shape}")
    w_enc = check_shape(w_path, "encoder.weight", t["encoder.weight"], (n, d)).T
    b_enc = check_shape(w_path, "encoder.bias", t.get("encoder.bias", np.zeros(n, np.float32)), (n,))
    b_dec = check_shape(w_path, "b_dec", t.get("b_dec", np.zeros(d, np.float32)), (d,))
    activation = str(cfg.get("activation", "topk"))
    if cfg.get("transcode"):
        raise FormatError.at(cfg_path, "is a transcoder (transcode: true): its decoder writes another site than "
                                       "its encoder reads; import an SAE folder instead")
    layer, hook = hookpoint_site(folder.name)
    model = None
    run_cfg = folder.parent / "config.json"
    if run_cfg.is_file():
        model = read_json_object(run_cfg).get("model")
    sae = SAEWeights(W_dec=w_dec, b_dec=b_dec, layer=layer, hook=hook, model=model, source_kind=NAME)
    if activation == "topk":
        sae.W_enc, sae.b_enc = fold_encoder(w_enc, b_enc, input_bias=b_dec)
        sae.activation, sae.k = "topk", positive_int(cfg.get("k", 32), cfg_path, "k")
    else:  # groupmax (one winner per group of latents) has no canonical form: the directions come in, no encoder
        warnings.warn(FormatWarning(f"{cfg_path}: activation {activation!r} has no canonical encoder; its "
                                    "directions are imported without one"), stacklevel=2)
    return sae
