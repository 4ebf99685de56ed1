"""Concepts: text lookup (the search page), one concept, its neighbours, the subject features
labelled with it, its top contexts and the tokens its direction promotes (the concept page)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field, field_validator

from engine.serve.deps import (
    MAX_CONTEXTS,
    MAX_K,
    MAX_PAGE,
    MAX_TEXT,
    ModelsDep,
    Name,
    Ordinal,
    StoreDep,
    encodable,
)
from engine.util import to_plain

router = APIRouter(tags=["concepts"])


@router.get("/api/lookup", summary="Concepts ranked by text (`atlas lookup`)")
def lookup(store: StoreDep,
           q: Annotated[str, Query(min_length=1, max_length=500, description="Words to look up.")],
           k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
           atlas: Annotated[str | None, Query(max_length=200, description="Only this atlas.")] = None,
           ) -> dict[str, Any]:
    from engine.atlas.lookup import lookup as run_lookup

    encodable(q)
    hits = run_lookup(store, q, k=k, atlas=atlas or None)
    sites = {a.name: a.site for a in store.atlas_records()} if hits else {}  # rows only: no counts
    return {"query": q, "hits": [to_plain(h) | {"site": sites.get(h.atlas)} for h in hits]}


@router.get("/api/concepts/{atlas}/{ordinal}",
            summary="A concept, its provenance, where its label comes from and the best map into each subject "
                    "(`atlas show`)")
def concept(store: StoreDep, atlas: Name, ordinal: Ordinal) -> dict[str, Any]:
    from engine.atlas.explore import best_maps, concept_title, label_source

    c = store.concept(ordinal, atlas)
    a = store.atlas(atlas)
    return {"concept": to_plain(c) | {"ref": c.ref, "title": concept_title(c)},
            "label_source": label_source(store, c),
            "best_maps": [{"map": m.name, "subject_model": m.subject_model, "subject_layer": m.subject_layer,
                           "heldout_r2": m.heldout_r2} for m in best_maps(store, atlas)],
            "provenance": {"atlas": a.name, "model": a.model, "layer": a.layer, "hook": a.hook, "site": a.site,
                           "source_kind": c.source_kind or a.source_kind,
                           "source_file": c.source_ref or a.source_ref, "revision": a.revision,
                           "has_encoder": a.has_encoder, "dim": a.dim, "n_concepts": a.n_concepts}}


@router.get("/api/concepts/{atlas}/{ordinal}/neighbors", summary="Nearest concepts by direction (`atlas neighbors`)")
def neighbors(store: StoreDep, atlas: Name, ordinal: Ordinal,
              k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> list[dict[str, Any]]:
    return to_plain(store.neighbors(ordinal, k=k, atlas=atlas))


@router.get("/api/concepts/{atlas}/{ordinal}/features",
            summary="Subject features labelled with the concept (their top label, of passing confidence), per map "
                    "into its atlas (from labelling runs)")
def concept_features(store: StoreDep, atlas: Name, ordinal: Ordinal,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
                     any_rank: Annotated[bool, Query(description="Also features where it is a runner-up.")] = False,
                     min_confidence: Annotated[float | None, Query(ge=0.0, le=1.0, description=(
                         "Only labels of at least this confidence (runs without confidence: all)."))] = 0.5,
                     ) -> list[dict[str, Any]]:
    store.concept(ordinal, atlas)  # 404 for an unknown concept
    rows = store.concept_labels(atlas, ordinal, limit=limit, top_only=not any_rank, min_confidence=min_confidence)
    out = []
    for m in store.maps():
        if m.atlas != atlas:
            continue
        out.append({"map": m.name, "subject_model": m.subject_model, "subject_layer": m.subject_layer,
                    "subject_hook": m.subject_hook,
                    "features": [{"run": r, "feature": f, "rank": rank, "score": score}
                                 for r, map_name, f, rank, score in rows if map_name == m.name]})
    return out


@router.get("/api/concepts/{atlas}/{ordinal}/contexts",
            summary="Top activating text windows of the concept, per model that read the corpus (`atlas contexts`)")
def concept_contexts(store: StoreDep, atlas: Name, ordinal: Ordinal,
                     limit: Annotated[int, Query(ge=1, le=MAX_CONTEXTS)] = 20) -> list[dict[str, Any]]:
    from engine.atlas.explore import histogram

    store.concept(ordinal, atlas)  # 404 for an unknown concept
    return [{"source": run.source, "atlas": run.atlas, "map": run.map, "model": run.model,
             "layer": run.params.get("layer"), "hook": run.params.get("hook"), "corpus": run.corpus,
             "scoring": run.scoring, "status": run.status, "n_done": run.n_done, "n_texts": run.n_texts,
             "top": run.top, "contexts": [to_plain(c) | {"token": c.token} for c in found],
             "histogram": histogram([c.activation for c in found])}
            for run, found in store.concept_contexts(atlas, ordinal, limit=limit)]


@router.get("/api/concepts/{atlas}/{ordinal}/logits",
            summary="Tokens the concept's direction promotes and suppresses in a map's subject (through its unembedding)")
def concept_logits(store: StoreDep, models: ModelsDep, atlas: Name, ordinal: Ordinal,
                   map: Annotated[str, Query(min_length=1, max_length=200, description="A map into the atlas.")],
                   k: Annotated[int, Query(ge=1, le=50)] = 10) -> dict[str, Any]:
    from engine.atlas.explore import direction_logits

    subject = store.map_info(map).subject_model
    model, tokenizer, lock = models.get(subject, "causal")  # the LM head is the unembedding
    with lock:
        return direction_logits(store, map, f"{atlas}/{ordinal}", model, tokenizer, k)


class ScoresRequest(BaseModel):
    map: str = Field(min_length=1, max_length=200, description="A map into the concept's atlas; its subject reads.")
    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]] = Field(min_length=1, max_length=32)

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for t in v:
            encodable(t)
        return v

    _check_map = field_validator("map")(encodable)


@router.post("/api/concepts/{atlas}/{ordinal}/scores",
             summary="Per token of each text: the concept's score through a map (test your text; shaded windows)")
def concept_scores(store: StoreDep, models: ModelsDep, atlas: Name, ordinal: Ordinal,
                   req: Annotated[ScoresRequest, Body()]) -> dict[str, Any]:
    from engine.align.map import load_map
    from engine.search import concept_on_texts

    amap = load_map(store, req.map)
    model, tokenizer, lock = models.get(amap.subject_model)
    with lock:
        scored = concept_on_texts(store, amap, req.texts, f"{atlas}/{ordinal}", model=model, tokenizer=tokenizer)
    return {"map": req.map, "subject_model": amap.subject_model, "texts": to_plain(scored)}


@router.get("/api/concepts/{atlas}/{ordinal}/density",
            summary="The concept's score on every token of the first texts of a map's top-contexts corpus: "
                    "histogram and share above 0")
def concept_density(store: StoreDep, models: ModelsDep, atlas: Name, ordinal: Ordinal,
                    map: Annotated[str, Query(min_length=1, max_length=200, description="A map with top contexts.")],
                    texts: Annotated[int, Query(ge=1, le=1000, description="Texts of the corpus read.")] = 200,
                    ) -> dict[str, Any]:
    from engine.atlas.explore import corpus_density

    subject = store.map_info(map).subject_model
    model, tokenizer, lock = models.get(subject)
    with lock:
        return corpus_density(store, map, f"{atlas}/{ordinal}", model, tokenizer, max_texts=texts)
