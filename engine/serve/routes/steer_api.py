"""Steering (the steer page): steered and unsteered continuations of a plan, with perplexities."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field, field_validator

from engine.serve.deps import MAX_PROMPT, ModelsDep, StoreDep, encodable
from engine.util import to_plain

STRENGTH_RANGE = 10.0  # |strength| in units of the site's typical residual norm; 1 already hurts fluency
PPL_GUARD = 2.0  # steered perplexity above this × unsteered is flagged (engine.steering.faithfulness's bound)

router = APIRouter(tags=["models"])


class SteerRequest(BaseModel):
    map: str = Field(min_length=1, max_length=200)
    concepts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=8, description="Concept ids (<atlas>/<ordinal>), labels or free text.")
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]] = Field(min_length=1, max_length=4)
    strength: float = Field(0.5, ge=-STRENGTH_RANGE, le=STRENGTH_RANGE,
                            description="× the subject site's typical residual norm (negative steers away).")
    layers: list[Annotated[int, Field(ge=-64, le=1024)]] | None = Field(None, max_length=8)
    mode: str = Field("add", min_length=1, max_length=40)
    positions: Literal["all", "new"] = "all"
    combine: int = Field(0, ge=0, le=20)
    max_new_tokens: int = Field(30, ge=1, le=100)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    direction: Literal["transferred", "native"] = "transferred"

    @field_validator("concepts", "prompts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for s in v:
            encodable(s)
            if not s.strip():
                raise ValueError("must not be blank")
        return v

    _check_map = field_validator("map")(encodable)


@router.post("/api/steer",
             summary="Steered and unsteered continuations from the same seed, with perplexities and the plan (`atlas steer`)")
def steer(store: StoreDep, models: ModelsDep, req: Annotated[SteerRequest, Body()]) -> dict[str, Any]:
    from engine.steering.plan import PlanConcept, SteeringPlan, run_plan

    fields = req.model_dump(exclude={"concepts", "prompts"})
    plan = SteeringPlan(concepts=[PlanConcept(c) for c in req.concepts], **fields)
    subject = store.map_info(plan.map).subject_model
    model, tokenizer, lock = models.get(subject, "causal")  # generation needs the LM head
    with lock:
        result = run_plan(store, plan, list(req.prompts), model=model, tokenizer=tokenizer, model_name=subject)
    out = to_plain(dataclasses.replace(result, outputs=[]))
    out["outputs"] = [{"prompt": p.prompt, "unsteered": p.unsteered, "steered": p.steered} for p in result.outputs]
    ratio = result.perplexity_steered / result.perplexity_unsteered if result.perplexity_unsteered > 0 else None
    out["perplexity_ratio"] = ratio
    out["fluency_ok"] = ratio is None or ratio <= PPL_GUARD
    out["fluency_bound"] = PPL_GUARD
    return out
