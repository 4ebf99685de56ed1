"""`atlas eval`: the engine against ConceptWorld's ground truth (retrieval, labelling, steering).

The evaluations live with the world (`engine.world.eval`); these commands only parse options and
print their rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.cli.common import (
    METHOD_NAMES,
    comma_list,
    device_options,
    emit,
    json_option,
    layers_option,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    store_options,
    world_options,
)
from engine.errors import BadValueError
from engine.extras import require
from engine.util import to_plain

if TYPE_CHECKING:
    from engine.align.evaluate import RetrievalRow


@click.group("eval")
def eval_group() -> None:
    """Evaluate the engine against ConceptWorld's ground truth (retrieval, labelling, steering)."""


def register(cli: click.Group) -> None:
    cli.add_command(eval_group)
    for command in (eval_retrieval, eval_labelling, eval_steering):
        eval_group.add_command(command)


# `atlas eval` needs --world: the world is the only ground truth the engine ships (the flag says so in scripts)
on_world = click.option("--world", "use_world", is_flag=True, required=True,
                        help="Evaluate on ConceptWorld (the only ground truth the engine ships).")

# retrieval fits from the pair statistics alone: the methods that need nothing more (self_learning needs
# feature dictionaries; rcsls can be asked for by name)
RETRIEVAL_METHODS = ("procrustes", "ridge", "correlation")
RETRIEVAL_COLUMNS = ["subject", "pairing", "layer", "method", "mrr", "mpp", "top1", "top5", "n_queries", "n_pairs"]


@click.command("retrieval")
@on_world
@world_options("tiny")
@click.option("--methods", "-m", multiple=True, callback=comma_list(),
              help=f"Methods to compare, of {', '.join(m for m in METHOD_NAMES if m != 'self_learning')} "
                   f"(default: {','.join(RETRIEVAL_METHODS)}).")
@layers_option("Subject layers (default: all).")
@click.option("--pairings", multiple=True, callback=comma_list(),
              help="Pairings (default: token for subject A; span and text for subject B, whose tokenizer differs).")
@click.option("--subjects", multiple=True, callback=comma_list(), help="Subjects: a, b (default: both).")
@click.option("--max-tokens", type=int, help="Cap on training pairs per pairing.")
@click.option("--subject-model", metavar="MODEL",
              help="Evaluate this model instead of the world's subjects: a registered name, a folder or a hub id "
                   "(real weights; its topic directions are its centred topic means over the world's held-out texts).")
@click.option("--kind", type=click.Choice(["causal", "encoder"]), help="Kind of --subject-model (default: as registered).")
@device_options
@store_options
@json_option
@quiet_option
def eval_retrieval(store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Concept retrieval through fitted maps on ConceptWorld (docs/design.md §8).

    Maps are fitted on the world's training documents (hyper-parameters such as ridge's λ on its
    held-out documents). Each query is a subject's own concept direction (centred topic mean at
    its layer), mapped into the atlas; the rank is the true concept's position among all atlas
    concepts by cosine (ties count against). MRR = mean 1/rank; MPP = mean (rank-1)/(N-1), 0 is
    perfect and 0.5 chance; top-1/top-5 = share ranked first / in the first five.
    """
    from engine.align.pairing import PairingConfig
    from engine.world.eval.retrieval import evaluate_model_retrieval, evaluate_world_retrieval

    o = RetrievalOptions(**options)
    methods = o.methods or list(RETRIEVAL_METHODS)
    config = PairingConfig(max_pairs=o.max_tokens, device=o.device, dtype=o.dtype)
    quiet_transformers()
    rows: Sequence[RetrievalRow]
    if o.subject_model:
        if o.subjects:
            raise click.UsageError("give --subjects (world subjects) or --subject-model, not both")
        rows = evaluate_model_retrieval(open_store(store_dir, db_url), o.subject_model, size=o.size, seed=o.seed,
                                        methods=methods, layers=o.layers, pairings=o.pairings, config=config,
                                        kind=o.kind)
    else:
        rows = evaluate_world_retrieval(open_store(store_dir, db_url), size=o.size, seed=o.seed, methods=methods,
                                        layers=o.layers, pairings=o.pairings, subjects=o.subjects, config=config)
    if as_json:
        print_json([{"subject": r.subject, "method": r.method, "pairing": r.pairing, "layer": r.layer,
                     "mrr": r.mrr, "mpp": r.mpp, "top1": r.top1, "top5": r.top5, "n_queries": r.n_queries,
                     "n_pairs": r.n_pairs, "heldout_r2": r.heldout_r2} for r in rows])
        return
    emit(rows, False, RETRIEVAL_COLUMNS)
    click.echo("\nMRR = mean 1/rank of the true concept among all atlas concepts by cosine (ties count "
               "against); MPP = mean (rank-1)/(N-1), 0 perfect, 0.5 chance.")


@dataclass(frozen=True)
class RetrievalOptions:
    """The options of `atlas eval retrieval`, as click passes them."""

    use_world: bool
    size: str
    seed: int
    methods: list[str] | None
    layers: list[int] | None
    pairings: list[str] | None
    subjects: list[str] | None
    max_tokens: int | None
    subject_model: str | None
    kind: str | None
    device: str
    dtype: str


@click.command("labelling")
@on_world
@world_options("small")
@click.option("--map", "map_names", multiple=True, help="Only these maps (default: every map on the world atlas).")
@click.option("--features", "features", type=click.Choice(["all", "native", "sae"]), default="all", show_default=True,
              help="native: each subject's concept directions through its maps; sae: each subject SAE's latents "
                   "through maps onto the SAE atlas world-<size>-sae, per layer, pairing and method; all: both tables.")
@click.option("--methods", "-m", "methods", multiple=True, callback=comma_list(),
              help=f"Methods of the SAE table's maps (default: {','.join(METHOD_NAMES)}).")
@click.option("--max-docs", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Training documents the SAE table's maps are fitted on.")
@layers_option("Subject layers of the SAE table, e.g. 0,1 (default: every layer of each subject). An SAE at a "
               "layer the world was built without is trained on first use and cached.")
@click.option("--compare", is_flag=True,
              help="Measure in memory instead of through stored runs, at each subject's SAE layer: every method x "
                   "criterion (nn, csls, isf) and activation matching (co-activation with the atlas SAE's encoder, "
                   "or projections on its directions), the oracle ceiling on every row, ECE and precision at 50%/80% "
                   "coverage of the label confidence, and per-token explanation quality on held-out documents.")
@click.option("--confidence", "confidence_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --compare: the confidence models JSON (default: engine/labelling/confidence_default.json "
                   "where shipped; without one, no ECE columns).")
@device_options
@store_options
@json_option
@quiet_option
def eval_labelling(store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Labelling accuracy on ConceptWorld: native concept directions and SAE latents, through maps.

    native: the features are the subject model's own concept directions (centred topic means);
    the right label of feature i is the world's concept i. Maps come from `atlas align`; where the
    store has none for a subject, a Procrustes map is fitted first.

    sae: the features are the latents of each subject's SAE (`atlas world build --sae`), labelled
    through maps onto the foundation SAE's atlas world-<size>-sae (one map per layer, pairing and
    method, fitted on the world's training documents), at every layer of each subject or those
    of --layers: the world's build trains each subject's SAE at its default layer, an SAE at
    another layer is trained the same way on first use and cached beside it (seconds on tiny,
    tens of seconds on small). A latent's label is right when its atlas
    hit has the same ground-truth label (topic or word). Scored: top-1, top-5 and MRR over the
    labelled subject latents, with the top-1 of a random atlas latent (chance) and, for
    retrieval, the MRR of a concept's atlas topic latents queried with the subject's mapped
    concept direction (concept_mrr).

    --compare: the in-memory table of engine/world/eval/label_methods.py (docs/label-quality.md):
    every method x criterion and activation matching, for the SAE latents (--features sae) or
    the native directions (native), with per-token explanation quality (features=explain rows).
    """
    if options["features"] in ("all", "sae"):
        require("sae", "atlas eval labelling --features sae")
    from engine.world.eval.labelling import evaluate_world_labelling
    from engine.world.eval.sae_labelling import MapFitting, evaluate_sae_labelling

    quiet_transformers()
    from engine.align.methods import get_method
    from engine.world.build import world_name

    o = LabellingOptions(**options)
    size, seed, map_names, features, methods, layers = o.size, o.seed, o.map_names, o.features, o.methods, o.layers
    device, dtype = o.device, o.dtype
    method_list = list(methods or METHOD_NAMES)
    for m in method_list:
        get_method(m)  # an unknown name fails before any world is built
    if map_names and features == "sae":
        raise BadValueError("--map selects maps of the native table; the SAE table fits its own (use --features native)")
    if layers and features == "native":
        raise BadValueError("--layers selects the SAE table's layers; the native table uses the maps of --map "
                            "(use --features sae or all)")
    store = open_store(store_dir, db_url)
    if o.compare:
        _compare_labelling(store, o, method_list if methods else None, as_json)
        return
    if o.confidence_file:
        raise BadValueError("--confidence applies to --compare")
    rows: list[dict[str, Any]] = []
    if features in ("all", "native"):
        rows += [{"features": "native", **dataclasses.asdict(r)} for r in evaluate_world_labelling(
            store, size=size, seed=seed, maps=list(map_names) or None, device=device, dtype=dtype)]
    sae_rows = []
    if features in ("all", "sae"):
        sae_rows = [dataclasses.asdict(r) for r in evaluate_sae_labelling(
            store, size=size, seed=seed, methods=method_list,
            fitting=MapFitting(max_docs=o.max_docs, device=device, dtype=dtype), layers=list(layers) if layers else None)]
    if as_json:
        print_json(rows + sae_rows)
        return
    if rows:
        emit(rows, False, ["subject", "method", "map", "n", "top1", "top5"])
    if sae_rows:
        if rows:
            click.echo("")
        click.echo(f"SAE latents labelled through maps onto {world_name(size, seed)}-sae:")
        emit(sae_rows, False, ["subject", "pairing", "method", "layer", "n", "top1", "top5", "mrr", "chance_top1",
                               "top1_topic", "top1_word", "concept_mrr"])
        click.echo("\nn = subject latents with a ground-truth label (topic or word); top1/top5/mrr: their atlas hits "
                   "with the same label; chance_top1: a random atlas latent; concept_mrr: a concept's atlas topic "
                   "latents found from the subject's mapped concept direction.")


COMPARE_COLUMNS = {
    "sae": ["subject", "method", "n", "top1", "top5", "ceiling", "p_at_50", "p_at_80", "ece", "conf_mean"],
    "native": ["subject", "method", "pairing", "n", "top1", "ceiling"],
    "explain": ["subject", "method", "n", "token_top1", "text_top1"],
}


def _compare_labelling(store: Any, o: LabellingOptions, methods: list[str] | None, as_json: bool) -> None:
    """`atlas eval labelling --compare`: the rows of `engine.world.eval.label_methods.measure_world`."""
    from engine.world.eval.label_methods import load_confidence, measure_world
    from engine.world.locate import ensure_registered

    if o.map_names or o.layers:
        raise BadValueError("--compare fits its own maps at each subject's SAE layer: drop --map and --layers")
    features = {"sae": ("sae", "explain"), "native": ("native", "explain")}.get(o.features, ("sae", "native", "explain"))
    world = ensure_registered(store, o.size, o.seed)
    rows, _ = measure_world(world, o.max_docs, methods, features, load_confidence(o.confidence_file))
    if world.report is not None and not world.report.passed:  # every row also carries gates_passed: False
        click.echo(f"warning: world {world.name} failed its learnability gates ({'; '.join(world.report.failures())}): "
                   "these figures are suspect", err=True)
    if as_json:
        print_json(rows)
        return
    for i, f in enumerate(f for f in ("sae", "native", "explain") if f in features):
        if i:
            click.echo("")
        click.echo({"sae": "SAE latents (top-1 over labelled latents; ceiling: their label exists in the atlas):",
                    "native": "native concept directions (top-1 over the concepts):",
                    "explain": "per-token explanation on held-out documents (token_top1: member words whose top "
                               "concept is theirs; text_top1: documents whose by-max summary ranks their concept "
                               "first):"}[f])
        emit([r for r in rows if r["features"] == f], False, COMPARE_COLUMNS[f])


@dataclass(frozen=True)
class LabellingOptions:
    """The options of `atlas eval labelling`, as click passes them."""

    use_world: bool
    size: str
    seed: int
    map_names: tuple[str, ...]
    features: str
    methods: list[str] | None
    max_docs: int
    layers: list[int] | None
    compare: bool
    confidence_file: Path | None
    device: str
    dtype: str


@click.command("steering")
@on_world
@world_options("small")
@click.option("--subject", type=click.Choice(["a", "b"]), default="a", show_default=True,
              help="World subject: a (Llama, the foundation's tokenizer) or b (GPT-NeoX, its own BPE).")
@click.option("--strengths", multiple=True, callback=comma_list(float, "numbers like 1 or 0.5,1,2"),
              help="Strengths (x typical residual norm) to sweep, e.g. 0.5,1,2 (default: 0.125,0.25,0.35,0.5,0.7,1,2).")
@layers_option("Subject layers to evaluate, e.g. 1,2 (default: every layer).")
@click.option("--map", "map_name", help="Evaluate this map only (default: every map of the subject onto the "
                                        "world atlas; Procrustes and ridge maps are fitted where missing).")
@click.option("--max-new-tokens", "-n", type=int, default=20, show_default=True)
@click.option("--sae/--no-sae", "with_sae", default=False, show_default=True,
              help="Also steer with SAE latents: each concept's topic latent of the foundation SAE (its decoder "
                   "row) through the inverse of a map onto world-<size>-sae, beside topic means through the same "
                   "maps (the SAE table; trains or reuses the world's SAEs with eai-sparsify).")
@click.option("--against-topic/--no-against-topic", default=True, show_default=True,
              help="Also steer prompts that have a topic towards another (the against-topic table).")
@click.option("--modes", multiple=True, callback=comma_list(), help="Against-topic table: steering modes to compare "
              "(default: add,clamp).")
@click.option("--positions", "positions_", multiple=True, callback=comma_list(),
              help="Against-topic table: edited positions to compare, all and/or new (default: all,new).")
@click.option("--against-strengths", multiple=True, callback=comma_list(float, "numbers like 1 or 0.5,1,2"),
              help="Against-topic table: strengths (x each edited layer's typical residual norm) "
                   "(default: 0.125,0.25,0.35,0.5,0.7,1).")
@click.option("--against-prompts", type=click.IntRange(min=2), default=10, show_default=True,
              help="Against-topic table: prompts per concept (half validation, half test).")
@device_options
@store_options
@json_option
@quiet_option
def eval_steering(store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Steering faithfulness on ConceptWorld: unsteered, transferred and native directions.

    Faithfulness (docs/design.md §8): the share of (concept, neutral prompt) trials whose greedy
    continuation has the target concept as its strict plurality concept; the perplexity of the
    continuation under the unsteered subject is the fluency guard. Each direction's map, layer
    and strength are chosen on held-out prompts (never the evaluation prompts), per map method
    among the maps that fit best on held-out pairs, as the most faithful cell within 2x the
    unsteered perplexity (`chosen_for_method`); the best of those on held-out prompts is the
    headline (`chosen`). Prompts about another topic are reported at the chosen cells. --json
    prints every row, the held-out ones with prompts=heldout.

    The against-topic table (prompts=against_topic; engine/steering/against.py) steers first
    sentences of held-out documents, which have a topic, towards other concepts: per direction
    kind, mode, positions and number of layers edited at once (one, or all of --layers), the layer
    set and strength are chosen on a validation half of the prompts (split=validation) and
    reported on the other half (split=test, chosen=true), under two fluency guards: 2x the
    unsteered perplexity after the prompt (guard=prompt) or of the continuation on its own
    (guard=alone).

    With --sae, the SAE table (table=sae in --json; engine/world/eval/sae_steering.py) scores the
    same way directions made from SAE latents (method sae-<map method>) and topic means
    (mean-<map method>) sent through the same maps onto the SAE atlas, with the unsteered and
    native rows of that run.
    """
    if options["with_sae"]:
        require("sae", "atlas eval steering --sae")
    from engine.steering.against import DEFAULT_STRENGTHS, check_options
    from engine.steering.faithfulness import SteeringGrid
    from engine.world.eval.against_topic import evaluate_world_against_topic
    from engine.world.eval.steering import DEFAULT_STRENGTHS as WORLD_STRENGTHS
    from engine.world.eval.steering import evaluate_world_steering

    o = SteeringEvalOptions(**options)
    size, seed, subject, strengths, layers = o.size, o.seed, o.subject, o.strengths, o.layers
    max_new_tokens, device, dtype = o.max_new_tokens, o.device, o.dtype
    modes, positions_ = o.modes or ["add", "clamp"], o.positions_ or ["all", "new"]
    against_strengths = o.against_strengths or list(DEFAULT_STRENGTHS)
    check_options(modes, positions_, against_strengths)
    quiet_transformers()
    store = open_store(store_dir, db_url)
    grid = SteeringGrid(tuple(strengths or WORLD_STRENGTHS), max_new_tokens=max_new_tokens)
    report = evaluate_world_steering(store, size=size, seed=seed, subject=subject, grid=grid, layers=layers,
                                     map_name=o.map_name, device=device, dtype=dtype)
    against = None
    if o.against_topic:
        against_grid = SteeringGrid(tuple(against_strengths), tuple(modes), tuple(positions_),
                                    max_new_tokens=max_new_tokens)
        against = evaluate_world_against_topic(store, size=size, seed=seed, subject=subject, grid=against_grid,
                                               layers=layers, prompts_per_concept=o.against_prompts,
                                               device=device, dtype=dtype)
    sae_rows: list[dict[str, Any]] = []
    sae_info: dict[str, Any] = {}
    if o.with_sae:
        from engine.world.eval.sae_steering import evaluate_sae_steering

        sae_report, sae_info = evaluate_sae_steering(store, size=size, seed=seed, subject=subject, grid=grid,
                                                     quiet=True, device=device, dtype=dtype)
        sae_rows = [{**to_plain(r), "table": "sae"} for r in sae_report.rows]
    if as_json:
        print_json([*report.rows, *report.calibration, *(against.rows if against else []), *sae_rows])
        return
    emit(report.rows, False, ["direction", "prompts", "method", "layer", "strength", "faithfulness", "perplexity",
                              "n", "chosen_for_method", "chosen"])
    click.echo("")
    c = report.chosen
    click.echo(f"chosen on held-out prompts: {c['map']} (layer {c['layer']}), strength {c['strength']:g} "
               f"(held-out faithfulness {c['heldout_faithfulness']:.3f}); native: layer {c['native_layer']}, "
               f"strength {c['native_strength']:g}")
    for line in report.summary:
        click.echo(line)
    if against is not None:
        click.echo("\nagainst-topic prompts (test half; layers and strength chosen on the validation half):")
        emit([r for r in against.rows if r.split == "test"], False,
             ["direction", "mode", "positions", "layers", "strength", "guard", "faithfulness", "perplexity",
              "perplexity_alone", "n", "headline"])
        for line in against.summary:
            click.echo(line)
    if o.with_sae:
        click.echo(f"\nSAE latents vs topic means through the same maps ({sae_info['coverage']} of "
                   f"{sae_info['n_concepts']} concepts have a topic latent in the foundation SAE):")
        emit(sae_rows, False, ["direction", "prompts", "method", "layer", "strength", "faithfulness", "perplexity",
                               "n", "chosen_for_method"])


@dataclass(frozen=True)
class SteeringEvalOptions:
    """The options of `atlas eval steering`, as click passes them."""

    use_world: bool
    size: str
    seed: int
    subject: str
    strengths: list[float] | None
    layers: list[int] | None
    map_name: str | None
    max_new_tokens: int
    with_sae: bool
    against_topic: bool
    modes: list[str] | None
    positions_: list[str] | None
    against_strengths: list[float] | None
    against_prompts: int
    device: str
    dtype: str
