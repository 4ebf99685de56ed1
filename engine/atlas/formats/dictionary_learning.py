"""saprmarks/dictionary_learning: ``ae.pt`` (a state dict) + ``config.json`` (``{"trainer": {...}}``).

The state dict is read with ``torch.load(weights_only=True)``: tensors only, never arbitrary
pickled objects. Variants, by their keys (dictionary_learning/dictionary.py and
trainers/top_k.py, trainers/batch_top_k.py):

- ``AutoEncoder`` (ReLU): ``bias`` (d,), ``encoder.weight`` (d_sae, d), ``encoder.bias``,
  ``decoder.weight`` (d, d_sae); ``f = relu(encoder(x − bias))``. Read as
  ``AutoEncoder.from_pretrained(ae.pt)`` loads it, the way users load a dictionary_learning SAE
  (its default ``normalize_decoder=True``): decoder columns divided by their norms, encoder rows
  and bias multiplied by them, so ``f`` is the raw state dict's ``relu(...) · ‖decoder column‖``.
  That only matters for ``StandardTrainerAprilUpdate`` (and other trainers that leave decoder norms
  free); ``StandardTrainer`` keeps them at 1. The directions are the unit decoder columns.
- ``JumpReluAutoEncoder``: ``W_enc`` (d, d_sae), ``b_enc``, ``W_dec`` (d_sae, d), ``b_dec``,
  ``threshold`` (d_sae,); ``f = relu(pre · (pre > threshold))`` with ``pre = x @ W_enc + b_enc``
  (as the released package, dictionary-learning 0.1.0, encodes; the repository's later
  ``dictionary.py`` also multiplies ``f`` by ``‖W_dec row‖``, the same for unit-norm rows).
- ``AutoEncoderTopK``: ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k`` (scalar),
  ``threshold`` (scalar); ``f = topk(relu(encoder(x − b_dec)), k)``. ``BatchTopKSAE`` has the same
  keys and encodes at inference with its threshold: ``f = r · (r > threshold)``, ``r = relu(...)``.

``config.json``'s ``trainer`` gives ``dict_class``, ``lm_name``, ``layer``, ``submodule_name``,
``activation_dim``, ``dict_size`` and ``k``. ``GatedAutoEncoder`` is refused; a ``dict_class`` not
named above (e.g. ``MatryoshkaBatchTopKSAE``, ``AutoEncoderNew``) brings a `FormatWarning`.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

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
    row_norms,
)
from engine.errors import FormatError

NAME = "dictionary_learning"
WEIGHTS = "ae.pt"
CONFIG = "config.json"

_KNOWN_CLASSES = ("AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE")
_HOOKS = ("resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out")


def detect(path: Path) -> bool:
    return (path.is_dir() and (path / WEIGHTS).is_file()) or (path.is_file() and path.suffix == ".pt")


def _load_state_dict(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError.at(path, f"not a state dict of tensors that torch.load(weights_only=True) reads ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError.at(path, "must hold a state dict (a mapping of names to tensors)")
    return {str(k): v.detach().float().cpu().numpy() for k, v in sd.items()}


def _site(trainer: dict[str, Any], path: Path) -> tuple[int | None, str | None]:
    layer = trainer.get("layer")
    text = f"{trainer.get('submodule_name') or ''} {path}"
    hook = next((h for h in _HOOKS if h in text), None)
    if layer is None:
        m = re.search(r"layer[_.]?(\d+)", text)
        layer = int(m.group(1)) if m else None
    return (None if layer is None else int(layer)), hook


def read(source: str | Path) -> SAEWeights:
    source = Path(source)
    w_path = source / WEIGHTS if source.is_dir() else source
    if not w_path.is_file():
        raise FormatError(f"{source}: no {WEIGHTS} (a dictionary_learning SAE is ae.pt + config.json)")
    cfg_path = w_path.parent / CONFIG
    trainer: dict[str, Any] = {}
    if cfg_path.is_file():
        t = read_json_object(cfg_path).get("trainer")
        if not isinstance(t, dict):
            raise FormatError.at(cfg_path, "has no \"trainer\" object (dictionary_learning writes one)")
        trainer = t
    sd = _load_state_dict(w_path)
    dict_class = str(trainer.get("dict_class") or "")
    layer, hook = _site(trainer, w_path)
    lm = trainer.get("lm_name")
    common: dict[str, Any] = dict(model=lm, layer=layer, hook=hook, source_kind=NAME)
    if "W_enc" in sd and "threshold" in sd:  # JumpReluAutoEncoder
        need(sd, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), w_path, "a JumpReluAutoEncoder")
        w_dec = check_2d("W_dec", w_path, sd["W_dec"])
        n, d = w_dec.shape
        w_enc = check_shape(w_path, "W_enc", sd["W_enc"], (d, n))
        W, b = fold_encoder(w_enc, check_shape(w_path, "b_enc", sd["b_enc"], (n,)))
        # relu(pre · (pre > t)) is pre · (pre > max(t, 0)): the canonical JumpReLU with the threshold clipped at 0
        thr = np.maximum(check_shape(w_path, "threshold", sd["threshold"], (n,)), 0.0).astype(np.float32)
        sae = SAEWeights(W_dec=w_dec, W_enc=W, b_enc=b, b_dec=sd["b_dec"], threshold=thr, activation="jumprelu",
                         **common)
    elif "encoder.weight" in sd and "decoder.weight" in sd:
        w_dec = check_2d("decoder.weight", w_path, sd["decoder.weight"]).T.copy()  # (d, d_sae) → rows
        n, d = w_dec.shape
        w_enc = check_shape(w_path, "encoder.weight", sd["encoder.weight"], (n, d)).T
        b_enc = check_shape(w_path, "encoder.bias", sd.get("encoder.bias", np.zeros(n, np.float32)), (n,))
        if "r_mag" in sd or "gate_bias" in sd:
            raise FormatError.at(w_path, "is a GatedAutoEncoder, which is not supported; import its decoder "
                                         "as a matrix (decoder.weight transposed) instead")
        if "k" in sd:  # AutoEncoderTopK / BatchTopKSAE
            need(sd, ("b_dec",), w_path, "a top-k autoencoder")
            b_dec = check_shape(w_path, "b_dec", sd["b_dec"], (d,))
            W, b = fold_encoder(w_enc, b_enc, input_bias=b_dec)
            k = positive_int(float(np.asarray(sd["k"]).reshape(-1)[0]), w_path, "k")
            thr = float(np.asarray(sd.get("threshold", -1.0)).reshape(-1)[0])
            if "BatchTopK" in dict_class and thr >= 0:  # inference: the learnt global threshold
                sae = SAEWeights(W_dec=w_dec, W_enc=W, b_enc=b, b_dec=b_dec, activation="jumprelu",
                                 threshold=np.full(n, max(thr, 0.0), np.float32), **common)
            else:
                sae = SAEWeights(W_dec=w_dec, W_enc=W, b_enc=b, b_dec=b_dec, activation="topk", k=k, **common)
        else:  # AutoEncoder (ReLU); the input bias is "bias"; decoder normalised as from_pretrained does
            need(sd, ("bias",), w_path, "an AutoEncoder")
            b_in = check_shape(w_path, "bias", sd["bias"], (d,))
            norms = row_norms(w_dec, w_path)
            W, b = fold_encoder(w_enc, b_enc, input_bias=b_in, output_scale=norms)
            sae = SAEWeights(W_dec=(w_dec / norms[:, None]).astype(np.float32), W_enc=W, b_enc=b, b_dec=b_in,
                             activation="relu", **common)
    else:
        raise FormatError.at(w_path, f"is not a dictionary_learning AutoEncoder, JumpReluAutoEncoder or "
                                     f"AutoEncoderTopK state dict (keys: {', '.join(sorted(sd)) or 'none'})")
    if dict_class and dict_class not in _KNOWN_CLASSES:
        warnings.warn(FormatWarning(f"{cfg_path}: dict_class {dict_class!r} is read by its keys as "
                                    f"{sae.activation}; its own encode may differ"), stacklevel=2)
    n, d = sae.W_dec.shape
    if trainer.get("activation_dim") not in (None, d) or trainer.get("dict_size") not in (None, n):
        raise FormatError.at(cfg_path, f"says activation_dim={trainer.get('activation_dim')}, "
                                       f"dict_size={trainer.get('dict_size')}; the decoder is {(n, d)}")
    return sae
