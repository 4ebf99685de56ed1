"""An atlas SAE's encoder: atlas-site residuals → feature activations (docs/design.md §4, §6).

The encoder is kept in the atlas vector file in one form whatever the SAE's library
(`engine.atlas.formats.base`): ``pre = x @ W_enc + b_enc``, then ReLU, JumpReLU
(``pre · (pre > threshold)``, a ``threshold`` tensor) or TopK (top ``k`` of ``relu(pre)``, a
one-element ``k`` tensor). Atlases imported from a plain matrix have no encoder.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class AtlasEncoder:
    W_enc: np.ndarray  # (d_in, d_sae)
    b_enc: np.ndarray  # (d_sae,)
    threshold: np.ndarray | None = None  # (d_sae,) JumpReLU
    k: int | None = None  # TopK

    @property
    def activation(self) -> str:
        return "topk" if self.k is not None else "jumprelu" if self.threshold is not None else "relu"

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> AtlasEncoder | None:
        """The encoder held by an atlas's tensors (`Store.atlas_tensors`), or None if it has none."""
        if "W_enc" not in tensors:
            return None
        w = np.asarray(tensors["W_enc"], dtype=np.float32)
        b = np.asarray(tensors.get("b_enc", np.zeros(w.shape[1], np.float32)), dtype=np.float32)
        k = tensors.get("k")
        thr = tensors.get("threshold")
        return cls(w, b, None if thr is None or k is not None else np.broadcast_to(thr, b.shape).astype(np.float32),
                   None if k is None else int(np.asarray(k).reshape(-1)[0]))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations (n, d_sae) of atlas-site residuals ``x`` (n, d_in)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.W_enc.shape[0]:
            raise ShapeError(f"the atlas encoder reads (n, {self.W_enc.shape[0]}) residuals, got {x.shape}")
        pre = x @ self.W_enc + self.b_enc
        if self.threshold is not None:
            return np.where(pre > self.threshold, pre, 0.0).astype(np.float32)
        acts = np.maximum(pre, 0.0)
        if self.k is not None and self.k < acts.shape[1]:
            drop = np.argpartition(-acts, self.k, axis=1)[:, self.k:]
            np.put_along_axis(acts, drop, 0.0, axis=1)
        return acts.astype(np.float32)
