"""Steering faithfulness (docs/design.md §8), and the choice of subject layer and strength on held-out prompts.

Faithfulness: over (concept, prompt) trials, the share whose continuation has the target concept
as its strict plurality concept. Reported for no steering (the chance floor), the direction
transferred from the atlas through the inverse map, and the subject's own (native) direction,
the ceiling; the perplexity of the continuations under the unsteered subject is the fluency
guard. Prompts about another topic are the harder case and are reported beside.

Why the site is chosen on held-out prompts: the best cell of a grid measured on the evaluation
prompts is an optimistic figure. `shortlist` keeps the maps with the best held-out fit (mean
cosine, then R², of the forward map), `choose_site` sweeps strengths on prompts that are not evaluation prompts,
and keeps the most faithful cell whose perplexity stays within ``max_ppl_ratio`` × unsteered;
the evaluation then reports that cell on the evaluation prompts, and the full grid beside it.

Every trial of one cell runs in one batch: per-row directions (`SteeringEdit` with one row per
trial) give each (concept, prompt) its own edit in one `generate` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import BadValueError, ShapeError
from engine.steering.edits import SteeringEdit
from engine.steering.generate import (
    Generation,
    GenerationSettings,
    continuation_nll,
    continuation_nll_rows,
    eval_batch_rows,
    generate,
    special_token_ids,
)

Scorer = Callable[[str], "int | None"]  # text -> index of its plurality concept (None: no strict plurality)


@dataclass(frozen=True)
class SteeringGrid:
    """The steering cells an evaluation tries, and how it chooses among them: each of ``strengths`` ×
    ``modes`` × ``positions`` (× direction site or layer set), every continuation ``max_new_tokens``
    tokens long; a cell is chosen only while its perplexity stays within ``max_ppl_ratio`` × the
    unsteered one (`choose_site`)."""

    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    modes: tuple[str, ...] = ("add",)
    positions: tuple[str, ...] = ("all",)
    max_ppl_ratio: float = 2.0
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        for name in ("strengths", "modes", "positions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class FaithfulnessRow:
    """One cell: a direction kind at a layer and strength, on one prompt set."""

    direction: str  # "unsteered" | "transferred" | "native"
    prompts: str  # "neutral" | "other_topic" | "heldout"
    layer: int | None
    strength: float
    faithfulness: float
    perplexity: float
    n: int  # trials
    map: str | None = None  # the map a transferred direction went through
    method: str | None = None  # that map's method
    chosen: bool = False  # the cell chosen on held-out prompts for its direction kind (the headline)
    chosen_for_method: bool = False  # the cell chosen on held-out prompts among its map method's cells


@dataclass(frozen=True)
class DirectionSet:
    """One direction per concept at one subject layer: a candidate steering site.

    ``directions`` (K, d_subject), row k for concept k; ``norm`` the site's typical residual
    norm; ``fit`` the map's held-out fit metrics (used to shortlist sites)."""

    kind: str  # "transferred" | "native"
    layer: int
    directions: np.ndarray
    norm: float
    map: str | None = None
    method: str | None = None
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.kind, self.map, self.layer)


@dataclass
class SteeringReport:
    """Rows of the evaluation, the chosen sites and a few human-readable summary lines."""

    rows: list[FaithfulnessRow]
    chosen: dict[str, Any]
    calibration: list[FaithfulnessRow] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trials:
    """(prompt, target concept) pairs; ``target`` indexes the rows of a direction matrix."""

    prompts: list[str]
    targets: list[int]

    @classmethod
    def every_concept(cls, prompts: Sequence[str], n_concepts: int) -> Trials:
        """Each prompt steered towards each concept (the neutral-prompt trials)."""
        return cls([p for _ in range(n_concepts) for p in prompts], [k for k in range(n_concepts) for _ in prompts])

    @classmethod
    def towards_others(cls, prompts: Sequence[tuple[str, int]], n_concepts: int, per_prompt: int = 2) -> Trials:
        """Each prompt about concept j steered towards ``per_prompt`` other concepts (j+1, j+2, ...
        shifted by the prompt's position so every concept is a target about equally often)."""
        ps, ts = [], []
        for i, (text, j) in enumerate(prompts):
            for r in range(per_prompt):
                ps.append(text)
                ts.append((j + 1 + (i + r) % (n_concepts - 1)) % n_concepts)
        return cls(ps, ts)


def _faithful(texts: Sequence[str], targets: Sequence[int], scorer: Scorer) -> float:
    return float(np.mean([scorer(t) == k for t, k in zip(texts, targets)])) if texts else float("nan")


def _ppl(nll: float, n: int) -> float:
    return float(np.exp(nll / n)) if n else float("nan")


def run_cell(
    model: Any, tokenizer: Any, trials: Trials, scorer: Scorer, site: DirectionSet | None, strength: float = 0.0, *,
    mode: str = "add", max_new_tokens: int = 20, prompts_name: str = "neutral",
) -> FaithfulnessRow:
    """Generate every trial (greedy, special tokens blocked) under its concept's edit and score it.

    ``site`` None is the unsteered floor: each distinct prompt is generated once and scored
    against every target."""
    if site is not None:
        return run_cells(model, tokenizer, trials, scorer, site, [strength], mode=mode, max_new_tokens=max_new_tokens,
                         prompts_name=prompts_name)[0]
    batch = eval_batch_rows(model)
    uniq = list(dict.fromkeys(trials.prompts))
    gens = generate(model, tokenizer, uniq, (), settings=GenerationSettings(max_new_tokens),
                    blocked=special_token_ids(tokenizer), batch_size=batch)
    by_prompt = {g.prompt: g for g in gens}
    texts = [by_prompt[p].text for p in trials.prompts]
    nll, n = continuation_nll(model, tokenizer, uniq, [g.token_ids for g in gens], batch_size=batch)
    return FaithfulnessRow("unsteered", prompts_name, None, 0.0, _faithful(texts, trials.targets, scorer),
                           _ppl(nll, n), len(trials.prompts))


@dataclass
class StrengthRuns:
    """Every trial generated at each of several strengths in shared batches (`steer_at_strengths`):
    ``gens`` strength by strength (``m`` trials each), each continuation's NLL after its prompt and
    its token count; `part` picks one strength's rows."""

    strengths: list[float]
    m: int
    gens: list[Generation]
    nll: np.ndarray
    n: np.ndarray
    batch: int

    def part(self, j: int) -> slice:
        return slice(j * self.m, (j + 1) * self.m)

    def perplexity(self, j: int) -> float:
        part = self.part(j)
        return _ppl(float(self.nll[part].sum()), int(self.n[part].sum()))


def steer_at_strengths(model: Any, tokenizer: Any, trials: Trials, sites: Sequence[DirectionSet],
                       strengths: Sequence[float], *, mode: str = "add", positions: str = "all",
                       max_new_tokens: int = 20) -> StrengthRuns:
    """Generate every trial at each of ``strengths`` with one edit per site (each trial's edit is its
    target concept's row), all strengths in shared batches: one per-row edit per site, one strength
    per row. Batching changes how many rows run at once, not what each row computes."""
    m, strengths = len(trials.prompts), [float(s) for s in strengths]
    prompts = list(trials.prompts) * len(strengths)
    per_row = np.repeat(np.asarray(strengths), m)
    edits = [SteeringEdit(s.layer, np.tile(np.asarray(s.directions)[trials.targets], (len(strengths), 1)), per_row,
                          s.norm, mode, s.kind) for s in sites]  # one (m x strengths, d) edit per site
    batch = eval_batch_rows(model)
    gens = generate(model, tokenizer, prompts, edits, positions=positions,  # type: ignore[arg-type]
                    settings=GenerationSettings(max_new_tokens), blocked=special_token_ids(tokenizer),
                    batch_size=batch)
    nll, n = continuation_nll_rows(model, tokenizer, prompts, [g.token_ids for g in gens], batch_size=batch)
    return StrengthRuns(strengths, m, gens, nll, n, batch)


def run_cells(
    model: Any, tokenizer: Any, trials: Trials, scorer: Scorer, site: DirectionSet, strengths: Sequence[float], *,
    mode: str = "add", max_new_tokens: int = 20, prompts_name: str = "neutral",
) -> list[FaithfulnessRow]:
    """`run_cell` at each of ``strengths`` (`steer_at_strengths`: shared batches), one row per
    strength in order; a strength's row is `run_cell`'s at that strength."""
    runs = steer_at_strengths(model, tokenizer, trials, [site], strengths, mode=mode, max_new_tokens=max_new_tokens)
    return [FaithfulnessRow(site.kind, prompts_name, site.layer, strength,
                            _faithful([g.text for g in runs.gens[runs.part(j)]], trials.targets, scorer),
                            runs.perplexity(j), runs.m, map=site.map, method=site.method)
            for j, strength in enumerate(runs.strengths)]


def shortlist(sites: Sequence[DirectionSet], n: int = 2) -> list[DirectionSet]:
    """The ``n`` sites whose maps fit best on held-out pairs: centred mean cosine between mapped
    and true atlas activations, then forward R² (ties: the deeper layer).

    The forward fit says how much of the atlas site a subject layer carries linearly, which is
    what a concept direction sent back through the map needs. The inverse fit is no guide: on
    ConceptWorld it is highest at the lowest layers, whose residuals are mostly the current
    token (which the atlas site also determines), and those layers steer worst.
    """
    def key(site: DirectionSet) -> tuple[float, float, int]:
        m = site.fit
        cos = m.get("heldout_cosine_centred", m.get("heldout_cosine"))
        r2 = m.get("heldout_r2")
        return (-(cos if cos is not None else -np.inf), -(r2 if r2 is not None else -np.inf), -site.layer)

    return sorted(sites, key=key)[:n]


def choose_site(cells: Sequence[FaithfulnessRow], unsteered_ppl: float, max_ppl_ratio: float = 2.0) -> FaithfulnessRow:
    """The most faithful held-out cell within the fluency bound (ties: the weaker strength).

    When no cell keeps perplexity within bounds, the most fluent one is returned."""
    if not cells:
        raise ShapeError("no cells to choose a steering site from")
    ok = [c for c in cells if c.perplexity <= max_ppl_ratio * unsteered_ppl]
    if not ok:
        return min(cells, key=lambda c: c.perplexity)
    return max(ok, key=lambda c: (round(c.faithfulness, 6), -abs(c.strength), -c.perplexity))


def evaluate_steering(
    model: Any, tokenizer: Any, scorer: Scorer, sites: Sequence[DirectionSet], *,
    neutral_prompts: Sequence[str], heldout_prompts: Sequence[str],
    other_topic_prompts: Sequence[tuple[str, int]] = (), grid: SteeringGrid = SteeringGrid(),
    n_shortlist: int = 2, quiet: bool = False,
) -> SteeringReport:
    """Faithfulness of no steering and of every candidate site (transferred and native) × strength
    of ``grid`` (one mode, every position edited).

    A site and strength are chosen on ``heldout_prompts`` for each map method (among its
    `shortlist`) and for the native directions (among every layer); the headline of each kind
    is the most faithful of those choices on the held-out prompts. The neutral-prompt grid of
    all sites is evaluated beside, and the other-topic prompts at each chosen cell.
    """
    from engine.progress import progress

    if len(grid.modes) != 1 or grid.positions != ("all",):
        raise BadValueError(f"a steering evaluation runs one mode on all positions; got modes {list(grid.modes)}, "
                            f"positions {list(grid.positions)}")
    (mode,), strengths = grid.modes, grid.strengths
    max_ppl_ratio, max_new_tokens = grid.max_ppl_ratio, grid.max_new_tokens
    overlap = set(neutral_prompts) & set(heldout_prompts)
    if overlap:
        raise ValueError(f"held-out prompts must not be evaluation prompts; both have {sorted(overlap)[:3]}")
    kinds = {kind: [s for s in sites if s.kind == kind] for kind in ("transferred", "native")}
    missing = [k for k, v in kinds.items() if not v]
    if missing:
        raise ShapeError(f"no {' or '.join(missing)} directions to evaluate")
    n_concepts = {len(s.directions) for s in sites}
    if len(n_concepts) != 1:
        raise ShapeError(f"every direction set needs one row per concept; got {sorted(n_concepts)} rows")
    k = n_concepts.pop()
    # One group per map method (each with its shortlist) and one of native directions.
    groups: dict[tuple[str, str | None], list[DirectionSet]] = {}
    for method in sorted({s.method or "" for s in kinds["transferred"]}):
        groups[("transferred", method or None)] = shortlist(
            [s for s in kinds["transferred"] if (s.method or "") == method], n_shortlist)
    groups[("native", None)] = kinds["native"]
    heldout = Trials.every_concept(heldout_prompts, k)
    neutral = Trials.every_concept(neutral_prompts, k)
    other = Trials.towards_others(other_topic_prompts, k) if other_topic_prompts else None
    n_cells = (2 + sum(len(v) for v in groups.values()) * len(strengths) + len(sites) * len(strengths)
               + ((1 + len(groups)) if other else 0))
    bar = progress(total=n_cells, desc="steering eval", unit="cell", quiet=quiet)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, mode=mode)

    def floor(trials: Trials, name: str) -> FaithfulnessRow:
        row = run_cell(model, tokenizer, trials, scorer, None, prompts_name=name, **kw)
        bar.update(1)
        return row

    def cells_at(trials: Trials, site: DirectionSet, ss: Sequence[float], name: str) -> list[FaithfulnessRow]:
        out = run_cells(model, tokenizer, trials, scorer, site, ss, prompts_name=name, **kw)
        bar.update(len(ss))
        return out

    try:
        base_heldout = floor(heldout, "heldout")
        calibration = [base_heldout]
        picks: dict[tuple[str, str | None], tuple[DirectionSet, FaithfulnessRow]] = {}
        for group, cands in groups.items():
            cells = [(site, c) for site in cands for c in cells_at(heldout, site, strengths, "heldout")]
            calibration += [c for _, c in cells]
            best = choose_site([c for _, c in cells], base_heldout.perplexity, max_ppl_ratio)
            picks[group] = next((site, c) for site, c in cells if c is best)
        headline = {kind: choose_site([c for (g, _), (_, c) in picks.items() if g == kind], base_heldout.perplexity,
                                      max_ppl_ratio) for kind in kinds}

        def mark(row: FaithfulnessRow, site: DirectionSet) -> FaithfulnessRow:
            p_site, p_row = picks[(site.kind, site.method if site.kind == "transferred" else None)]
            mine = site.key == p_site.key and row.strength == p_row.strength
            return dataclasses.replace(row, chosen_for_method=mine, chosen=mine and p_row is headline[site.kind])

        rows = [floor(neutral, "neutral")]
        for site in sorted(sites, key=lambda x: (x.kind != "transferred", x.method or "", x.layer)):
            rows += [mark(c, site) for c in cells_at(neutral, site, strengths, "neutral")]
        if other is not None:
            rows.append(floor(other, "other_topic"))
            rows += [mark(cells_at(other, p_site, [p_row.strength], "other_topic")[0], p_site)
                     for p_site, p_row in picks.values()]
    finally:
        bar.close()
    (t_site, t_row), (n_site, n_row) = (next(picks[g] for g in picks if picks[g][1] is headline[kind])
                                        for kind in ("transferred", "native"))
    return SteeringReport(
        rows=rows,
        chosen={"map": t_site.map, "method": t_site.method, "layer": t_site.layer, "strength": t_row.strength,
                "heldout_faithfulness": t_row.faithfulness, "heldout_perplexity": t_row.perplexity,
                "native_layer": n_site.layer, "native_strength": n_row.strength,
                "native_heldout_faithfulness": n_row.faithfulness,
                "heldout_unsteered_perplexity": base_heldout.perplexity,
                "by_method": {g[1]: {"map": site.map, "layer": site.layer, "strength": row.strength,
                                     "heldout_faithfulness": row.faithfulness,
                                     "shortlist": [x.map for x in groups[g]]}
                              for g, (site, row) in picks.items() if g[0] == "transferred"}},
        calibration=calibration,
        summary=_summary(rows, max_ppl_ratio),
        settings={"strengths": list(strengths), "max_new_tokens": max_new_tokens, "mode": mode,
                  "max_ppl_ratio": max_ppl_ratio, "n_concepts": k, "n_neutral_prompts": len(neutral_prompts),
                  "n_heldout_prompts": len(heldout_prompts), "n_other_topic_prompts": len(other_topic_prompts),
                  "n_shortlist": n_shortlist},
    )


def _summary(rows: Sequence[FaithfulnessRow], max_ppl_ratio: float = 2.0) -> list[str]:
    """Headline lines: the cells chosen on held-out prompts (per map method) against the
    unsteered floor, and the best grid cells (chosen on the evaluation prompts: optimistic)."""
    out = []
    for name in ("neutral", "other_topic"):
        sel = [r for r in rows if r.prompts == name]
        if not sel:
            continue
        base = next(r for r in sel if r.direction == "unsteered")
        parts = [f"unsteered {base.faithfulness:.3f} (ppl {base.perplexity:.2f})"]
        for c in (r for r in sel if r.chosen_for_method):
            kind = f"{c.direction} ({c.method})" if c.method else c.direction
            star = " [headline]" if c.chosen else ""
            parts.append(f"{kind}{star} {c.faithfulness:.3f} at layer {c.layer}, strength {c.strength:g} "
                         f"(ppl {c.perplexity:.2f})")
        out.append(f"{name} prompts, cells chosen on held-out prompts: " + "; ".join(parts))
        if name != "neutral":
            continue
        for kind in ("transferred", "native"):
            best = max((r for r in sel if r.direction == kind and r.perplexity <= max_ppl_ratio * base.perplexity),
                       key=lambda r: r.faithfulness, default=None)
            if best is not None:
                via = f" via {best.map}" if best.map else ""
                out.append(f"{name} prompts, best {kind} cell of the grid within {max_ppl_ratio:g}x perplexity "
                           f"(chosen on evaluation prompts: optimistic): {best.faithfulness:.3f} at layer "
                           f"{best.layer}, strength {best.strength:g}{via}")
    return out
