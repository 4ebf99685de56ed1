"""Search through a map: subject vectors → alignment map → unit norm → atlas index → hits.

Two kinds of subject vector go through a map differently (docs/design.md §5). *Directions* (SAE decoder
rows, concept directions) have no origin: they go through the linear part only and are
re-normalised. *Activations* (residuals) are points: they go through the whole affine map, and by
default the atlas centre is then subtracted again, so the cosine compares what is specific to the
token with the concept directions rather than the large offset every residual shares (with the
offset kept, every token ranks the same few concepts first). ``centre=False`` searches the raw
mapped activation.

The array functions (`project`, `search_arrays`) take and return plain arrays in large batches,
so labelling and scripts reuse them and a distributed runner can call them per shard; the index is
searched by the store's one search (`Store.search_arrays`), and `search` joins labels from the
database into `Hit` lists. Which index structure an atlas gets is the
index-spec policy of ``indexes.policy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from engine.errors import BadValueError, ShapeError
from engine.store.concept_search import SEARCH_BATCH
from engine.store.store import Hit, Store
from engine.store.vectorfiles import check_query_rows
from engine.util import check_k, unit_rows

VectorKind = Literal["directions", "activations"]
VECTOR_KINDS: tuple[str, ...] = ("directions", "activations")

DEFAULT_SEARCH_BATCH = SEARCH_BATCH  # queries per index call (`Store.search_arrays`)


# ---------------------------------------------------------------------- projection


def project(amap: Any, vectors: np.ndarray, kind: VectorKind = "directions", centre: bool = True) -> np.ndarray:
    """Subject vectors (n, d_subject) → unit atlas-space queries (n, d_atlas) float32.

    ``kind="directions"``: linear part, re-normalised. ``kind="activations"``: the affine map,
    minus the atlas centre unless ``centre=False``, then unit norm.
    """
    x = _as_matrix(vectors, amap, "subject vectors")
    if kind == "directions":
        y = amap.map_directions(x)  # (n, d_atlas)
    elif kind == "activations":
        y = amap.map_activations(x)  # (n, d_atlas)
        if centre:
            y = y - atlas_centre(amap)
    else:
        raise BadValueError(f"kind must be one of {VECTOR_KINDS}, got {kind!r}")
    return unit_rows(y)


def atlas_centre(amap: Any) -> np.ndarray:
    """Where the map sends the subject's mean residual: the atlas-side centre (d_atlas,)."""
    scale = amap.atlas_resid_norm if getattr(amap, "normalize", False) else 1.0
    return (np.asarray(amap.atlas_mean, dtype=np.float64) * scale).astype(np.float32)


def _as_matrix(vectors: np.ndarray, amap: Any, what: str) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ShapeError(f"{what} have shape {np.shape(vectors)}; the map needs (n, {amap.d_subject})")
    amap.check_site(None, None, x.shape[1])  # another width: SiteMismatchError naming the map's site
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------- search


def search_arrays(
    store: Store, amap: Any, vectors: np.ndarray, k: int = 10, *, kind: VectorKind = "directions",
    centre: bool = True, batch_size: int = DEFAULT_SEARCH_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` atlas concepts of each subject vector: (scores (n, k) float32, ordinals (n, k) int64).

    Ordinals are ``-1`` (score ``-inf``) where the index returns fewer than ``k``. Each batch is
    projected through the map (`project`) and searched by the store (`Store.search_arrays`).
    """
    check_k(k)
    info = store.atlas(amap.atlas)
    amap.check_atlas(info.name, info.dim)
    x = check_query_rows(_as_matrix(vectors, amap, "subject vectors"), kind, "subject vectors")
    return store.search_arrays(info.name, x, k, batch_size=batch_size,
                               to_atlas=lambda b: project(amap, b, kind, centre))


def search(
    store: Store, amap: Any, vectors: np.ndarray, k: int = 10, *, kind: VectorKind = "directions",
    centre: bool = True, batch_size: int = DEFAULT_SEARCH_BATCH,
) -> list[list[Hit]]:
    """Top-``k`` hits (labels joined from the database) of each subject vector, through ``amap``."""
    scores, ids = search_arrays(store, amap, vectors, k, kind=kind, centre=centre, batch_size=batch_size)
    return store.hits(amap.atlas, scores, ids)


# ---------------------------------------------------------------------- explain


@dataclasses.dataclass(frozen=True)
class TokenHits:
    """The top concepts of one token of a text, through a map."""

    position: int  # token position in the model's input (specials included)
    token: str  # the text the token covers (or its decoded piece when offsets are unknown)
    start: int  # character span in the text; -1 when unknown
    end: int
    hits: list[Hit]
    # per hit, the atlas SAE's activation of that feature on this token (None: the atlas has no encoder)
    activations: list[float] | None = None


def explain(
    store: Store, amap: Any, text: str, k: int = 5, *, centre: bool = True, model: Any = None,
    tokenizer: Any = None, device: str = "cpu", dtype: str = "float32",
) -> list[TokenHits]:
    """Per token of ``text`` in the map's subject model: the top-``k`` atlas concepts.

    The residual at the map's subject site is read with forward hooks, mapped as an activation and
    searched (cosine). Where the atlas keeps its SAE's encoder, each hit also carries that
    feature's activation: the mapped residual (``map_activations``, an atlas-site residual, not
    re-centred) through the encoder (`feature_activations`). ``model``/``tokenizer`` default to the
    subject model registered in the store, loaded on ``device`` in ``dtype`` (activations are read
    back as float32 whatever the dtype).
    """
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered

    check_k(k)  # before the model loads: a bad k is said at once
    if model is None or tokenizer is None:
        model, tokenizer = load_registered(store, amap.subject_model, device=device, dtype=dtype)
    batches = list(collect(model, tokenizer, [text], Site((amap.subject_layer,), amap.subject_hook),
                           batch_size=1, desc=None, dtype=torch.float32))
    if not batches or batches[0].n_tokens == 0:
        return []
    b = batches[0]
    acts = next(iter(b.acts.values())).numpy()  # (n_tokens, d_subject)
    amap.check_site(None, None, acts.shape[1])  # the loaded model has the map's width
    hits = search(store, amap, acts, k, kind="activations", centre=centre)
    feats = feature_activations(store, amap, acts)
    out = []
    for j, row in enumerate(hits):
        s, e = (int(v) for v in b.offsets[j])
        piece = text[s:e] if 0 <= s < e else tokenizer.decode([int(b.token_id[j])])
        fa = None if feats is None else [float(feats[j, h.ordinal]) for h in row]
        out.append(TokenHits(int(b.position[j]), piece, s, e, row, fa))
    return out


def feature_activations(store: Store, amap: Any, residuals: np.ndarray) -> np.ndarray | None:
    """The atlas SAE's feature activations (n, n_concepts) of subject residuals, or None without an encoder.

    Subject residuals (n, d_subject) → ``amap.map_activations`` (atlas-site residuals) → the
    atlas's encoder (ReLU / JumpReLU / TopK, `engine.atlas.encoder`).
    """
    from engine.atlas.encoder import AtlasEncoder

    info = store.atlas(amap.atlas)
    amap.check_atlas(info.name, info.dim)
    if not info.has_encoder:
        return None
    encoder = AtlasEncoder.from_tensors(store.atlas_tensors(info.name))
    if encoder is None:
        return None
    x = _as_matrix(residuals, amap, "subject residuals")
    return encoder.encode(np.asarray(amap.map_activations(x), dtype=np.float32))


@dataclasses.dataclass(frozen=True)
class ConceptSummary:
    """A concept over a whole explained text: its best and mean score over the tokens whose top-k it is in."""

    ref: str
    label: str
    max_score: float
    mean_score: float
    n_tokens: int  # tokens with the concept in their top-k
    best_token: str  # the token where it scores highest


def explain_summary(tokens: Sequence[TokenHits], by: Literal["max", "mean"] = "max") -> list[ConceptSummary]:
    """Text-level summary of `explain`: every concept in some token's top-k, ranked by its max (or
    mean) score over those tokens."""
    if by not in ("max", "mean"):
        raise BadValueError(f"rank by 'max' or 'mean', got {by!r}")
    seen: dict[str, list[tuple[float, str, str]]] = {}
    for t in tokens:
        for h in t.hits:
            seen.setdefault(h.ref, []).append((h.score, t.token, h.label))
    out = []
    for ref, scored in seen.items():
        best = max(scored)
        out.append(ConceptSummary(ref, best[2], best[0], float(np.mean([s for s, _, _ in scored])), len(scored),
                                  best[1]))
    out.sort(key=lambda c: (-(c.max_score if by == "max" else c.mean_score), c.ref))
    return out


def hits_table(rows: Sequence[Sequence[Hit]]) -> list[dict[str, Any]]:
    """Flat rows (query, rank, ref, label, score) of hit lists, for tables, JSON and CSV."""
    return [
        {"query": q, "rank": h.rank, "ref": h.ref, "label": h.label, "score": h.score}
        for q, row in enumerate(rows) for h in row
    ]
