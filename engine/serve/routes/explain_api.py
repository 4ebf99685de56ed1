"""Explain (the explain page): per token of a text, the top atlas concepts through a map."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field, field_validator

from engine.serve.deps import MAX_K, MAX_TEXT, ModelsDep, StoreDep, encodable
from engine.util import to_plain

router = APIRouter(tags=["models"])


class ExplainRequest(BaseModel):
    map: str = Field(min_length=1, max_length=200, description="Map whose subject model reads the text.")
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    k: int = Field(5, ge=1, le=20, description="Concepts per token.")
    raw: bool = Field(False, description="Search the mapped activation as is (default: minus the atlas centre).")
    summary: int = Field(20, ge=0, le=MAX_K, description="Concepts in the text-level summary.")
    criterion: Literal["nn", "csls", "isf"] = Field(
        "nn", description="Ranking: nn (cosine), csls or isf (hub-corrected over the map's cached token statistic, "
                          "made once by `atlas explain --criterion csls --stat-corpus FILE`).")
    whiten: bool = Field(False, description="Whiten each mapped residual with the map's cached token statistic "
                                            "instead of centring it (not with raw).")

    _check_text = field_validator("text", "map")(encodable)


@router.post("/api/explain",
             summary="Per token: the top atlas concepts through a map; the text's concepts by max / mean (`atlas explain`)")
def explain(store: StoreDep, models: ModelsDep, req: Annotated[ExplainRequest, Body()]) -> dict[str, Any]:
    from engine.align.map import load_map
    from engine.search import Scoring, explain_summary
    from engine.search import explain as run_explain

    amap = load_map(store, req.map)
    model, tokenizer, lock = models.get(amap.subject_model)
    with lock:
        tokens = run_explain(store, amap, req.text, req.k, centre=not req.raw, model=model, tokenizer=tokenizer,
                             scoring=Scoring(req.criterion, req.whiten))
    return {"map": req.map, "subject_model": amap.subject_model, "atlas": amap.atlas, "criterion": req.criterion,
            "whiten": req.whiten,
            "tokens": to_plain(tokens),
            "summary": {"max": to_plain(explain_summary(tokens, "max")[: req.summary]),
                        "mean": to_plain(explain_summary(tokens, "mean")[: req.summary])}}
