"""Labelling runs: the list, one run, a page of its rows, its labels as a file (the runs page)."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any, Literal, cast

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from engine.serve.deps import MAX_ORDINAL, MAX_PAGE, Name, StoreDep
from engine.util import to_plain

router = APIRouter(tags=["runs"])


@router.get("/api/runs", summary="Labelling runs (`atlas runs`)")
def runs(store: StoreDep) -> list[dict[str, Any]]:
    return to_plain(store.runs())


@router.get("/api/runs/{name}", summary="One labelling run")
def run(store: StoreDep, name: Name) -> dict[str, Any]:
    return to_plain(store.run(name))


MinConfidence = Annotated[float | None, Query(ge=0.0, le=1.0, description=(
    "Labels whose confidence is below this show as 'no match' (their hits are kept)"))]


@router.get("/api/runs/{name}/rows",
            summary="One page of a run's features with their hits and confidence, sorted by feature, top score, "
                    "margin or confidence")
def run_rows(store: StoreDep, name: Name,
             order: Annotated[Literal["feature", "score", "margin", "confidence"], Query()] = "feature",
             desc: bool = False,
             offset: Annotated[int, Query(ge=0, le=MAX_ORDINAL)] = 0,
             limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
             min_confidence: MinConfidence = None) -> dict[str, Any]:
    from engine.labelling.export import apply_threshold, check_confidence_recorded, label_page

    r = store.run(name)
    check_confidence_recorded(r, min_confidence)
    page = apply_threshold(label_page(store, name, order, descending=desc, offset=offset, limit=limit), min_confidence)
    return {"run": to_plain(r), "total": r.n_done, "order": order, "desc": desc, "offset": offset, "limit": limit,
            "min_confidence": min_confidence,
            "rows": [{"feature": fl.feature, "margin": fl.margin, "confidence": fl.confidence, "label": fl.label,
                      "matched": fl.matched, "hits": to_plain(fl.hits)} for fl in page]}


@router.get("/api/runs/{name}/export", summary="A run's labels as a file (`atlas export`)",
            response_class=StreamingResponse)
def export(store: StoreDep, name: Name, format: Literal["jsonl", "csv", "neuronpedia"] = "jsonl",
           partial: bool = False, min_confidence: MinConfidence = None) -> StreamingResponse:
    from engine.labelling.export import export_run

    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    try:
        text = io.TextIOWrapper(cast(IO[bytes], spool), encoding="utf-8", newline="")
        export_run(store, name, text, format, partial=partial, min_confidence=min_confidence)
        text.flush()
        text.detach()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise

    def chunks() -> Iterator[bytes]:
        try:
            while block := spool.read(1 << 16):
                yield block
        finally:
            spool.close()

    filename = {"jsonl": f"{name}.jsonl", "csv": f"{name}.csv", "neuronpedia": f"{name}.neuronpedia.jsonl"}[format]
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(chunks(), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{filename.replace(chr(34), "_")}"'})
