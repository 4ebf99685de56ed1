"""Steering plans: which concepts, how strong, where, how — resolved through alignment maps.

A `SteeringPlan` is plain data (saved and reloaded as JSON): concepts given by id
(``<atlas>/<ordinal>``), by label, or by a free-text query resolved with `engine.atlas.lookup`;
strengths in units of the subject site's typical residual norm; one or several subject layers;
mode ``add`` or ``clamp``; positions ``all`` or ``new``; and generation settings. `resolve_plan`
turns it into `SteeringEdit`s: each concept's atlas direction goes through the inverse map of the
layer (linear part, re-normalised) and is scaled by the norm stored with that map.

Why a plan names one map but may steer several layers: a map is fitted at one subject layer, so
each further layer uses the map the store holds for the same subject model and atlas at that
layer; a layer without one is an error rather than a direction applied where it was not fitted.

Why ``combine``: the paper found single directions brittle; the mean of a concept's unit atlas
direction and those of its K nearest atlas neighbours is a steadier direction for a theme that
several concepts share. The mean is taken in atlas space (the inverse map is linear, so this is
the mean of the mapped directions up to their norms) and re-normalised after mapping.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.align.map import AlignmentMap, load_map
from engine.errors import BadValueError, FormatError, NotFoundError, SiteMismatchError, SourceChangedError
from engine.steering.edits import POSITIONS, STEERING_MODES, Mode, Positions, SteeringEdit
from engine.steering.native import NativeSource, native_directions
from engine.store.store import Store, parse_concept_ref

Direction = Literal["transferred", "native"]
DIRECTIONS: tuple[str, ...] = ("transferred", "native")
PLAN_VERSION = 2



@dataclass
class PlanConcept:
    """One concept of a plan; ``strength`` None means the plan's strength."""

    query: str  # as given: "<atlas>/<ordinal>", a label, or free text
    strength: float | None = None
    ref: str | None = None  # the resolved concept id, filled by `resolve_plan` (a saved plan keeps it)

    def __post_init__(self) -> None:
        if not str(self.query).strip():
            raise BadValueError("concept query must be a non-empty string (an id, a label or free text)")


@dataclass
class SteeringPlan:
    """Concepts + strengths + subject layers + mode, and how to generate under them."""

    map: str
    concepts: list[PlanConcept]
    strength: float = 0.5  # × typical residual norm: best on ConceptWorld; 1 already hurts fluency there
    layers: list[int] | None = None  # None: the map's own subject layer
    mode: Mode = "add"
    positions: Positions = "all"
    combine: int = 0  # K nearest atlas neighbours averaged into each concept's direction
    direction: Direction = "transferred"  # "native": the subject's own direction (where known)
    max_new_tokens: int = 30
    seed: int = 0
    do_sample: bool = False  # greedy by default: steered and unsteered differ only by the edit
    temperature: float = 1.0
    block_special: bool = True  # never generate special tokens (the end-of-document token among them)
    # What the plan was resolved against (atlas vectors' and maps' checksums), filled by `resolve_plan`:
    # a saved plan refuses to run against a map or atlas that changed since.
    provenance: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.concepts = [c if isinstance(c, PlanConcept) else PlanConcept(**c) if isinstance(c, dict)
                         else PlanConcept(str(c)) for c in self.concepts]
        if not self.concepts:
            raise BadValueError("a steering plan needs at least one concept")
        if self.mode not in STEERING_MODES:
            raise BadValueError(f"mode must be one of {sorted(STEERING_MODES)}, got {self.mode!r}")
        if self.positions not in POSITIONS:
            raise BadValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.direction not in DIRECTIONS:
            raise BadValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.combine < 0:
            raise BadValueError(f"combine must be >= 0 (neighbours to average), got {self.combine}")
        if self.max_new_tokens < 1:
            raise BadValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise BadValueError(f"temperature must be > 0, got {self.temperature}")
        if self.layers is not None:
            self.layers = [int(v) for v in self.layers]
            if not self.layers:
                raise BadValueError("layers must name at least one layer (or be None for the map's layer)")
        if self.version not in (1, PLAN_VERSION):  # version 1 had no provenance
            raise FormatError(f"steering plan version {self.version} is not supported (this version reads 1 and "
                              f"{PLAN_VERSION})")
        self.version = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SteeringPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"unknown steering-plan fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise FormatError(f"bad steering plan: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> SteeringPlan:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"cannot read steering plan {path}: {e}") from None
        if not isinstance(d, dict):
            raise FormatError(f"steering plan {path} must be a JSON object")
        return cls.from_dict(d)


@dataclass(frozen=True)
class ResolvedConcept:
    """A plan concept as resolved: its atlas concept and the neighbours averaged in."""

    query: str
    ref: str
    label: str
    strength: float
    neighbours: list[str] = field(default_factory=list)


@dataclass
class ResolvedPlan:
    """A plan turned into edits on a subject model."""

    plan: SteeringPlan
    subject_model: str
    concepts: list[ResolvedConcept]
    layers: list[int]
    maps: dict[int, str]  # layer -> map name
    norms: dict[int, float]  # layer -> typical residual norm of the subject site
    edits: list[SteeringEdit]
    alignment: dict[int, Any] = field(default_factory=dict, repr=False)  # layer -> AlignmentMap


def resolve_concept(store: Store, atlas: str, query: str) -> tuple[str, str]:
    """``(ref, label)`` of the concept a query names in ``atlas``: an id, an exact label, or the
    best text-lookup hit."""
    from engine.atlas.lookup import lookup

    q = query.strip()
    _, sep, ordinal = q.rpartition("/")
    if ordinal.lstrip("-").isdigit() and (sep or q.lstrip("-").isdigit()):
        atlas_name, idx = parse_concept_ref(q, atlas)
        if atlas_name != atlas:
            raise SiteMismatchError(f"concept {q!r} is in atlas {atlas_name!r}, but the map maps into atlas {atlas!r}")
        c = store.concept(idx, atlas)
        return c.ref, c.label
    labels = store.labels(atlas)
    exact = [i for i, label in enumerate(labels) if label.lower() == q.lower()]
    if exact:
        return f"{atlas}/{exact[0]}", labels[exact[0]]
    hits = lookup(store, q, k=1, atlas=atlas)
    if not hits:
        raise NotFoundError(f"no concept of atlas {atlas!r} matches {q!r}; `atlas lookup {q!r}` shows what does")
    return hits[0].ref, hits[0].label


def layer_maps(store: Store, map_name: str, layers: Sequence[int] | None) -> dict[int, Any]:
    """The map to use at each requested subject layer (the named map for its own layer, the
    store's map of the same subject and atlas for the others)."""
    base = load_map(store, map_name)
    n_layers = store.get_model(base.subject_model).n_layers if layers and min(layers) < 0 else None
    if n_layers is None and layers and min(layers) < 0:
        raise SiteMismatchError(f"negative layers need the number of layers of {base.subject_model!r}, "
                                "which the store does not record; give layers from 0")
    wanted = [base.subject_layer] if layers is None else list(dict.fromkeys(
        v + n_layers if v < 0 and n_layers else v for v in layers))
    out: dict[int, Any] = {}
    siblings = None
    for layer in wanted:
        if layer == base.subject_layer:
            out[layer] = base
            continue
        if siblings is None:
            siblings = [m for m in store.maps() if m.subject_model == base.subject_model
                        and m.atlas == base.atlas and m.subject_hook == base.subject_hook]
        cands = [m for m in siblings if m.subject_layer == layer]
        if not cands:
            have = sorted({m.subject_layer for m in siblings})
            raise SiteMismatchError(
                f"no map of {base.subject_model!r} at layer {layer} into atlas {base.atlas!r} "
                f"(maps exist at layers {have}); fit one with `atlas align` at that layer"
            )
        cands.sort(key=lambda m: (m.method != base.method, m.pairing != base.pairing, m.name))
        out[layer] = load_map(store, cands[0].name)
    return out


def _concept_vector(store: Store, atlas: str, ref: str, combine: int) -> tuple[np.ndarray, list[str]]:
    """Unit atlas direction of ``ref`` (a row of ``atlas``), or the mean with its ``combine``
    nearest neighbours: only their rows' blocks of the vector file are read and checked."""
    from engine.util import unit_rows

    ordinal = int(ref.rsplit("/", 1)[1])
    neighbours = store.neighbors(ref, k=combine) if combine else []
    rows = [ordinal] + [h.ordinal for h in neighbours]
    v = unit_rows(store.atlas_rows(atlas, rows)).mean(0)  # (d_atlas,)
    return v, [h.ref for h in neighbours]


def plan_provenance(store: Store, maps: dict[int, AlignmentMap]) -> dict[str, Any]:
    """Checksums of what a plan resolves through: its atlas's vectors and each layer's map file."""
    atlas = next(iter(maps.values())).atlas
    return {
        "atlas": atlas, "atlas_vectors_sha256": store.atlas(atlas).vector_sha256,
        "maps": {str(layer): {"name": m.name, "sha256": store.map_info(str(m.name)).sha256}
                 for layer, m in sorted(maps.items())},
    }


def _check_provenance(store: Store, plan: SteeringPlan, maps: dict[int, AlignmentMap]) -> dict[str, Any]:
    """The plan's provenance now; a `SourceChangedError` where a saved plan's differs."""
    now = plan_provenance(store, maps)
    was = plan.provenance
    if was:
        fix = "save the plan again from its map (`atlas steer MAP --concept ... --save-plan FILE`)"
        if was.get("atlas_vectors_sha256") not in (None, now["atlas_vectors_sha256"]):
            raise SourceChangedError(f"atlas {now['atlas']!r} was re-imported since this plan was saved; {fix}")
        for layer, m in (was.get("maps") or {}).items():
            cur = now["maps"].get(layer)
            if cur is None or cur != m:
                raise SourceChangedError(
                    f"map {m.get('name')!r} at layer {layer} changed since this plan was saved (sha256 "
                    f"{str(m.get('sha256'))[:12]} -> {str((cur or {}).get('sha256'))[:12]}); {fix}")
    return now


def resolve_plan(store: Store, plan: SteeringPlan, native: NativeSource | None = None) -> ResolvedPlan:
    """Resolve concepts, pick a map per layer and build one `SteeringEdit` per concept and layer.

    ``native`` gives the subject's own direction of a concept label at a layer, for
    ``plan.direction == "native"``; by default a registered provider's (`engine.steering.native`:
    ConceptWorld knows them for its subjects; a real model has none).
    """
    maps = layer_maps(store, plan.map, plan.layers)
    base = next(iter(maps.values()))  # every map of the plan maps into the same atlas
    atlas = base.atlas
    plan.provenance = _check_provenance(store, plan, maps)
    concepts: list[ResolvedConcept] = []
    vectors: list[np.ndarray] = []
    for c in plan.concepts:
        ref, label = resolve_concept(store, atlas, c.ref or c.query)
        c.ref = ref  # a saved plan names the concept it steered, whatever the query matches later
        v, neigh = _concept_vector(store, atlas, ref, plan.combine)
        concepts.append(ResolvedConcept(c.query, ref, label,
                                        plan.strength if c.strength is None else float(c.strength), neigh))
        vectors.append(v)
    edits: list[SteeringEdit] = []
    norms: dict[int, float] = {}
    for layer, amap in maps.items():
        norm = amap.subject_resid_norm
        if not np.isfinite(norm) or norm <= 0:
            raise FormatError(f"map {amap.name!r} has no typical residual norm of its subject site; refit it")
        norms[layer] = norm
        for rc, v in zip(concepts, vectors):
            if plan.direction == "native":
                if native is None:
                    native = native_directions(store, amap.subject_model)
                u = native(rc.label, layer)
                if u is None:
                    raise NotFoundError(f"no native direction of {rc.label!r} at layer {layer} of {amap.subject_model!r}")
                u = np.asarray(u, dtype=np.float32)
                if u.shape != (amap.d_subject,):
                    raise SiteMismatchError(f"native direction of {rc.label!r} has shape {u.shape}, "
                                            f"the subject site has d={amap.d_subject}")
            else:
                u = amap.inverse_directions(v)  # (d_subject,), unit
            edits.append(SteeringEdit(layer, u, rc.strength, norm, plan.mode, rc.label))
    return ResolvedPlan(plan, base.subject_model, concepts, list(maps), {k: m.name for k, m in maps.items()},
                        norms, edits, maps)


# ----------------------------------------------------------------------------- running


@dataclass
class SteeringRun:
    """Steered and unsteered continuations side by side, with what produced them."""

    plan: dict[str, Any]
    subject_model: str
    concepts: list[ResolvedConcept]
    layers: list[int]
    maps: dict[int, str]
    norms: dict[int, float]
    outputs: list[Any]  # [SidePair]
    perplexity_unsteered: float
    perplexity_steered: float


def check_subject(resolved: ResolvedPlan, model: Any, model_name: str | None = None) -> None:
    """Raise `SiteMismatchError` when ``model`` is not the subject the plan's maps were fitted on."""
    from engine.models.hooks import resolve_layer
    from engine.models.loading import d_model_of

    d = d_model_of(model)
    for layer, amap in resolved.alignment.items():
        amap.check_site(model_name, layer, d)
        resolve_layer(model, layer)


def run_plan(store: Store, plan: SteeringPlan, prompts: Sequence[str], *, model: Any = None, tokenizer: Any = None,
             model_name: str | None = None, native: NativeSource | None = None, use_cache: bool = True,
             device: str = "cpu", dtype: str = "float32") -> SteeringRun:
    """Resolve ``plan`` and generate steered and unsteered continuations of ``prompts`` from the same seed.

    Without ``model`` the subject model is loaded from the store (its registered source), on
    ``device`` in ``dtype`` (`engine.models.devices`). A model
    passed in is checked against the maps' subject site (``model_name`` as the store names it,
    when known, and always its residual width).
    """
    from engine.models.loading import load_registered
    from engine.steering.generate import GenerationSettings, generate_pair, perplexity, special_token_ids

    resolved = resolve_plan(store, plan, native)
    if model is None:
        model, tokenizer = load_registered(store, resolved.subject_model, kind="causal", device=device,
                                           dtype=dtype)  # generation needs the LM head
        model_name = resolved.subject_model
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    check_subject(resolved, model, model_name)
    blocked = special_token_ids(tokenizer) if plan.block_special else None
    settings = GenerationSettings(plan.max_new_tokens, plan.seed, plan.do_sample, plan.temperature, use_cache)
    pairs = generate_pair(model, tokenizer, prompts, resolved.edits, positions=plan.positions, settings=settings,
                          blocked=blocked)
    ps = [p.prompt for p in pairs]
    return SteeringRun(
        plan=plan.to_dict(), subject_model=resolved.subject_model, concepts=resolved.concepts,
        layers=resolved.layers, maps=resolved.maps, norms=resolved.norms, outputs=pairs,
        perplexity_unsteered=perplexity(model, tokenizer, ps, [p.unsteered_ids for p in pairs]),
        perplexity_steered=perplexity(model, tokenizer, ps, [p.steered_ids for p in pairs]),
    )
