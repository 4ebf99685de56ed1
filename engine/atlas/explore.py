"""What the explorer's pages read, as plain data: the best map into each subject, the map a page
starts with, a concept's title and label provenance, a page of an atlas's concepts, a map's and a
model's pages, a histogram of a concept's top activations and the tokens its direction promotes
and suppresses through a subject's unembedding.

The server's routes call these and return their data as JSON (`engine.serve.routes`); a script can
call them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import BadValueError, NotFoundError
from engine.store.maps import MapInfo
from engine.store.records import Concept
from engine.store.store import Store, parse_concept_ref

MAX_LIST = 500  # concepts per page of an atlas's list


def _r2(m: MapInfo) -> float:
    return m.heldout_r2 if m.heldout_r2 is not None and np.isfinite(m.heldout_r2) else -np.inf


def best_maps(store: Store, atlas: str) -> list[MapInfo]:
    """Per subject model, the map into ``atlas`` with the best held-out R² (ties: by name), by subject."""
    best: dict[str, MapInfo] = {}
    for m in sorted(store.maps(), key=lambda m: (-_r2(m), m.name)):
        if m.atlas == atlas and m.subject_model not in best:
            best[m.subject_model] = m
    return [best[s] for s in sorted(best)]


def default_map(store: Store) -> str | None:
    """The map a page starts with: one into the atlas with the largest share of labelled concepts (an
    evaluation map into an unlabelled SAE atlas names nothing a reader knows), the best held-out R²
    among those; None when the store has no map."""
    share = {a.name: a.n_labelled / max(1, a.n_concepts) for a in store.atlases()}
    maps = store.maps()
    if not maps:
        return None
    return min(maps, key=lambda m: (-share.get(m.atlas, 0.0), -_r2(m), m.name)).name


def concept_title(c: Concept) -> str:
    """What a page calls a concept: its label, or for an unlabelled one (an SAE latent) "latent N of ATLAS"."""
    return c.label if c.labelled else f"latent {c.ordinal} of {c.atlas} (unlabelled)"


def label_source(store: Store, c: Concept) -> dict[str, Any]:
    """Where a concept's label comes from: the import's kind and file, the explanation's model and
    score where the source gave them (Neuronpedia), and its confidence where one was recorded."""
    a = store.atlas(c.atlas)
    extra = c.extra or {}
    return {"labelled": c.labelled, "kind": c.source_kind or a.source_kind, "ref": c.source_ref or a.source_ref,
            "explainer": extra.get("explanation_model") or extra.get("explanationModelName"),
            "score": extra.get("score"), "confidence": extra.get("confidence")}


@dataclasses.dataclass(frozen=True)
class ConceptList:
    """One page of an atlas's concepts: those matching the filter, ``total`` of them."""

    atlas: str
    total: int
    offset: int
    limit: int
    concepts: list[dict[str, Any]]


def concept_list(store: Store, atlas: str, *, query: str = "", labelled: bool | None = None, offset: int = 0,
                 limit: int = 50) -> ConceptList:
    """The concepts of ``atlas`` in ordinal order whose label or description contains every word of
    ``query`` (case-insensitive), only labelled or unlabelled ones when ``labelled`` says so; the page
    at ``offset`` of ``limit`` (at most `MAX_LIST`)."""
    if not 1 <= limit <= MAX_LIST or offset < 0:
        raise BadValueError(f"a page is 1 to {MAX_LIST} concepts from an offset >= 0, got {limit} from {offset}")
    words = query.lower().split()
    found = [c for c in store.concepts(atlas)
             if (labelled is None or c.labelled == labelled)
             and all(w in f"{c.label} {c.description or ''}".lower() for w in words)]
    page = found[offset: offset + limit]
    return ConceptList(atlas, len(found), offset, limit,
                       [{"ref": c.ref, "ordinal": c.ordinal, "label": c.label, "title": concept_title(c),
                         "description": c.description, "labelled": c.labelled, "density": c.density} for c in page])


def map_page(store: Store, name: str) -> dict[str, Any]:
    """A map: its fit (method, pairing, pairs, held-out R² and cosine), sites, the labelling runs
    through it and its top-contexts run."""
    m = store.map_info(name)
    runs = [r for r in store.runs() if r.map == name]
    ctx = store.context_run(m.atlas, name)
    return {"map": dataclasses.asdict(m), "runs": [dataclasses.asdict(r) for r in runs],
            "contexts": None if ctx is None else {"corpus": ctx.corpus, "status": ctx.status, "n_done": ctx.n_done,
                                                  "n_texts": ctx.n_texts, "top": ctx.top}}


def model_page(store: Store, name: str) -> dict[str, Any]:
    """A registered model: what the store records of it, the maps from it and the atlases of its sites."""
    info = store.get_model(name)
    return {"model": dataclasses.asdict(info),
            "maps": [dataclasses.asdict(m) for m in store.maps() if m.subject_model == name],
            "atlases": [dataclasses.asdict(a) | {"site": a.site} for a in store.atlases() if a.model == name]}


def histogram(values: Sequence[float], bins: int = 12) -> dict[str, Any]:
    """``{"edges": [bins + 1], "counts": [bins]}`` of ``values`` (empty lists for none)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if not len(x):
        return {"edges": [], "counts": []}
    lo, hi = float(x.min()), float(x.max())
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def direction_logits(store: Store, map_name: str, ref: str, model: Any, tokenizer: Any, k: int = 10) -> dict[str, Any]:
    """The tokens a concept's direction promotes and suppresses in a subject: the direction carried
    into the subject through ``map_name`` (its inverse, as steering does), read through the subject's
    unembedding (``W_U``, its output embeddings): ``{"top": [[token, logit]], "bottom": [...]}``.
    A model without an output embedding (an encoder) is a `NotFoundError`."""
    from engine.align.map import load_map

    amap = load_map(store, map_name)
    atlas, ordinal = parse_concept_ref(ref, amap.atlas)
    if atlas != amap.atlas:
        raise BadValueError(f"concept {ref!r} is not in atlas {amap.atlas!r} of map {map_name!r}")
    store.concept(ordinal, atlas)  # NotFoundError for an ordinal past the atlas
    v = store.atlas_rows(atlas, [ordinal])[0]
    u = np.asarray(amap.inverse_directions(v), dtype=np.float32)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise NotFoundError(f"model {amap.subject_model!r} has no unembedding to read a direction through")
    w = head.weight.detach().float().cpu().numpy()  # (vocab, d)
    if w.shape[1] != u.shape[0]:
        raise BadValueError(f"the unembedding of {amap.subject_model!r} has width {w.shape[1]}, the map {u.shape[0]}")
    logits = w @ u
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    order = [int(i) for i in np.argsort(-logits) if int(i) not in special]
    k = max(1, min(k, len(order) // 2 or 1))

    def rows(ids: list[int]) -> list[list[Any]]:
        return [[tokenizer.decode([i]), float(logits[i])] for i in ids]

    return {"map": map_name, "subject_model": amap.subject_model, "subject_layer": amap.subject_layer,
            "top": rows(order[:k]), "bottom": rows(order[::-1][:k])}


def corpus_density(store: Store, map_name: str, ref: str, model: Any, tokenizer: Any, *, max_texts: int = 200,
                   bins: int = 24) -> dict[str, Any]:
    """A concept's score (`engine.search.concept_on_texts`: the cosine `explain` ranks by) on every token
    of the first ``max_texts`` texts of the corpus its top contexts through ``map_name`` were read from:
    ``{"histogram", "n_tokens", "n_texts", "positive" (share of tokens scoring above 0), "corpus"}``.
    A map without a top-contexts run, or whose corpus file is gone, is a `NotFoundError`."""
    from engine.align.corpus import read_corpus
    from engine.align.map import load_map
    from engine.search import concept_on_texts

    if not 1 <= max_texts <= 1000:
        raise BadValueError(f"max_texts must be between 1 and 1000, got {max_texts}")
    amap = load_map(store, map_name)
    run = store.context_run(amap.atlas, map_name)
    if run is None:
        raise NotFoundError(f"map {map_name!r} has no top contexts, so no corpus; "
                            f"`atlas contexts {map_name} --corpus FILE` makes them")
    try:
        texts = read_corpus(run.corpus)[:max_texts]
    except (OSError, ValueError) as e:
        raise NotFoundError(f"the corpus of {map_name!r}'s top contexts cannot be read ({run.corpus}): {e}") from None
    scores = [t.score for text in concept_on_texts(store, amap, texts, ref, model=model, tokenizer=tokenizer)
              for t in text]
    return {"map": map_name, "corpus": run.corpus, "n_texts": len(texts), "n_tokens": len(scores),
            "positive": float(np.mean(np.asarray(scores) > 0)) if scores else None,
            "histogram": histogram(scores, bins)}
