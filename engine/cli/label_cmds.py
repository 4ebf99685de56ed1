"""Labelling and search commands: label, runs, export, explain, search, eval labelling."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.cli.common import (
    device_options,
    emit,
    json_option,
    open_store,
    print_json,
    print_table,
    quiet_option,
    quiet_transformers,
    ray_options,
    store_options,
)

if TYPE_CHECKING:  # the CLI imports the engine lazily; these are click.Choice values
    from engine.labelling.export import ExportFormat
    from engine.search import VectorKind


def register(cli: click.Group) -> None:
    for cmd in (label, runs, export, explain, search):
        cli.add_command(cmd)


# ---------------------------------------------------------------------- label


@dataclass(frozen=True)
class LabelOptions:
    """The options of `atlas label` besides the store and --json, as click passes them."""

    map_name: str | None
    features: str | None
    k: int
    name: str | None
    batch_size: int
    resume: str | None
    overwrite: bool
    no_site_check: bool
    criterion: str
    csls_k: int | None
    match: str
    corpus: str | None
    pairing: str | None
    max_pairs: int | None
    labelled_only: bool
    no_confidence: bool
    min_confidence: float | None
    device: str
    ray: Any


@click.command()
@click.argument("map_name", metavar="MAP", required=False)
@click.option("--features", "-f", metavar="SOURCE",
              help="Subject features: an SAE (SAELens, Gemma Scope, sparsify, dictionary_learning, Llama Scope), "
                   "a .npy / .safetensors matrix "
                   "(one direction per row; FILE#KEY names a tensor), or native: (ConceptWorld).")
@click.option("-k", default=5, show_default=True, help="Concepts kept per feature.")
@click.option("--name", help="Name of the run (default: MAP.SOURCE.kK).")
@click.option("--batch", "batch_size", default=4096, show_default=True,
              help="Features per batch: one search and one transaction each (the unit of resume).")
@click.option("--resume", metavar="RUN", help="Continue an interrupted or failed run where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run of the same name.")
@click.option("--no-site-check", is_flag=True,
              help="Do not compare the model and layer the features record with the map's subject site "
                   "(their width is always checked).")
@click.option("--criterion", type=click.Choice(["nn", "csls", "isf"]), default="nn", show_default=True,
              help="Ranking: nn (cosine), csls (hub-corrected: 2cos - r_S - r_T) or isf (inverted softmax). "
                   "csls/isf first stream all features once for the atlas-side statistic, saved with the run.")
@click.option("--csls-k", type=int, default=None, help="CSLS neighbourhood size [default: 10].")
@click.option("--match", type=click.Choice(["map", "activations"]), default="map", show_default=True,
              help="map: the SAE's decoder directions through MAP. activations: the SAE's latents matched to "
                   "the atlas's features by how they fire on the same text (--corpus); needs the SAE's encoder; "
                   "an atlas without an encoder is read by projection on its directions.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="--match activations: the text both models read (a .txt, one text per line, or .jsonl).")
@click.option("--pairing", type=click.Choice(["token", "span"]),
              help="--match activations: token (same tokenizer) or span (each word's last piece, across "
                   "tokenizers) [default: the map's pairing, else token].")
@click.option("--max-pairs", type=int, help="--match activations: paired tokens / words used at most.")
@click.option("--labelled-only", is_flag=True,
              help="Rank only the atlas concepts that carry a label (a hit on an unlabelled SAE latent names "
                   "nothing); the run records which concepts those were.")
@click.option("--no-confidence", is_flag=True,
              help="Store no confidence (default: each label's probability of being right, from the shipped "
                   "model fitted on development worlds).")
@click.option("--min-confidence", type=click.FloatRange(0, 1), metavar="P",
              help="Report how many labels reach confidence P (the rest export as 'no match' with "
                   "`atlas export --min-confidence P`); stored rows are the same whatever P.")
@click.option("--device", default="numpy", show_default=True, metavar="numpy|cpu|cuda[:N]",
              help="Where the search of a Flat atlas runs: numpy (the engine's BLAS path, fastest on a CPU), "
                   "or torch on cpu / cuda[:N] (float16 GEMM, float32 re-score: the same rows up to ties).")
@ray_options
@store_options
@json_option
@quiet_option
def label(store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Label many subject features through MAP: the top-k atlas concepts of each, stored as a run.

    Rows are committed batch by batch; a run stopped by Ctrl-C or a kill is continued with
    `atlas label --resume RUN` and ends with exactly the rows of an uninterrupted run (under every
    criterion: the statistic csls/isf rank with is saved before the first batch and read back).
    Every label gets a confidence, the probability that its first hit is right.
    `atlas runs` lists runs, `atlas export RUN` writes their labels.

    With --ray (or --ray-address) Ray workers compute the batches and this process commits them
    in order through the same run: the same rows, resumable the same way.
    """
    from engine.labelling import run as labelling
    from engine.labelling.criteria import DEFAULT_CSLS_K

    o = LabelOptions(**options)
    map_name, features, resume, criterion, csls_k = o.map_name, o.features, o.resume, o.criterion, o.csls_k
    no_confidence, match, corpus, pairing, min_confidence = o.no_confidence, o.match, o.corpus, o.pairing, o.min_confidence
    if o.device != "numpy":
        if o.ray is not None:
            raise click.UsageError("--device searches in this process: give it without --ray / --ray-address")
        from indexes.torch_search import set_search_device

        try:
            set_search_device(o.device)
        except (ValueError, RuntimeError) as e:
            raise click.BadParameter(str(e), param_hint="--device") from None
    store = open_store(store_dir, db_url)
    if resume:
        if map_name or features:
            raise click.UsageError("--resume RUN takes no MAP or --features: the run records them")
        if (criterion != "nn" or csls_k is not None or no_confidence or match != "map" or corpus or pairing
                or o.labelled_only):
            raise click.UsageError("--resume RUN takes no --criterion, --csls-k, --match, --corpus, --pairing, "
                                   "--labelled-only or --no-confidence: the run records them")
        run_name, prepared = resume, None
    else:
        if not map_name or not features:
            raise click.UsageError("give MAP and --features SOURCE (or --resume RUN)")
        prepared = labelling.prepare_run(store, labelling.LabelRequest(
            map_name, features, k=o.k, name=o.name, batch_size=o.batch_size, site_check=not o.no_site_check,
            overwrite=o.overwrite, criterion=criterion, csls_k=DEFAULT_CSLS_K if csls_k is None else csls_k,
            confidence="none" if no_confidence else "default", match=match, corpus=corpus, pairing=pairing,
            max_pairs=o.max_pairs, labelled_only=o.labelled_only,
        ))
        run_name = prepared.run.name
    try:
        run = labelling.run_labelling(store, run_name, ray=o.ray, prepared=prepared)
    except KeyboardInterrupt:
        run = store.run(run_name)
        click.echo(f"interrupted at {run.n_done}/{run.n_features} features; "
                   f"`atlas label --resume {run_name}` continues", err=True)
        sys.exit(130)
    from engine.labelling.export import check_confidence_recorded

    check_confidence_recorded(run, min_confidence)
    conf = store.run_confidence(run.name, min_confidence)
    if as_json:
        from engine.util import to_plain

        print_json({**to_plain(run), "confidence": conf})
        return
    crit = run.params.get("criterion", "nn")
    click.echo(f"run {run.name}: {run.n_done}/{run.n_features} features labelled with top-{run.k} "
               f"concepts of {run.atlas} through {run.map} by {crit} ({run.status})")
    if conf["mean"] is not None:
        line = f"mean confidence {conf['mean']:.3f}"
        if min_confidence is not None:
            line += (f"; {conf['n_matched']}/{conf['n_features']} labels at confidence >= {min_confidence:g} "
                     f"(`atlas export {run.name} --min-confidence {min_confidence:g}` writes the rest as 'no match')")
        click.echo(line)


@click.command()
@store_options
@json_option
def runs(store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """List labelling runs with their status and progress (a killed run shows as interrupted)."""
    items = open_store(store_dir, db_url).runs()
    if as_json:
        print_json(items)
        return
    print_table([{"name": r.name, "map": r.map, "status": r.status, "done": f"{r.n_done}/{r.n_features}",
                  "k": r.k, "features": r.feature_source, "updated": r.updated_at} for r in items])


@click.command()
@click.argument("run_name", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "neuronpedia"]), default="jsonl",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="File (default: stdout); a name ending in .gz is gzip-compressed.")
@click.option("--partial", is_flag=True, help="Export the finished part of an unfinished run.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), metavar="P",
              help="Write features whose label confidence is below P as an explicit 'no match' (label "
                   "\"no match\", no concept; jsonl keeps their hits, csv writes one rank-0 row). "
                   "Nothing is dropped: every feature is written.")
@store_options
def export(run_name: str, fmt: ExportFormat, output: Path | None, partial: bool, min_confidence: float | None,
           store_dir: Path, db_url: str | None) -> None:
    """Write the labels of RUN with their scores, the margin between the top two hits and the
    label's confidence (the probability that the first hit is right).

    jsonl: one object per feature (label, concept, score, margin, confidence, hits). csv: one row
    per (feature, rank). neuronpedia: rows shaped like a Neuronpedia explanations export (modelId,
    layer, index, description, explanationModelName "concept-atlas:MAP", score), which
    `atlas import-sae --labels` reads back. A small margin or a low confidence means the
    transferred label is uncertain; --min-confidence P marks those below P as "no match".
    """
    import gzip
    import io

    from engine.labelling.export import export_run

    store = open_store(store_dir, db_url)
    if output is None:
        export_run(store, run_name, sys.stdout, fmt, partial=partial, min_confidence=min_confidence)
        return
    from engine.errors import BadValueError

    store.run(run_name)  # an unknown run is named before any file is made
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with (io.TextIOWrapper(gzip.open(tmp, "wb"), encoding="utf-8", newline="") if output.suffix == ".gz"
              else open(tmp, "w", encoding="utf-8", newline="")) as f:
            n = export_run(store, run_name, f, fmt, partial=partial, min_confidence=min_confidence)
        tmp.replace(output)
    except OSError as e:
        raise BadValueError(f"cannot write --output {output} ({e.strerror or e}); pick a writable file") from None
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(f"wrote {n} features to {output}", err=True)


# ---------------------------------------------------------------------- explain and search


@click.command()
@click.argument("map_name", metavar="MAP")
@click.argument("text")
@click.option("-k", default=3, show_default=True, help="Concepts per token.")
@click.option("--raw", is_flag=True, help="Search the mapped activation as is (default: minus the atlas centre).")
@click.option("--criterion", type=click.Choice(["nn", "csls", "isf"]), default="nn", show_default=True,
              help="Ranking: nn (cosine), csls or isf (hub-corrected over the map's token statistic; see --stat-corpus).")
@click.option("--stat-corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts (JSONL 'text' or one per line) whose tokens make the map's statistic for --criterion "
                   "csls/isf and --whiten; computed once and cached in the store (later calls need no corpus).")
@click.option("--whiten", is_flag=True,
              help="Whiten each mapped residual with the map's token statistic (see --stat-corpus) before the cosine, "
                   "instead of centring it: evens out the directions every token varies along.")
@device_options
@store_options
@json_option
@quiet_option
def explain(map_name: str, text: str, k: int, raw: bool, device: str, dtype: str, store_dir: Path,
            db_url: str | None, as_json: bool, **scoring: Any) -> None:
    """Per token of TEXT in MAP's subject model: the top atlas concepts, with cosine scores
    (csls / isf scores under --criterion).

    Where the atlas keeps its SAE's encoder (SAE imports do), each concept also shows its
    activation ("act"): the token's residual mapped to the atlas site and put through the SAE's
    encoder (ReLU, JumpReLU threshold or TopK k, as the SAE was trained).
    """
    from engine.align.corpus import read_corpus
    from engine.align.map import load_map
    from engine.search import Scoring, token_stat
    from engine.search import explain as run_explain

    criterion, whiten, stat_corpus = scoring["criterion"], scoring["whiten"], scoring["stat_corpus"]
    if stat_corpus is not None and criterion == "nn" and not whiten:
        raise click.UsageError("--stat-corpus is for --criterion csls or isf, or --whiten")
    if whiten and raw:
        raise click.UsageError("--whiten replaces the centring: it excludes --raw")
    quiet_transformers()
    store = open_store(store_dir, db_url)
    amap = load_map(store, map_name)
    if stat_corpus is not None:
        token_stat(store, amap, read_corpus(stat_corpus), centre=not raw, device=device, dtype=dtype)
    tokens = run_explain(store, amap, text, k, centre=not raw, device=device, dtype=dtype,
                         scoring=Scoring(criterion, whiten))
    if as_json:
        print_json(tokens)
        return
    def cell(label: str, score: float, act: float | None) -> str:
        return f"{label} ({score:.2f})" if act is None else f"{label} ({score:.2f}, act {act:.2f})"

    print_table([{"pos": t.position, "token": t.token,
                  **{f"#{h.rank}": cell(h.label, h.score, None if t.activations is None else t.activations[i])
                     for i, h in enumerate(t.hits)}} for t in tokens])


@click.command()
@click.argument("map_name", metavar="MAP")
@click.option("--vectors", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Subject vectors, one per row: .npy or .safetensors (FILE with --key for one of several).")
@click.option("--key", help="Tensor name inside a .safetensors holding several.")
@click.option("-k", default=10, show_default=True, help="Concepts per vector.")
@click.option("--kind", type=click.Choice(["directions", "activations"]), default="directions", show_default=True,
              help="directions: linear part of the map; activations: the affine map, minus the atlas centre.")
@click.option("--criterion", type=click.Choice(["nn", "csls", "isf"]), default="nn", show_default=True,
              help="Ranking: nn (cosine), csls or isf (hub-corrected). Directions: over the vectors in FILE; "
                   "activations: over the map's cached token statistic (`atlas explain --stat-corpus`).")
@click.option("--csls-k", type=click.IntRange(min=1), default=10, show_default=True, help="CSLS neighbourhood size.")
@store_options
@json_option
def search(map_name: str, vectors: Path, key: str | None, k: int, kind: VectorKind, criterion: str, csls_k: int,
           store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Raw vector search through MAP: the top-k atlas concepts of each subject vector in FILE
    (scores: cosines, or the criterion's)."""
    from engine.align.map import load_map
    from engine.atlas.importers import read_matrix
    from engine.search import Scoring, hits_table
    from engine.search import search as run_search

    store = open_store(store_dir, db_url)
    x = read_matrix(vectors, key).W_dec
    emit(hits_table(run_search(store, load_map(store, map_name), x, k, kind=kind, scoring=Scoring(criterion, csls_k=csls_k))),
         as_json,
         ["query", "rank", "ref", "label", "score"])




