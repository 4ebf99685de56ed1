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

Criteria (``criterion``: ``nn``, ``csls``, ``isf``; `engine.labelling.criteria`) re-rank each
query's cosine candidates with an atlas-side statistic over a *population* of queries, which
depends on the kind of vector:

- ``directions``: the queries given, as a labelling run does (one exact pass gives the statistic
  and the candidates; with a handful of queries csls and isf rank as nn does);
- ``activations`` (and so `explain`): the map's token population, `token_stat`: the mapped
  residuals of a corpus sample, computed once per (map, atlas, centring) from ``stat_corpus``
  texts and cached in the store's activation cache, keyed by the checksums of the map and of the
  atlas's vectors (a refitted map or re-imported atlas is a new key; one file serves csls and isf).

The same token statistic *whitens* activations (``whiten=True``, `TokenStat`): the mapped residual
is centred on the population's mean and multiplied by the inverse square root of its covariance
before the cosine. A token's residual varies most along directions that say which token it is and
where, not which concept; whitening evens those out (issue 25, part 5: per-token explanation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from engine.errors import BadValueError, ShapeError
from engine.labelling.criteria import (
    DEFAULT_CSLS_K,
    DEFAULT_ISF_BETA,
    AtlasSideStats,
    AtlasStat,
    candidate_k,
    check_criterion,
    rerank,
)
from engine.store import layout
from engine.store.reads import SEARCH_BATCH
from engine.store.store import Hit, Store, parse_concept_ref
from engine.store.vectorfiles import check_query_rows
from engine.util import check_k, unit_rows, write_store_file

VectorKind = Literal["directions", "activations"]
VECTOR_KINDS: tuple[str, ...] = ("directions", "activations")

DEFAULT_SEARCH_BATCH = SEARCH_BATCH  # queries per index call (`Store.search_arrays`)
STAT_MAX_TOKENS = 50_000  # tokens of ``stat_corpus`` that `token_stat` reads at most


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


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How `search_arrays`, `search` and `explain` rank: ``criterion`` (``nn``, ``csls``, ``isf``),
    CSLS's ``csls_k``, and ``whiten`` (activations: whiten with the map's `TokenStat` instead of
    centring). The default is plain cosine."""

    criterion: str = "nn"
    whiten: bool = False
    csls_k: int = DEFAULT_CSLS_K

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        if not isinstance(self.csls_k, int) or self.csls_k < 1:
            raise BadValueError(f"csls k must be a whole number >= 1, got {self.csls_k!r}")


def search_arrays(
    store: Store, amap: Any, vectors: np.ndarray, k: int = 10, *, kind: VectorKind = "directions",
    centre: bool = True, batch_size: int = DEFAULT_SEARCH_BATCH, scoring: Scoring | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` atlas concepts of each subject vector: (scores (n, k) float32, ordinals (n, k) int64).

    Ordinals are ``-1`` (score ``-inf``; NaN under csls / isf) where the index returns fewer than
    ``k``. Each batch is projected through the map (`project`) and searched by the store
    (`Store.search_arrays`). Under ``scoring.criterion`` csls / isf the scores are the criterion's
    over the kind's population (see the module docstring); ``scoring.whiten`` (activations only):
    whiten with the map's cached `TokenStat` instead of centring.
    """
    check_k(k)
    scoring = scoring or Scoring()
    criterion, csls_k, whiten = scoring.criterion, scoring.csls_k, scoring.whiten
    info = store.atlas(amap.atlas)
    amap.check_atlas(info.name, info.dim)
    x = check_query_rows(_as_matrix(vectors, amap, "subject vectors"), kind, "subject vectors")
    tokens = None
    if whiten:
        if kind != "activations" or not centre:
            raise BadValueError("whitening applies to activations, and replaces the centring (no --raw)")
        tokens = token_stat(store, amap, centre=centre, csls_k=csls_k)

    def to_atlas(b: np.ndarray) -> np.ndarray:
        return project(amap, b, kind, centre) if tokens is None else tokens.whiten(amap, b)

    if criterion == "nn":
        return store.search_arrays(info.name, x, k, batch_size=batch_size, to_atlas=to_atlas)
    kc = candidate_k(k, info.n_concepts, csls_k)
    stat = None
    if kind == "activations":
        stat = (tokens or token_stat(store, amap, centre=centre, csls_k=csls_k)).stat(whiten)
    if stat is None:  # directions: the queries given are the population (one pass: statistic and candidates)
        acc = AtlasSideStats(np.asarray(store.atlas_vectors(info.name, normalized=True)), k=csls_k,
                             log_partition=criterion == "isf")
        cands = [acc.update(to_atlas(x[i:i + batch_size]), kc) for i in range(0, len(x), batch_size)]
        cs, ci = np.concatenate([c[0] for c in cands]), np.concatenate([c[1] for c in cands])
        stat = AtlasStat.of(acc)
    else:
        cs, ci = store.search_arrays(info.name, x, kc, batch_size=batch_size, to_atlas=to_atlas)
    return rerank(cs, ci, criterion, stat, k)


def search(
    store: Store, amap: Any, vectors: np.ndarray, k: int = 10, *, kind: VectorKind = "directions",
    centre: bool = True, batch_size: int = DEFAULT_SEARCH_BATCH, scoring: Scoring | None = None,
) -> list[list[Hit]]:
    """Top-``k`` hits (labels joined from the database) of each subject vector, through ``amap``
    (``scoring``: see `search_arrays`)."""
    scores, ids = search_arrays(store, amap, vectors, k, kind=kind, centre=centre, batch_size=batch_size,
                                scoring=scoring)
    return store.hits(amap.atlas, scores, ids)


# ---------------------------------------------------------------------- the map's token statistic


@dataclasses.dataclass(frozen=True)
class TokenStat:
    """A map's token population at the atlas site, from a corpus sample (`token_stat`).

    ``mean`` and ``zca`` whiten a mapped residual ``y``: ``(y − mean) · zca`` with ``zca = V
    (Λ + λ·mean(Λ))^-½ Vᵀ`` of the population's covariance (`WHITEN_RIDGE` = λ), so that the
    few directions every token varies along (token identity, position) stop drowning the concept
    directions in the cosine. ``plain`` / ``whitened``: the atlas-side statistic (csls, isf) of
    the population's queries as `project` makes them (centred by the atlas centre, or not, as
    the key says) and as `whiten` makes them.
    """

    mean: np.ndarray  # (d_atlas,) float32
    zca: np.ndarray  # (d_atlas, d_atlas) float32, symmetric
    plain: AtlasStat
    whitened: AtlasStat

    def whiten(self, amap: Any, residuals: np.ndarray) -> np.ndarray:
        """Subject residuals (n, d_subject) → whitened unit atlas-space queries (n, d_atlas)."""
        y = np.asarray(amap.map_activations(_as_matrix(residuals, amap, "subject residuals")), dtype=np.float32)
        return unit_rows((y - self.mean) @ self.zca)

    def stat(self, whiten: bool) -> AtlasStat:
        return self.whitened if whiten else self.plain

    @classmethod
    def fit(cls, amap: Any, residuals: np.ndarray, atlas: np.ndarray, *, centre: bool = True,
            csls_k: int = DEFAULT_CSLS_K, beta: float = DEFAULT_ISF_BETA) -> TokenStat:
        """From a sample of subject ``residuals`` (n, d_subject) at the map's subject site and the
        atlas's directions ``atlas`` (n_concepts, d_atlas)."""
        x = _as_matrix(residuals, amap, "subject residuals")
        y = np.asarray(amap.map_activations(x), dtype=np.float64)
        mean = y.mean(0)
        ev, vecs = np.linalg.eigh(np.cov((y - mean).T) if len(y) > 1 else np.eye(y.shape[1]))
        ev = np.clip(ev, 0, None)
        zca = ((vecs * (ev + WHITEN_RIDGE * max(float(ev.mean()), 1e-12)) ** -0.5) @ vecs.T).astype(np.float32)
        a = unit_rows(np.asarray(atlas, dtype=np.float32))
        stats = []
        for q in (project(amap, x, "activations", centre), unit_rows((y - mean).astype(np.float32) @ zca)):
            acc = AtlasSideStats(a, k=csls_k, beta=beta)
            for i in range(0, len(q), DEFAULT_SEARCH_BATCH):
                acc.update(q[i:i + DEFAULT_SEARCH_BATCH])
            stats.append(AtlasStat.of(acc))
        return cls(mean.astype(np.float32), zca, stats[0], stats[1])

    def save(self, f: Any) -> None:
        arrays: dict[str, Any] = {"mean": self.mean, "zca": self.zca}
        for name, st in (("plain", self.plain), ("whitened", self.whitened)):
            arrays.update({f"{name}_{k}": v for k, v in (("k", st.k), ("beta", st.beta), ("r_atlas", st.r_atlas),
                                                          ("log_z", st.log_z), ("n_queries", st.n_queries))})
        np.savez(f, **arrays)

    @classmethod
    def load(cls, f: Any) -> TokenStat:
        with np.load(f) as z:
            st = {name: AtlasStat(int(z[f"{name}_k"]), float(z[f"{name}_beta"]), z[f"{name}_r_atlas"],
                                  z[f"{name}_log_z"], int(z[f"{name}_n_queries"])) for name in ("plain", "whitened")}
            return cls(z["mean"], z["zca"], st["plain"], st["whitened"])


WHITEN_RIDGE = 0.01  # λ of `TokenStat.zca`, relative to the mean eigenvalue; chosen on development worlds


def _stat_file(store: Store, amap: Any, centre: bool, csls_k: int, beta: float) -> Any:
    """Where the token statistic of a saved map is cached: named by a checksum of what it depends
    on (the map's and the atlas vectors' checksums, centring, k, beta, λ), never by a name."""
    if not getattr(amap, "name", None):
        raise BadValueError("a criterion or whitening over activations needs a map saved in the store")
    key = json.dumps({"map": store.map_info(amap.name).sha256, "atlas": store.atlas(amap.atlas).vector_sha256,
                      "centre": bool(centre), "k": int(csls_k), "beta": float(beta), "ridge": WHITEN_RIDGE},
                     sort_keys=True)
    return store.path / layout.ACTIVATIONS_DIR / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def token_stat(store: Store, amap: Any, stat_corpus: Sequence[str] | None = None, *, centre: bool = True,
               csls_k: int = DEFAULT_CSLS_K, model: Any = None, tokenizer: Any = None, device: str = "cpu",
               dtype: str = "float32", max_tokens: int = STAT_MAX_TOKENS) -> TokenStat:
    """Map ``amap``'s `TokenStat`: its whitening and the atlas-side statistics csls / isf rank with.

    With ``stat_corpus`` (texts the subject model reads): their residuals at the map's subject
    site (``max_tokens`` at most, held in memory), mapped as `explain` maps them; the result is
    cached in the store (replacing an earlier corpus's). Without: the cached one, or a
    `BadValueError` saying how to make it.
    """
    path = _stat_file(store, amap, centre, csls_k, DEFAULT_ISF_BETA)
    if stat_corpus is None:
        if not path.is_file():
            raise BadValueError(f"map {amap.name!r} has no token statistic (csls / isf / whitening over its "
                                f"activations need one): give a corpus of texts once (--stat-corpus FILE); "
                                f"it is cached in the store")
        return TokenStat.load(path)
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered

    texts = [t for t in stat_corpus if t.strip()]
    if not texts:
        raise BadValueError("the statistic's corpus has no texts")
    if model is None or tokenizer is None:
        model, tokenizer = load_registered(store, amap.subject_model, device=device, dtype=dtype)
    parts, n = [], 0
    for b in collect(model, tokenizer, texts, Site((amap.subject_layer,), amap.subject_hook), batch_size=16,
                     desc=None, dtype=torch.float32):
        parts.append(next(iter(b.acts.values())).numpy()[: max_tokens - n])
        n += len(parts[-1])
        if n >= max_tokens:
            break
    out = TokenStat.fit(amap, np.concatenate(parts), store.atlas_vectors(amap.atlas, normalized=True),
                        centre=centre, csls_k=csls_k)
    buf = io.BytesIO()
    out.save(buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_store_file(path, buf.getvalue())
    return out


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
    tokenizer: Any = None, device: str = "cpu", dtype: str = "float32", scoring: Scoring | None = None,
) -> list[TokenHits]:
    """Per token of ``text`` in the map's subject model: the top-``k`` atlas concepts.

    The residual at the map's subject site is read with forward hooks, mapped as an activation and
    searched (cosine). Where the atlas keeps its SAE's encoder, each hit also carries that
    feature's activation: the mapped residual (``map_activations``, an atlas-site residual, not
    re-centred) through the encoder (`feature_activations`). ``model``/``tokenizer`` default to the
    subject model registered in the store, loaded on ``device`` in ``dtype`` (activations are read
    back as float32 whatever the dtype). ``scoring`` (`Scoring`): criterion csls / isf re-ranks,
    and ``whiten`` whitens, with the map's cached `TokenStat` (made once by `token_stat` from a corpus).
    """
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered

    check_k(k)  # before the model loads: a bad k or criterion is said at once
    scoring = scoring or Scoring()
    if scoring.whiten and not centre:
        raise BadValueError("whitening replaces the centring: --whiten and --raw exclude each other")
    if scoring.criterion != "nn" or scoring.whiten:
        token_stat(store, amap, centre=centre, csls_k=scoring.csls_k)  # cached, or say how to make it, before the model loads
    if model is None or tokenizer is None:
        model, tokenizer = load_registered(store, amap.subject_model, device=device, dtype=dtype)
    batches = list(collect(model, tokenizer, [text], Site((amap.subject_layer,), amap.subject_hook),
                           batch_size=1, desc=None, dtype=torch.float32))
    if not batches or batches[0].n_tokens == 0:
        return []
    b = batches[0]
    acts = next(iter(b.acts.values())).numpy()  # (n_tokens, d_subject)
    amap.check_site(None, None, acts.shape[1])  # the loaded model has the map's width
    hits = search(store, amap, acts, k, kind="activations", centre=centre, scoring=scoring)
    feats = feature_activations(store, amap, acts)
    out = []
    for j, row in enumerate(hits):
        s, e = (int(v) for v in b.offsets[j])
        piece = text[s:e] if 0 <= s < e else tokenizer.decode([int(b.token_id[j])])
        fa = None if feats is None else [float(feats[j, h.ordinal]) for h in row]
        out.append(TokenHits(int(b.position[j]), piece, s, e, row, fa))
    return out


@dataclasses.dataclass(frozen=True)
class TokenScore:
    """One token of a text and one concept's score on it (the cosine `explain` ranks by)."""

    token: str
    start: int  # character span in the text; -1 when unknown
    end: int
    score: float


def concept_on_texts(
    store: Store, amap: Any, texts: Sequence[str], ref: str, *, centre: bool = True, model: Any = None,
    tokenizer: Any = None,
) -> list[list[TokenScore]]:
    """Per text, per token: one concept's score, the cosine of the token's mapped residual (as `explain`:
    the affine map, minus the atlas centre unless ``centre=False``) with the concept's direction. What
    the concept page shades its top windows and a reader's own text by; a text of no token gives []."""
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered

    atlas, ordinal = parse_concept_ref(ref, amap.atlas)
    if atlas != amap.atlas:
        raise BadValueError(f"concept {ref!r} is not in atlas {amap.atlas!r}, where map {amap.name!r} maps")
    store.concept(ordinal, amap.atlas)  # NotFoundError past the atlas
    direction = unit_rows(store.atlas_rows(amap.atlas, [ordinal]))[0]
    if model is None or tokenizer is None:
        model, tokenizer = load_registered(store, amap.subject_model)
    out: list[list[TokenScore]] = [[] for _ in texts]
    for b in collect(model, tokenizer, list(texts), Site((amap.subject_layer,), amap.subject_hook),
                     batch_size=16, desc=None, dtype=torch.float32):
        if b.n_tokens == 0:
            continue
        acts = next(iter(b.acts.values())).numpy()
        scores = project(amap, acts, "activations", centre=centre) @ direction
        for j in range(b.n_tokens):
            t = int(b.text_index[j])
            st, e = (int(v) for v in b.offsets[j])
            piece = texts[t][st:e] if 0 <= st < e else tokenizer.decode([int(b.token_id[j])])
            out[t].append(TokenScore(piece, st, e, float(scores[j])))
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
