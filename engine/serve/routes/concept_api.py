"""Concepts: text lookup (the search page), one concept, its neighbours, the subject features
labelled with it and its top contexts (the concept page)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from engine.serve.deps import MAX_CONTEXTS, MAX_K, MAX_PAGE, Name, Ordinal, StoreDep, encodable
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
    sites = {a.name: a.site for a in store.atlases()} if hits else {}
    return {"query": q, "hits": [to_plain(h) | {"site": sites.get(h.atlas)} for h in hits]}


@router.get("/api/concepts/{atlas}/{ordinal}", summary="A concept and its provenance (`atlas show`)")
def concept(store: StoreDep, atlas: Name, ordinal: Ordinal) -> dict[str, Any]:
    c = store.concept(ordinal, atlas)
    a = store.atlas(atlas)
    return {"concept": to_plain(c) | {"ref": c.ref},
            "provenance": {"atlas": a.name, "model": a.model, "layer": a.layer, "hook": a.hook, "site": a.site,
                           "source_kind": c.source_kind or a.source_kind,
                           "source_file": c.source_ref or a.source_ref, "revision": a.revision,
                           "has_encoder": a.has_encoder, "dim": a.dim, "n_concepts": a.n_concepts}}


@router.get("/api/concepts/{atlas}/{ordinal}/neighbors", summary="Nearest concepts by direction (`atlas neighbors`)")
def neighbors(store: StoreDep, atlas: Name, ordinal: Ordinal,
              k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> list[dict[str, Any]]:
    return to_plain(store.neighbors(ordinal, k=k, atlas=atlas))


@router.get("/api/concepts/{atlas}/{ordinal}/features",
            summary="Subject features labelled with the concept, per map into its atlas (from labelling runs)")
def concept_features(store: StoreDep, atlas: Name, ordinal: Ordinal,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> list[dict[str, Any]]:
    store.concept(ordinal, atlas)  # 404 for an unknown concept
    rows = store.concept_labels(atlas, ordinal, limit=limit)
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
    store.concept(ordinal, atlas)  # 404 for an unknown concept
    return [{"source": run.source, "atlas": run.atlas, "map": run.map, "model": run.model,
             "layer": run.params.get("layer"), "hook": run.params.get("hook"), "corpus": run.corpus,
             "scoring": run.scoring, "status": run.status, "n_done": run.n_done, "n_texts": run.n_texts,
             "top": run.top, "contexts": [to_plain(c) | {"token": c.token} for c in found]}
            for run, found in store.concept_contexts(atlas, ordinal, limit=limit)]
