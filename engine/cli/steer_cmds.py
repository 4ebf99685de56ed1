"""Steering command: `atlas steer` (steered and unsteered text side by side)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from engine.cli.common import (
    device_options,
    emit,
    json_option,
    layers_option,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    store_options,
)

if TYPE_CHECKING:
    from engine.steering.plan import SteeringPlan


def register(cli: click.Group) -> None:
    cli.add_command(steer)
    cli.add_command(export_steering)


# Plan fields a command-line option sets (option name → SteeringPlan field).
_PLAN_OPTIONS = {
    "strength": "strength", "layers": "layers", "mode": "mode", "positions": "positions", "combine": "combine",
    "max_new_tokens": "max_new_tokens", "seed": "seed", "sample": "do_sample", "temperature": "temperature",
}


def _plan(map_name: str | None, concepts: Sequence[str], plan_file: Path | None, native: bool,
          values: dict[str, Any]) -> SteeringPlan:
    """The plan the options describe: a plan file with the options given on the command line over
    it, or MAP and its concepts with every option."""
    from engine.steering.plan import PlanConcept, SteeringPlan

    ctx = click.get_current_context()
    given = {k for k in values if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if plan_file is not None:
        d = SteeringPlan.load(plan_file).to_dict() | {_PLAN_OPTIONS[k]: values[k] for k in given}
        if map_name:
            d["map"] = map_name
        if concepts:
            d["concepts"] = [{"query": c} for c in concepts]
        if native:
            d["direction"] = "native"
        return SteeringPlan.from_dict(d)
    if not map_name or not concepts:
        raise click.UsageError("give MAP and at least one --concept (or --plan FILE)")
    return SteeringPlan(map_name, [PlanConcept(c) for c in concepts], direction="native" if native else "transferred",
                        **{_PLAN_OPTIONS[k]: v for k, v in values.items()})


@click.command()
@click.argument("map_name", metavar="MAP", required=False)
@click.option("--concept", "-c", "concepts", multiple=True,
              help="Concept to steer towards: an id (<atlas>/<ordinal>), a label, or free text (best lookup hit). "
                   "Repeat for several.")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="Prompt to continue. Repeat for several.")
@click.option("--strength", "-s", type=float, default=0.5, show_default=True,
              help="Strength in units of the subject site's typical residual norm (negative steers away); "
                   "`atlas eval steering` measures which strengths steer without breaking the text.")
@layers_option("Subject layer(s), e.g. 2 or 1,2 (default: the map's layer; others need their own maps).")
@click.option("--mode", default="add", show_default=True,
              help="add: h += s·norm·u; clamp: set the projection of h on u to s·norm (or a registered mode).")
@click.option("--positions", type=click.Choice(["all", "new"]), default="all", show_default=True,
              help="Edit every position, or only generated ones (after the prompt).")
@click.option("--combine", type=int, default=0, show_default=True,
              help="Average each concept with its K nearest atlas neighbours (steadier than one direction).")
@click.option("--max-new-tokens", "-n", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling (same for both runs).")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--native", is_flag=True,
              help="Steer along the subject's own concept direction instead of the transferred one "
                   "(ConceptWorld subjects, whose ground truth is known).")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path),
              help="Subject model folder (default: the map's subject as registered in the store).")
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the plan from this JSON file (options given explicitly override it).")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plan (with resolved concept ids) to this JSON file.")
@device_options
@store_options
@json_option
@quiet_option
def steer(map_name: str | None, store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Generate steered and unsteered continuations side by side, from the same seed.

    Each concept's atlas direction is mapped into the subject model through MAP's inverse (linear
    part, unit norm) and added at the subject layer(s) with STRENGTH x the site's typical
    residual norm, inside hooks that are always removed afterwards.
    """
    from engine.steering.plan import run_plan

    o = SteerOptions(**options)
    model_path, device, dtype, save_plan = o.model_path, o.device, o.dtype, o.save_plan
    plan = _plan(map_name, o.concepts, o.plan_file, o.native, {k: getattr(o, k) for k in _PLAN_OPTIONS})
    quiet_transformers()
    store = open_store(store_dir, db_url)
    model: Any = None
    tokenizer: Any = None
    model_name: str | None = None
    if model_path is not None:
        from engine.models.loading import load_model

        model, tokenizer = load_model(model_path, device=device, dtype=dtype)
        resolved_path = str(model_path.resolve())
        model_name = next((m.name for m in store.models() if m.source and Path(m.source).expanduser().exists()
                           and str(Path(m.source).expanduser().resolve()) == resolved_path), None)
    run = run_plan(store, plan, list(o.prompts), model=model, tokenizer=tokenizer, model_name=model_name,
                   device=device, dtype=dtype)
    if save_plan is not None:
        plan.save(save_plan)
    if as_json:
        print_json(run)
        return
    for c in run.concepts:
        extra = f" + neighbours {', '.join(c.neighbours)}" if c.neighbours else ""
        click.echo(f"concept {c.ref} {c.label!r} (query {c.query!r}){extra}, strength {c.strength:g} x norm")
    sites = ", ".join(f"layer {layer} (map {run.maps[layer]}, norm {run.norms[layer]:.3g})" for layer in run.layers)
    click.echo(f"subject {run.subject_model}: {sites}; {plan.mode}, positions {plan.positions}, "
               f"{plan.direction} direction")
    for p in run.outputs:
        click.echo("")
        click.echo(f"prompt:    {p.prompt}")
        click.echo(f"unsteered: {p.unsteered}")
        click.echo(f"steered:   {p.steered}")
    click.echo("")
    click.echo(f"perplexity under the unsteered model: unsteered {run.perplexity_unsteered:.2f}, "
               f"steered {run.perplexity_steered:.2f}")
    if save_plan is not None:
        click.echo(f"plan saved to {save_plan}")


@dataclass(frozen=True)
class SteerOptions:
    """The options of `atlas steer`, as click passes them."""

    concepts: tuple[str, ...]
    prompts: tuple[str, ...]
    strength: float
    layers: list[int] | None
    mode: str
    positions: str
    combine: int
    max_new_tokens: int
    seed: int
    sample: bool
    temperature: float
    native: bool
    model_path: Path | None
    plan_file: Path | None
    save_plan: Path | None
    device: str
    dtype: str


@click.command("export-steering")
@click.argument("source", metavar="MAP|PLAN")
@click.option("--concept", "-c", "concepts", multiple=True,
              help="Concept to steer towards (an id, a label or free text); repeat for several. With a PLAN "
                   "file, replaces its concepts.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "repeng", "safetensors"]), default="gguf",
              show_default=True, help="gguf: a llama.cpp control vector; repeng: the GGUF repeng's ControlVector "
                                      "reads; safetensors: layer.<L> tensors with provenance metadata.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option("--strength", "-s", type=float, default=0.5, show_default=True,
              help="Strength in units of the subject site's typical residual norm.")
@layers_option("Subject layer(s), e.g. 2 or 1,2 (default: the map's layer; others need their own maps).")
@click.option("--combine", type=int, default=0, show_default=True,
              help="Average each concept with its K nearest atlas neighbours.")
@store_options
@json_option
def export_steering(source: str, concepts: tuple[str, ...], fmt: str, output: Path, strength: float,
                    layers: list[int] | None, combine: int, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Write what a steering plan adds to the residual stream as a file for another runtime.

    MAP|PLAN is a map name (with --concept) or a plan saved by `atlas steer --save-plan`. Each
    layer's vector is the sum over concepts of strength x norm x the concept's unit direction in
    the subject model, exactly what `atlas steer` adds at that block's output at every position;
    the file records the subject model, layers, strength units, concepts, maps and their
    checksums. Additive plans over all positions only.
    """
    from engine.steering.export import export_steering as run_export

    plan_file = Path(source) if source.endswith(".json") and Path(source).is_file() else None
    plan = _plan(None if plan_file else source, concepts, plan_file, False,
                 dict(strength=strength, layers=layers, combine=combine))
    vectors = run_export(open_store(store_dir, db_url), plan, output, fmt)
    rows = [{"layer": L, "norm": float(np.linalg.norm(v)), "dim": int(v.shape[0])} for L, v in vectors.layers.items()]
    if as_json:
        print_json({"file": str(output), "format": fmt, "model_hint": vectors.model_hint, "layers": rows,
                    "provenance": vectors.provenance})
        return
    click.echo(f"wrote {fmt} steering vectors for {vectors.provenance['subject_model']} to {output}")
    emit(rows, False, ["layer", "dim", "norm"])
