"""Concept directions of ConceptWorld: centred topic means of the residual stream, in any model.

A concept is a document's topic, so its direction at a layer is the mean residual over all
(non-special) token positions of the documents on that topic, minus the mean of the K topic
means (docs/design.md §7). Centring removes what every document shares (template words, position), which
"member-word tokens minus other tokens" does not: those directions share one "slot word vs
template word" component and align poorly.

Residuals are read with `engine.models.hooks.read_residuals` (layer ``L`` = output of block ``L``,
i.e. ``resid_post``), never through ``output_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.errors import ShapeError
from engine.models.hooks import read_residuals, resolve_layer


@torch.no_grad()
def document_means(model: torch.nn.Module, tokenizer, texts: Sequence[str], layers: Sequence[int],
                   batch_size: int = 32) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Mean ``resid_post`` per document at each layer, over its non-special tokens.

    Returns ``({layer: (n_docs, d_model) float32}, token counts (n_docs,))``, keyed by ``layers``
    as given. Padding, ``<bos>`` and ``<eos>`` never enter a mean. A layer out of range is an
    `ArchitectureError`.
    """
    model.eval()
    block = {layer: resolve_layer(model, layer) for layer in layers}  # as given -> block index
    sums: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    counts: list[np.ndarray] = []
    # prepend=False: read after any edit installed earlier, as a plain forward hook would.
    with read_residuals(model, layers, prepend=False) as captured:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                            return_special_tokens_mask=True, return_tensors="pt")
            keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()  # (B, T)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            w = keep.unsqueeze(-1).float()  # (B, T, 1)
            n = keep.sum(1)  # (B,)
            counts.append(n.numpy())
            for layer in layers:
                h = captured.acts[block[layer]].float()  # (B, T, d_model)
                sums[layer].append(((h * w).sum(1) / n.clamp(min=1).unsqueeze(-1)).numpy())
    return {layer: np.concatenate(v).astype(np.float32) for layer, v in sums.items()}, np.concatenate(counts)


def centred_topic_means(doc_means: np.ndarray, doc_counts: np.ndarray, doc_concepts: Sequence[int],
                        n_concepts: int) -> np.ndarray:
    """Token-weighted mean residual of each topic, minus the mean of the topic means: ``(K, d)``."""
    if doc_means.ndim != 2 or len(doc_means) != len(doc_concepts) or len(doc_counts) != len(doc_concepts):
        raise ShapeError(f"doc_means {doc_means.shape}, doc_counts {doc_counts.shape} and "
                         f"{len(doc_concepts)} concepts must agree on the number of documents")
    y = np.asarray(doc_concepts)
    w = doc_counts.astype(np.float64)[:, None]  # (n_docs, 1)
    means = np.zeros((n_concepts, doc_means.shape[1]), dtype=np.float64)  # (K, d)
    for k in range(n_concepts):
        sel = y == k
        if not sel.any():
            raise ShapeError(f"no document on concept {k}: every concept needs documents for its direction")
        means[k] = (doc_means[sel] * w[sel]).sum(0) / w[sel].sum()
    return (means - means.mean(0, keepdims=True)).astype(np.float32)


def concept_directions(model: torch.nn.Module, tokenizer, docs: Sequence[tuple[str, int]], n_concepts: int,
                       layers: Sequence[int], batch_size: int = 32) -> dict[int, np.ndarray]:
    """Concept directions ``(K, d_model)`` at each of ``layers`` from documents ``(text, concept)``."""
    means, counts = document_means(model, tokenizer, [t for t, _ in docs], layers, batch_size)
    ys = [k for _, k in docs]
    return {layer: centred_topic_means(m, counts, ys, n_concepts) for layer, m in means.items()}
