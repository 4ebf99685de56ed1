"""The store's lists: version and counts, atlases, alignment maps."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from engine import __version__
from engine.serve.deps import StoreDep
from engine.util import to_plain

router = APIRouter(tags=["store"])


@router.get("/api/info", summary="Version, store folder, what is installed")
def info(store: StoreDep) -> dict[str, Any]:
    from engine.atlas.lookup import semantic_available

    return {"version": __version__, "store": str(store.path), "semantic": semantic_available(),
            "atlases": len(store.atlases()), "maps": len(store.maps()), "runs": len(store.runs())}


@router.get("/api/atlases", summary="Atlases (`atlas atlases`)")
def atlases(store: StoreDep) -> list[dict[str, Any]]:
    return [to_plain(a) | {"site": a.site} for a in store.atlases()]


@router.get("/api/maps", summary="Alignment maps (`atlas maps`)")
def maps(store: StoreDep) -> list[dict[str, Any]]:
    return to_plain(store.maps())
