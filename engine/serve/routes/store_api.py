"""The store's lists and browse pages: version and counts, atlases (a page of an atlas's concepts),
alignment maps (one map's page), registered models (one model's page)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from engine import __version__
from engine.serve.deps import MAX_ORDINAL, Name, StoreDep
from engine.util import to_plain

router = APIRouter(tags=["store"])


@router.get("/api/info", summary="Version, store folder, what is installed")
def info(store: StoreDep) -> dict[str, Any]:
    from engine.atlas.explore import default_map
    from engine.atlas.lookup import semantic_available

    return {"version": __version__, "store": str(store.path), "semantic": semantic_available(),
            "atlases": len(store.atlases()), "maps": len(store.maps()), "runs": len(store.runs()),
            "default_map": default_map(store)}


@router.get("/api/atlases", summary="Atlases (`atlas atlases`)")
def atlases(store: StoreDep) -> list[dict[str, Any]]:
    return [to_plain(a) | {"site": a.site} for a in store.atlases()]


@router.get("/api/maps", summary="Alignment maps (`atlas maps`)")
def maps(store: StoreDep) -> list[dict[str, Any]]:
    return to_plain(store.maps())


@router.get("/api/atlases/{atlas}", summary="One atlas")
def atlas(store: StoreDep, atlas: Name) -> dict[str, Any]:
    a = store.atlas(atlas)
    return to_plain(a) | {"site": a.site, "maps": [m.name for m in store.maps() if m.atlas == atlas]}


@router.get("/api/atlases/{atlas}/concepts", summary="A page of an atlas's concepts, filtered by words and labelling")
def atlas_concepts(store: StoreDep, atlas: Name,
                   q: Annotated[str, Query(max_length=200, description="Words every listed label or description has.")] = "",
                   labelled: Annotated[bool | None, Query(description="Only labelled (true) or unlabelled (false).")] = None,
                   offset: Annotated[int, Query(ge=0, le=MAX_ORDINAL)] = 0,
                   limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    from engine.atlas.explore import concept_list

    return to_plain(concept_list(store, atlas, query=q, labelled=labelled, offset=offset, limit=limit))


@router.get("/api/maps/{name}", summary="A map: its fit, sites, the runs through it (`atlas maps`)")
def map_page(store: StoreDep, name: Name) -> dict[str, Any]:
    from engine.atlas.explore import map_page as page

    return to_plain(page(store, name))


@router.get("/api/models", summary="Registered models")
def models(store: StoreDep) -> list[dict[str, Any]]:
    return to_plain(store.models())


@router.get("/api/models/{name}", summary="A registered model: its record, the maps from it, the atlases of its sites")
def model_page(store: StoreDep, name: Name) -> dict[str, Any]:
    from engine.atlas.explore import model_page as page

    return to_plain(page(store, name))
