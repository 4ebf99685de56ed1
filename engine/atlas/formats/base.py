"""`SAEWeights`, the plain data every SAE reader returns, and the canonical encoder form.

An atlas keeps its SAE's encoder in one form whatever the source library (docs/design.md §4)::

    pre = x @ W_enc + b_enc                      x: a residual at the atlas site (..., d_in)
    f   = relu(pre)                              ReLU (no ``threshold``, no ``k``)
    f   = pre * (pre > threshold)                JumpReLU (``threshold``: (d_sae,))
    f   = top-k of relu(pre), the rest 0         TopK (``k``)

Readers fold what their library does before the encoder into ``W_enc`` / ``b_enc`` with
`fold_encoder`: an input scale (Llama Scope's dataset-wise norm), a bias subtracted from the input
(``b_dec`` in SAELens with ``apply_b_dec_to_input``, sparsify, dictionary_learning), a per-feature
output scale (the decoder-row norm: SAELens TopK with ``rescale_acts_by_decoder_norm``,
dictionary_learning's ``AutoEncoder.from_pretrained``). A library that applies ReLU before its
JumpReLU gate (SAELens, Gemma Scope, dictionary_learning) has its threshold clipped at 0. A config field a
reader cannot express in this form is refused (`FormatError` naming it) when the directions would
be wrong too, else the directions come in without an encoder and a `FormatWarning` names it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FormatError

ACTIVATIONS = ("relu", "jumprelu", "topk")


class FormatWarning(UserWarning):
    """An SAE file was read, but a config field of it is not applied (the message names the field)."""


@dataclasses.dataclass
class SAEWeights:
    """Decoder rows (the concept directions) and, when present, the encoder of an SAE."""

    W_dec: np.ndarray  # (d_sae, d_in)
    W_enc: np.ndarray | None = None  # (d_in, d_sae)
    b_enc: np.ndarray | None = None  # (d_sae,)
    b_dec: np.ndarray | None = None  # (d_in,)
    threshold: np.ndarray | None = None  # (d_sae,) JumpReLU
    density: np.ndarray | None = None  # (d_sae,) firing frequency, if known
    model: str | None = None
    layer: int | None = None
    hook: str | None = None
    source_kind: str = "matrix"
    activation: str | None = None  # relu | jumprelu | topk; None: jumprelu with a threshold, else relu
    k: int | None = None  # TopK: latents kept per token

    def encoder(self) -> dict[str, np.ndarray]:
        """The encoder tensors kept with the atlas (the canonical form above; ``k`` as a 1-element tensor);
        none when the SAE has no (canonical) encoder."""
        if self.W_enc is None:
            return {}
        out = {
            k: v
            for k, v in (("W_enc", self.W_enc), ("b_enc", self.b_enc), ("b_dec", self.b_dec),
                         ("threshold", self.threshold))
            if v is not None
        }
        if self.W_enc is not None and self.activation == "topk" and self.k is not None:
            out.pop("threshold", None)
            out["k"] = np.array([self.k], dtype=np.float32)
        return out


def check_2d(name: str, path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or 0 in x.shape:
        raise FormatError.at(path, f"{name} must be a non-empty 2-D matrix, got shape {x.shape}")
    return x


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or a `FormatError` naming the file."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError.at(path, f"not valid JSON ({e})") from None
    except OSError as e:
        raise FormatError.at(path, f"cannot be read ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError.at(path, "must hold a JSON object")
    return cfg


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays (bf16 included)."""
    from safetensors import SafetensorError, safe_open

    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy()
        return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError.at(path, f"not a readable safetensors file ({e})") from None


def need(t: dict[str, np.ndarray], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in t]
    if missing:
        raise FormatError.at(path, f"{what} needs tensors {', '.join(keys)}; missing {', '.join(missing)} "
                                   f"(found: {', '.join(sorted(t)) or 'none'})")


def check_shape(path: Path, name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(x.shape) != shape:
        raise FormatError.at(path, f"{name} has shape {tuple(x.shape)}, expected {shape}")
    return x


def fold_encoder(
    W_enc: np.ndarray, b_enc: np.ndarray, *, input_scale: float = 1.0, input_bias: np.ndarray | None = None,
    output_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``act((s·x − b_in) @ W + b) · o`` as ``act(x @ W' + b')``: W' = s·W·o, b' = (b − b_in @ W)·o.

    ``output_scale`` (d_sae,) must be positive (ReLU, JumpReLU and TopK commute with it; a JumpReLU
    threshold has to be multiplied by it too, which the caller does).
    """
    W = np.asarray(W_enc, dtype=np.float64)
    b = np.asarray(b_enc, dtype=np.float64)
    if input_bias is not None:
        b = b - np.asarray(input_bias, dtype=np.float64) @ W
    W = W * float(input_scale)
    if output_scale is not None:
        W, b = W * output_scale[None, :], b * output_scale
    return W.astype(np.float32), b.astype(np.float32)


def row_norms(W_dec: np.ndarray, path: Path) -> np.ndarray:
    """Decoder-row norms (d_sae,), refusing a zero row (it cannot scale an activation)."""
    n = np.linalg.norm(np.asarray(W_dec, dtype=np.float64), axis=1)
    if (n <= 0).any():
        raise FormatError.at(path, f"decoder row {int(np.flatnonzero(n <= 0)[0])} is zero")
    return n


def positive_int(value: Any, path: Path, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v <= 0 or (isinstance(value, float) and not value.is_integer()):
        raise FormatError.at(path, f"{name} must be a positive integer, got {value!r}")
    return v
