"""Steering against a topic: prompts that already have a topic, steered towards another one.

Real users steer text that has a subject. On ConceptWorld a prompt such as "this is about the
lion." is continued about animals by every model, and one edit at one layer, at the strengths
that steer topic-free prompts, leaves that continuation alone (faithfulness 0 on other-topic
prompts). This evaluation asks which way of editing gets through: the ``mode`` (``add`` a
multiple of the direction, or ``clamp`` its projection), how many layers are edited at once
(one, or every layer of the subject, each in units of its own typical residual norm), and which
``positions`` (``all``: the prompt's too, so its topic is overwritten where it is read; ``new``:
only generated tokens).

Why a validation split: the grid (direction kind x mode x positions x layer set x strength) is
large, and its best cell on the prompts it is scored on is an optimistic figure. Prompts are
split in two disjoint halves by text (`split_prompts`); for every (kind, mode, layers edited at
once, positions) the layer set and strength are chosen on the validation half as the most
faithful cell within ``max_ppl_ratio`` x the unsteered perplexity of the validation prompts
(`engine.steering.faithfulness.choose_site`), and reported on the test half against the test
half's own unsteered perplexity. The headline per kind is the chosen configuration that was best
on validation, again reported on test.

Why two fluency guards: the guard of `atlas eval steering` is the perplexity of the continuation
under the unsteered subject *after the prompt*. After a prompt about A, a continuation about B
is surprising to that model however fluent it is, so this guard also charges for the topic
change the edit is meant to make (measured on the tiny world: continuations that reach B sit at
30x the unsteered perplexity). Each cell also records ``perplexity_alone``, the same
continuation scored after the tokenizer's start token only, which charges for broken text but
not for leaving A. Choices are made, and reported, under each guard (``guard`` "prompt" or
"alone"), each against the unsteered continuations measured the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import BadValueError, ShapeError
from engine.steering.edits import POSITIONS, STEERING_MODES
from engine.steering.faithfulness import (
    DirectionSet,
    FaithfulnessRow,
    Scorer,
    SteeringGrid,
    Trials,
    _faithful,
    _ppl,
    choose_site,
    shortlist,
    steer_at_strengths,
)
from engine.steering.generate import (
    GenerationSettings,
    continuation_nll,
    continuation_nll_rows,
    eval_batch_rows,
    generate,
    special_token_ids,
)

# x each edited layer's typical residual norm; on tiny 2 always broke the text (perplexity > 1,000x)
DEFAULT_STRENGTHS: tuple[float, ...] = (0.125, 0.25, 0.35, 0.5, 0.7, 1.0)
DEFAULT_GRID = SteeringGrid(DEFAULT_STRENGTHS, ("add", "clamp"), POSITIONS)
GUARDS: tuple[str, ...] = ("prompt", "alone")
GUARD_NAMES = {"prompt": "of the continuation after its prompt", "alone": "of the continuation on its own"}


@dataclass(frozen=True)
class AgainstTopicRow:
    """One cell: a direction kind edited with one mode, at a set of layers and positions, on one split."""

    direction: str  # "unsteered" | "transferred" | "native"
    split: str  # "validation" | "test"
    mode: str | None  # "add" | "clamp" (None: unsteered)
    positions: str | None  # "all" | "new"
    layers: tuple[int, ...]  # edited layers, one edit each (empty: unsteered)
    strength: float
    faithfulness: float  # share of (prompt about A, target B) trials continued about B
    perplexity: float  # of the continuations after their prompts, under the unsteered subject
    perplexity_alone: float  # of the continuations on their own (after the start token), same model
    n: int  # trials
    maps: tuple[str, ...] = ()  # the map each transferred layer's direction went through
    chosen: bool = False  # chosen on validation for its (direction, mode, layers edited at once, positions, guard)
    headline: bool = False  # the best chosen configuration of its direction kind and guard on validation
    guard: str | None = None  # the fluency guard it was chosen under: "prompt" or "alone" (chosen rows)
    prompts: str = "against_topic"  # the prompt set (beside the neutral and other-topic rows of the report)

    @property
    def n_layers(self) -> int:
        """Layers edited at once."""
        return len(self.layers)


@dataclass
class AgainstTopicReport:
    """Validation and test rows; ``chosen`` names each configuration's pick; ``summary`` lines."""

    rows: list[AgainstTopicRow]
    chosen: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self, split: str = "test") -> list[AgainstTopicRow]:
        """The rows of one split."""
        return [r for r in self.rows if r.split == split]


def check_options(modes: Sequence[str], positions: Sequence[str], strengths: Sequence[float]) -> None:
    """Raise `BadValueError` for an unknown mode or positions value, or a strength that is not a positive number."""
    for name, values, known in (("mode", modes, sorted(STEERING_MODES)), ("positions", positions, list(POSITIONS))):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise BadValueError(f"{name} must be some of {', '.join(known)}, got {', '.join(bad) or 'none'}")
    bad_s = [s for s in strengths if not (math.isfinite(s) and s > 0)]
    if bad_s or not strengths:
        raise BadValueError(f"strengths must be positive numbers, got {bad_s or 'none'}")


def split_prompts(prompts: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(validation, test): distinct prompt texts, alternating within each concept, so both halves
    cover every concept and no text is in both."""
    seen: set[str] = set()
    by_concept: dict[int, list[tuple[str, int]]] = {}
    for text, k in prompts:
        if text not in seen:
            seen.add(text)
            by_concept.setdefault(k, []).append((text, k))
    val: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for k in sorted(by_concept):
        for i, p in enumerate(by_concept[k]):
            (val if i % 2 == 0 else test).append(p)
    return val, test


def run_layers_cell(model: Any, tokenizer: Any, trials: Trials, scorer: Scorer, sites: Sequence[DirectionSet],
                    strength: float, *, mode: str = "add", positions: str = "all", max_new_tokens: int = 20,
                    split: str = "validation") -> AgainstTopicRow:
    """Generate every trial with one edit per site (one site per layer, all at once) and score it.

    Strength is in units of each layer's own typical residual norm; each trial's edit at every
    layer is its target concept's row of that layer's directions."""
    return run_layers_cells(model, tokenizer, trials, scorer, sites, [strength], mode=mode, positions=positions,
                            max_new_tokens=max_new_tokens, split=split)[0]


def run_layers_cells(model: Any, tokenizer: Any, trials: Trials, scorer: Scorer, sites: Sequence[DirectionSet],
                     strengths: Sequence[float], *, mode: str = "add", positions: str = "all",
                     max_new_tokens: int = 20, split: str = "validation") -> list[AgainstTopicRow]:
    """`run_layers_cell` at each of ``strengths`` (`steer_at_strengths`: shared batches), one row
    per strength, in order."""
    if len({s.layer for s in sites}) != len(sites) or not sites:
        raise ShapeError("give one direction set per edited layer")
    runs = steer_at_strengths(model, tokenizer, trials, sites, strengths, mode=mode, positions=positions,
                              max_new_tokens=max_new_tokens)
    alone = _alone_rows(model, tokenizer, [g.token_ids for g in runs.gens], runs.batch)
    out = []
    for j, strength in enumerate(runs.strengths):
        part = runs.part(j)
        out.append(AgainstTopicRow(
            sites[0].kind, split, mode, positions, tuple(s.layer for s in sites), strength,
            _faithful([g.text for g in runs.gens[part]], trials.targets, scorer), runs.perplexity(j),
            _ppl(float(alone[0][part].sum()), int(alone[1][part].sum())) if alone is not None else float("nan"),
            runs.m, maps=tuple(s.map for s in sites if s.map)))
    return out


def _alone_rows(model: Any, tokenizer: Any, continuations: Sequence[Sequence[int]],
                batch: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
    """Per continuation: NLL and tokens scored on its own, after the tokenizer's start token (the
    encoding of ""); None for a tokenizer that has none."""
    if not tokenizer("")["input_ids"]:
        return None
    return continuation_nll_rows(model, tokenizer, [""] * len(continuations), continuations, batch_size=batch)


def perplexity_alone(model: Any, tokenizer: Any, continuations: Sequence[Sequence[int]]) -> float:
    """Perplexity of token-id continuations on their own: after the tokenizer's start token (the
    encoding of ""), NaN for a tokenizer that has none."""
    alone = _alone_rows(model, tokenizer, continuations, eval_batch_rows(model))
    return float("nan") if alone is None else _ppl(float(alone[0].sum()), int(alone[1].sum()))


def _unsteered(model: Any, tokenizer: Any, trials: Trials, scorer: Scorer, max_new_tokens: int,
               split: str) -> AgainstTopicRow:
    """The floor: each distinct prompt continued once, unedited, and scored against each of its targets."""
    uniq = list(dict.fromkeys(trials.prompts))
    batch = eval_batch_rows(model)
    gens = generate(model, tokenizer, uniq, (), settings=GenerationSettings(max_new_tokens),
                    blocked=special_token_ids(tokenizer), batch_size=batch)
    by_prompt = {g.prompt: g for g in gens}
    nll, n = continuation_nll(model, tokenizer, uniq, [g.token_ids for g in gens], batch_size=batch)
    return AgainstTopicRow("unsteered", split, None, None, (), 0.0,
                           _faithful([by_prompt[p].text for p in trials.prompts], trials.targets, scorer),
                           _ppl(nll, n), perplexity_alone(model, tokenizer, [g.token_ids for g in gens]),
                           len(trials.prompts))


def per_layer_sites(sites: Sequence[DirectionSet]) -> dict[str, dict[int, DirectionSet]]:
    """One direction set per (kind, layer): native as given; transferred through the map that
    fits best on held-out pairs at that layer (`shortlist`'s forward-fit order, no evaluation)."""
    out: dict[str, dict[int, DirectionSet]] = {"transferred": {}, "native": {}}
    for kind in out:
        for layer in sorted({s.layer for s in sites if s.kind == kind}):
            out[kind][layer] = shortlist([s for s in sites if s.kind == kind and s.layer == layer], 1)[0]
    return out


def default_layer_sets(layers: Sequence[int]) -> list[tuple[int, ...]]:
    """Each layer alone, and every layer at once."""
    layers = sorted(layers)
    return [(v,) for v in layers] + ([tuple(layers)] if len(layers) > 1 else [])


def evaluate_against_topic(
    model: Any, tokenizer: Any, scorer: Scorer, sites: Sequence[DirectionSet], prompts: Sequence[tuple[str, int]], *,
    n_concepts: int, grid: SteeringGrid = DEFAULT_GRID, layer_sets: Sequence[Sequence[int]] | None = None,
    per_prompt: int = 2, quiet: bool = False,
) -> AgainstTopicReport:
    """Faithfulness of steering prompts about concept A towards other concepts (docs above).

    ``sites``: transferred and native direction sets (one row per concept) at the subject's
    layers; ``prompts``: (text, its concept) pairs, split into validation and test here. Each
    prompt is steered towards ``per_prompt`` other concepts (`Trials.towards_others`).
    """
    from engine.progress import progress

    strengths, modes, positions = grid.strengths, grid.modes, grid.positions
    max_ppl_ratio, max_new_tokens = grid.max_ppl_ratio, grid.max_new_tokens
    check_options(modes, positions, strengths)
    val_prompts, test_prompts = split_prompts(prompts)
    if not val_prompts or not test_prompts:
        raise ShapeError("need at least two distinct prompts with a topic (one for validation, one for test)")
    by_kind = per_layer_sites(sites)
    missing = [k for k, v in by_kind.items() if not v]
    if missing:
        raise ShapeError(f"no {' or '.join(missing)} directions to evaluate")
    val = Trials.towards_others(val_prompts, n_concepts, per_prompt)
    test = Trials.towards_others(test_prompts, n_concepts, per_prompt)
    sets = {kind: [tuple(s) for s in (layer_sets or default_layer_sets(list(v)))] for kind, v in by_kind.items()}
    for kind, ss in sets.items():
        unknown = sorted({v for s in ss for v in s} - set(by_kind[kind]))
        if unknown:
            raise ShapeError(f"no {kind} directions at layers {unknown}")
    n_val = sum(len(ss) for ss in sets.values()) * len(modes) * len(positions) * len(strengths)
    n_configs = len(by_kind) * len(modes) * len(positions) * 2 * len(GUARDS)
    bar = progress(total=2 + n_val + n_configs, desc="steering against a topic", unit="cell", quiet=quiet)
    rows: list[AgainstTopicRow] = []
    picks: dict[tuple[str, str, str, str, str], AgainstTopicRow] = {}  # (kind, mode, positions, "1"|"several", guard)
    try:
        base_val = _unsteered(model, tokenizer, val, scorer, max_new_tokens, "validation")
        base_test = _unsteered(model, tokenizer, test, scorer, max_new_tokens, "test")
        bar.update(2)
        rows += [base_val, base_test]
        for kind, ss in sets.items():
            for mode in modes:
                for pos in positions:
                    cells: list[AgainstTopicRow] = []
                    for layers in ss:
                        cells += run_layers_cells(model, tokenizer, val, scorer, [by_kind[kind][v] for v in layers],
                                                  strengths, mode=mode, positions=pos, max_new_tokens=max_new_tokens)
                        bar.update(len(strengths))
                    rows += cells
                    for many in ("1", "several"):
                        group = [c for c in cells if (c.n_layers > 1) == (many == "several")]
                        for guard in GUARDS:
                            if group:
                                picks[(kind, mode, pos, many, guard)] = _choose(group, base_val, guard, max_ppl_ratio)
        headline = {(kind, guard): _choose([c for key, c in picks.items() if key[0] == kind and key[4] == guard],
                                           base_val, guard, max_ppl_ratio) for kind in by_kind for guard in GUARDS}
        chosen: dict[str, Any] = {}
        measured: dict[tuple[str, tuple[int, ...], float, str, str], AgainstTopicRow] = {}
        for key, pick in picks.items():
            kind, guard = key[0], key[4]
            cell_key = (kind, pick.layers, pick.strength, pick.mode or "add", pick.positions or "all")
            if cell_key not in measured:  # the same cell chosen under both guards runs once
                measured[cell_key] = run_layers_cell(
                    model, tokenizer, test, scorer, [by_kind[kind][v] for v in pick.layers], pick.strength,
                    mode=cell_key[3], positions=cell_key[4], max_new_tokens=max_new_tokens, split="test")
            bar.update(1)
            r = measured[cell_key]
            is_head = pick is headline[(kind, guard)]
            rows.append(dataclasses.replace(r, chosen=True, headline=is_head, guard=guard))
            chosen["/".join(key)] = {"layers": list(pick.layers), "strength": pick.strength,
                                     "validation_faithfulness": pick.faithfulness,
                                     "validation_perplexity": pick.perplexity,
                                     "validation_perplexity_alone": pick.perplexity_alone,
                                     "test_faithfulness": r.faithfulness, "test_perplexity": r.perplexity,
                                     "test_perplexity_alone": r.perplexity_alone, "headline": is_head}
    finally:
        bar.close()
    report = AgainstTopicReport(
        rows=rows, chosen=chosen,
        settings={"strengths": list(strengths), "modes": list(modes), "positions": list(positions),
                  "layer_sets": {k: [list(s) for s in v] for k, v in sets.items()}, "max_ppl_ratio": max_ppl_ratio,
                  "max_new_tokens": max_new_tokens, "per_prompt": per_prompt, "n_concepts": n_concepts,
                  "n_validation_prompts": len(val_prompts), "n_test_prompts": len(test_prompts),
                  "validation_unsteered_perplexity": base_val.perplexity,
                  "test_unsteered_perplexity": base_test.perplexity},
    )
    report.summary = _summary(report, max_ppl_ratio)
    return report


def guard_perplexity(row: AgainstTopicRow, guard: str) -> float:
    """The perplexity a guard reads: after the prompt ("prompt") or on its own ("alone")."""
    if guard not in GUARDS:
        raise ShapeError(f"guard must be one of {GUARDS}, got {guard!r}")
    return row.perplexity if guard == "prompt" else row.perplexity_alone


def _choose(cells: Sequence[AgainstTopicRow], unsteered: AgainstTopicRow, guard: str,
            max_ppl_ratio: float) -> AgainstTopicRow:
    """`choose_site`'s rule (most faithful within ``max_ppl_ratio`` x the unsteered perplexity
    under ``guard``, ties: the weaker strength); when none is fluent enough, the most fluent."""
    as_rows = [FaithfulnessRow(c.direction, c.split, None, c.strength, c.faithfulness, guard_perplexity(c, guard), c.n)
               for c in cells]
    best = choose_site(as_rows, guard_perplexity(unsteered, guard), max_ppl_ratio)
    return cells[next(i for i, r in enumerate(as_rows) if r is best)]


def _summary(report: AgainstTopicReport, max_ppl_ratio: float) -> list[str]:
    test = report.table("test")
    base = next(r for r in test if r.direction == "unsteered")
    out = []
    for guard in GUARDS:
        b = guard_perplexity(base, guard)
        parts = [f"unsteered {base.faithfulness:.3f} (ppl {b:.2f})"]
        for r in (r for r in test if r.headline and r.guard == guard):
            p = guard_perplexity(r, guard)
            ok = "within" if p <= max_ppl_ratio * b else "OVER"
            parts.append(f"{r.direction} {r.faithfulness:.3f} ({r.mode}, layers {','.join(map(str, r.layers))}, "
                         f"positions {r.positions}, strength {r.strength:g}; ppl {p:.2f}, {ok} {max_ppl_ratio:g}x)")
        out.append(f"against-topic prompts, test half, chosen on the validation half under the {guard!r} guard "
                   f"(perplexity {GUARD_NAMES[guard]}): " + "; ".join(parts))
    return out
