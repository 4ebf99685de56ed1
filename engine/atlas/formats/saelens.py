"""The activation function of a SAELens SAE, from its ``cfg.json``, in the canonical encoder form.

`engine.atlas.importers.read_saelens` reads the tensors; this adds what the encoder does with them
(sae_lens/saes/*.py, the ``architecture`` and ``apply_b_dec_to_input`` of the config; before
SAELens 6, ``activation_fn_str`` / ``activation_fn_kwargs``): standard → ReLU, ``jumprelu`` (a
``threshold`` tensor) → JumpReLU, ``topk`` → TopK with ``k``; ``apply_b_dec_to_input`` folds
``b_dec`` into ``b_enc``. A gated SAE, or one that normalises its input at run time, keeps its
directions but no encoder (its encoder is not of the canonical form).
"""

from __future__ import annotations

from pathlib import Path

from engine.atlas.formats.base import SAEWeights, fold_encoder, positive_int, read_json_object


def with_activation(sae: SAEWeights, folder: Path) -> SAEWeights:
    """``sae`` (as read_saelens returns it) with its activation set and its encoder folded."""
    folder = Path(folder)
    cfg_path = folder / "cfg.json"
    cfg = read_json_object(cfg_path)
    if sae.W_enc is None or sae.b_enc is None:
        return sae
    arch = str(cfg.get("architecture") or "standard").lower()
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    norm = str(cfg.get("normalize_activations") or "none")
    if arch == "gated" or norm not in ("none", "None"):
        sae.W_enc = sae.b_enc = sae.threshold = None
        return sae
    if cfg.get("apply_b_dec_to_input", True) and sae.b_dec is not None:  # SAELens' default is True
        sae.W_enc, sae.b_enc = fold_encoder(sae.W_enc, sae.b_enc, input_bias=sae.b_dec)
    if arch in ("topk", "batchtopk") or act == "topk":
        sae.activation = "topk"
        sae.k = positive_int(cfg.get("k") or (kwargs.get("k") if isinstance(kwargs, dict) else None), cfg_path, "k")
        if arch == "batchtopk" and sae.threshold is not None:  # inference with the learnt threshold
            sae.activation, sae.k = "jumprelu", None
    elif sae.threshold is not None or arch == "jumprelu":
        sae.activation = "jumprelu"
    else:
        sae.activation = "relu"
    return sae
