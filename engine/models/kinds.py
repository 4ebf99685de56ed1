"""The kinds of model the engine loads (no torch: the registry checks a kind before it loads anything)."""

from __future__ import annotations

from typing import Literal

ModelKind = Literal["causal", "encoder"]  # causal: the LM head (AutoModelForCausalLM); encoder: AutoModel (BERT)
MODEL_KINDS: tuple[str, ...] = ("causal", "encoder")
