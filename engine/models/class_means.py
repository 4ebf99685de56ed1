"""Concept directions from labelled texts: centred class means of a model's residual stream.

The direction of label ``k`` at a site is the mean residual over every (non-special) token of
the texts labelled ``k``, minus the mean of those K means (docs/design.md §7: what every text
shares, template words and position, cancels out). It turns any model into an atlas site
without an SAE: `atlas import-means` makes an atlas of these directions, labelled with the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.errors import ShapeError
from engine.models.activations import collect
from engine.models.hooks import Site
from engine.store.atlases import AtlasSource
from engine.store.index_location import IndexPlacement

if TYPE_CHECKING:
    from engine.models.loading import ModelKind
    from engine.store.atlases import AtlasInfo
    from engine.store.store import Store


def class_means(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[str],
                layers: Sequence[int], *, hook: str = "resid_post", batch_size: int = 16,
                quiet: bool = True) -> tuple[list[str], dict[int, np.ndarray]]:
    """``(label order, {layer: (K, d) centred class means})``; labels in order of first appearance."""
    if len(texts) != len(labels):
        raise ShapeError(f"{len(texts)} texts but {len(labels)} labels")
    order = list(dict.fromkeys(labels))
    if len(order) < 2:
        raise ShapeError("class means need at least two labels (a single class centres to zero)")
    index = {lab: i for i, lab in enumerate(order)}
    y = np.asarray([index[lab] for lab in labels], dtype=np.int64)
    sums: dict[int, np.ndarray] = {}
    counts = np.zeros(len(order))
    for b in collect(model, tokenizer, texts, Site(tuple(layers), hook), batch_size, desc=None if quiet else "class means"):
        cls = torch.from_numpy(y[b.text_index])
        counts += np.bincount(cls.numpy(), minlength=len(order))
        for L, a in b.acts.items():
            acc = sums.setdefault(L, np.zeros((len(order), a.shape[1])))
            acc += torch.zeros(len(order), a.shape[1], dtype=torch.float64).index_add_(0, cls, a.double()).numpy()
    if (counts == 0).any():
        empty = [order[i] for i in np.nonzero(counts == 0)[0]]
        raise ShapeError(f"no tokens for labels {empty[:5]}: every label needs texts")
    out = {}
    for L, acc in sums.items():
        means = acc / counts[:, None]
        out[L] = (means - means.mean(0, keepdims=True)).astype(np.float32)
    return order, out


@dataclass(frozen=True)
class MeansRequest:
    """Where `import_means` reads class means, and how: ``model`` (a registered name, a folder or a
    hub id, registered on first use) of ``kind`` (None: as registered, else causal) at ``layer``
    (negative counts from the end) and ``hook``; ``batch_size`` texts per forward pass on ``device``
    in ``dtype``; ``index``: how and where the atlas's index is built. The options of
    ``atlas import-means`` besides CORPUS and --name."""

    model: str
    layer: int
    hook: str = "resid_post"
    kind: ModelKind | None = None
    batch_size: int = 16
    index: IndexPlacement = IndexPlacement()
    device: str = "cpu"
    dtype: str = "float32"


def import_means(store: Store, name: str, request: MeansRequest, texts: Sequence[str], labels: Sequence[str],
                 descriptions: dict[str, str] | None = None, *, quiet: bool = True) -> AtlasInfo:
    """An atlas ``name`` of the centred class means of labelled ``texts`` at the site of ``request``."""
    from engine.models.hooks import resolve_layer
    from engine.models.registry import resolve_model

    r = request
    m_name, m, tok = resolve_model(store, r.model, kind=r.kind, dtype=r.dtype, device=r.device)
    L = resolve_layer(m, r.layer)
    order, means = class_means(m, tok, texts, labels, [L], hook=r.hook, batch_size=r.batch_size, quiet=quiet)
    d = descriptions or {}
    return store.add_atlas(
        name, means[L], order, [d.get(lab) for lab in order],
        extra={"definition": "centred class means of the labelled texts' tokens", "n_texts": len(texts)},
        source=AtlasSource(model=m_name, layer=L, hook=r.hook, kind="class-means",
                           ref=f"{len(texts)} labelled texts"),
        index=r.index,
    )
