"""Store commands: atlases, import-sae, import-means, remove, gc, lookup, neighbors, show, index (a store's
set-up, init, db and models, is `engine.cli.setup_cmds`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.cli.common import (
    describe_removal,
    device_options,
    emit,
    json_option,
    open_read_store,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    store_options,
)
from engine.extras import checked_index_uri
from engine.store.index_location import parse_index_uri

if TYPE_CHECKING:

    from engine.store.atlases import AtlasInfo
    from engine.store.store import Store


def register(cli: click.Group) -> None:
    for cmd in (atlases, import_sae, import_means, remove, lookup, neighbors, show, index, gc):
        cli.add_command(cmd)


@click.command()
@store_options
@json_option
def atlases(store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """List atlases with their site (model, layer, hook), size and index."""
    emit(open_store(store_dir, db_url).atlases(), as_json,
         ["name", "model", "layer", "hook", "dim", "n_concepts", "n_labelled", "index_spec", "index_backend",
          "source_kind"])


index_uri_option = click.option(
    "--index-uri", metavar="URI", callback=lambda _ctx, _param, uri: checked_index_uri(uri),
    help="Where the atlas's vectors are searched: faiss (default: a FAISS file in the store), a Milvus Lite "
         "folder ending in .db (relative to the store root, e.g. milvus.db) or a Milvus server "
         "(http://host:19530; credentials in $ATLAS_MILVUS_TOKEN).")


def check_index_uri(store: Store, index_uri: str | None) -> None:
    """Refuse a bad --index-uri before any work is done."""
    if index_uri is not None:
        parse_index_uri(index_uri, store.path)


def _held_by(info: AtlasInfo) -> str:
    return "" if info.index_backend == "faiss" else f" on milvus ({info.index_uri})"


@click.command("import-sae")
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Name of the new atlas.")
@click.option("--format", "fmt", metavar="FORMAT",
              help="Read SOURCE as this format (default: detected): saelens, eai-sparsify, llama-scope, "
                   "dictionary_learning, gemmascope, matrix.")
@click.option("--release", help="A SAELens release id (e.g. gemma-scope-2b-pt-res), read from the local "
                                "Hugging Face cache instead of SOURCE; needs --sae-id.")
@click.option("--sae-id", help="The SAE of --release (e.g. layer_12/width_16k/average_l0_82).")
@click.option("--model", help="Model the directions live in: a registered name, a local folder or a hub id (a "
              "folder or id is registered on the spot); read from the SAE's config when there.")
@click.option("--layer", type=int, help="Layer of the site (read from the config or the path when there).")
@click.option("--hook", help="Hook point of the site (default: resid_post).")
@click.option("--revision", help="Model revision (commit or tag) the directions were made on.")
@click.option("--labels", type=click.Path(exists=True, path_type=Path),
              help="Labels: CSV (index,label,description), JSONL, or a Neuronpedia export (.jsonl/.jsonl.gz).")
@click.option("--index-spec", default="Flat", show_default=True,
              help="FAISS index: Flat (exact), HNSW32, IVF{n},Flat, IVF{n},PQ{m}; search params after '|'.")
@index_uri_option
@click.option("--key", help="Tensor name inside a .safetensors matrix holding several.")
@store_options
@json_option
def import_sae(source: Path | None, name: str, store_dir: Path, db_url: str | None, as_json: bool,
               **options: Any) -> None:
    """Import concept directions from SOURCE (or --release/--sae-id) as a new atlas.

    SOURCE is a SAELens SAE folder (cfg.json + sae_weights.safetensors), an EleutherAI sparsify
    hookpoint folder (cfg.json + sae.safetensors), a Llama Scope folder (hyperparams.json +
    checkpoints/final.safetensors), a dictionary_learning ae.pt (+ config.json), a Gemma Scope
    params.npz, or a plain .npy / .safetensors matrix (one direction per row). Decoder rows become
    concepts; an SAE's encoder and activation (ReLU, JumpReLU threshold, TopK k) are kept for
    `atlas explain`. --release R --sae-id ID finds the SAE offline in HF_HUB_CACHE / HF_HOME.
    The import is one transaction: a failure leaves no atlas.
    """
    from engine.atlas.formats.base import FormatWarning
    from engine.atlas.formats.releases import SaeRelease
    from engine.atlas.importers import import_atlas
    from engine.models.registry import ensure_model
    from engine.store.store import AtlasSource, IndexPlacement

    o = SaeOptions(**options)
    store = open_store(store_dir, db_url)
    check_index_uri(store, o.index_uri)
    note = None
    model = o.model
    if model:
        model, note = ensure_model(store, model, revision=o.revision, required=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FormatWarning)
        info = import_atlas(store, name, source, labels=o.labels,
                            site=AtlasSource(model=model, layer=o.layer, hook=o.hook, revision=o.revision),
                            index=IndexPlacement(o.index_spec, o.index_uri), key=o.key, fmt=o.fmt,
                            release=SaeRelease(o.release, o.sae_id) if o.release or o.sae_id else None)
    for w in caught:
        if issubclass(w.category, FormatWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if note:
        click.echo(f"note: {note}", err=True)
    if as_json:
        print_json(info)
    else:
        click.echo(f"imported atlas {info.name}: {info.n_concepts} concepts ({info.n_labelled} labelled), "
                   f"d={info.dim}, site {info.site}, index {info.index_spec}{_held_by(info)}")


@dataclass(frozen=True)
class SaeOptions:
    """The options of `atlas import-sae` besides SOURCE, --name and the store, as click passes them."""

    fmt: str | None
    release: str | None
    sae_id: str | None
    model: str | None
    layer: int | None
    hook: str | None
    revision: str | None
    labels: Path | None
    index_spec: str
    index_uri: str | None
    key: str | None


@click.command()
@click.argument("atlas")
@click.option("--cascade", is_flag=True,
              help="Also remove the maps onto ATLAS and the labelling runs on them, with their labels.")
@store_options
@json_option
def remove(atlas: str, cascade: bool, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Delete an atlas: its concepts, then its files (vectors, index, label index).

    Refused while maps onto it (or labelling runs on those) exist; the message names them.
    --cascade removes them too.
    """
    removal = open_store(store_dir, db_url).remove_atlas(atlas, cascade=cascade)
    if as_json:
        print_json(removal)
    else:
        click.echo(describe_removal(removal))


@click.command()
@click.option("--grace", type=click.FloatRange(min=0), default=24 * 3600, show_default=True,
              help="Seconds a leftover file whose writer is unknown, or alive but not writing it, is kept "
                   "(files a running write has claimed are always kept, whatever the grace).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@store_options
@json_option
def gc(grace: float, dry_run: bool, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Remove leftover files of interrupted writes: files no database row claims and no running
    writer owns (temporary files, files of killed imports, rebuilds and map saves), and Milvus
    collections of killed imports and rebuilds."""
    gone = open_store(store_dir, db_url).gc(grace_s=grace, dry_run=dry_run)
    if as_json:
        print_json(gone)
        return
    for x in gone:
        if x.collection:
            click.echo(f"{'would drop' if dry_run else 'dropped'} collection {x.file} ({x.state})")
        else:
            click.echo(f"{'would remove' if dry_run else 'removed'} {x.file} ({x.state}, {x.size} bytes)")
    click.echo(f"{len(gone)} leftover file(s) {'to remove' if dry_run else 'removed'}")



@click.command("import-means")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Name of the new atlas.")
@click.option("--model", required=True, help="A registered model, or a local folder / hub id (registered on the spot).")
@click.option("--layer", type=int, required=True, help="Layer of the site (block index; negative counts from the end).")
@click.option("--hook", type=click.Choice(["resid_post", "resid_pre"]), default="resid_post", show_default=True)
@click.option("--kind", type=click.Choice(["causal", "encoder"]), help="Model kind (default: as registered, else causal).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass.")
@click.option("--index-spec", default="Flat", show_default=True, help="FAISS index spec (as import-sae).")
@index_uri_option
@device_options
@store_options
@json_option
@quiet_option
def import_means(corpus: Path, name: str, store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Make an atlas of concept directions from a labelled CORPUS: one concept per label, its
    direction the mean residual of the label's texts at the site minus the mean over labels.

    CORPUS is JSONL (text, label, optional description) or TSV (label<TAB>text). Any model becomes
    an atlas site this way, without an SAE.
    """
    from engine.align.corpus import read_labelled_corpus
    from engine.models.class_means import MeansRequest
    from engine.models.class_means import import_means as run_import
    from engine.store.index_location import IndexPlacement

    index = IndexPlacement(options.pop("index_spec"), options.pop("index_uri"))
    request = MeansRequest(index=index, **options)
    quiet_transformers()
    store = open_store(store_dir, db_url)
    check_index_uri(store, index.uri)
    texts, labels, descriptions = read_labelled_corpus(corpus)
    info = run_import(store, name, request, texts, labels, descriptions)
    if as_json:
        print_json(info)
    else:
        click.echo(f"imported atlas {info.name}: {info.n_concepts} concepts (class means of {len(texts)} texts), "
                   f"d={info.dim}, site {info.site}")




# ---------------------------------------------------------------------- lookup


@click.command()
@click.argument("query")
@click.option("-k", default=10, show_default=True, help="How many concepts to return.")
@click.option("--atlas", help="Only this atlas (default: all).")
@click.option("--semantic/--no-semantic", default=None,
              help="Use the label-embedding index (default: when installed and built).")
@store_options
@json_option
def lookup(query: str, k: int, atlas: str | None, semantic: bool | None, store_dir: Path, db_url: str | None,
           as_json: bool) -> None:
    """Find concepts whose label or description matches QUERY, ranked.

    Full-text search (bm25) over labels and descriptions, merged with semantic search over label
    embeddings where the `semantic` extra is installed and `atlas index embed` was run.
    """
    from engine.atlas.lookup import lookup as run_lookup

    # one query per process: FTS5 ranks it; the score-bounded index pays off in a warm process (`atlas serve`)
    hits = run_lookup(open_read_store(store_dir, db_url), query, k=k, atlas=atlas, semantic=semantic, indexed=False)
    emit(hits, as_json, ["rank", "ref", "label", "score", "text_rank", "semantic_rank"])


@click.command()
@click.argument("concept")
@click.option("-k", default=10, show_default=True, help="How many neighbours.")
@click.option("--atlas", help="Atlas of CONCEPT when it is given as a bare ordinal.")
@store_options
@json_option
def neighbors(concept: str, k: int, atlas: str | None, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """The concepts nearest to CONCEPT (<atlas>/<ordinal>) by direction (cosine)."""
    hits = open_read_store(store_dir, db_url).neighbors(concept, k=k, atlas=atlas)
    emit(hits, as_json, ["rank", "ref", "label", "score"])


@click.command()
@click.argument("concept")
@click.option("--atlas", help="Atlas of CONCEPT when it is given as a bare ordinal.")
@store_options
@json_option
def show(concept: str, atlas: str | None, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Show one concept: label, description, provenance, direction stats."""
    import dataclasses

    import numpy as np

    store = open_read_store(store_dir, db_url)
    c = store.concept(concept, atlas)
    info = store.atlas_record(c.atlas)
    vec = store.atlas_rows(c.atlas, [c.ordinal])[0]  # only its block of the vector file is checked
    out = {
        "ref": c.ref, **dataclasses.asdict(c), "site": info.site, "model": info.model,
        "layer": info.layer, "hook": info.hook, "dim": info.dim, "source": info.source_ref,
        "norm": float(np.linalg.norm(vec)),
    }
    emit(out, as_json)


# ---------------------------------------------------------------------- index


@click.group()
def index() -> None:
    """Index integrity: verify, rebuild; build the label-embedding index."""


@index.command("verify")
@click.argument("atlas", required=False)
@click.option("--fix", is_flag=True, help="Record block checksums for files written before they were kept "
                                          "(each only once its full sha256 matches the one recorded at import).")
@store_options
@json_option
def index_verify(atlas: str | None, fix: bool, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Check ATLAS's (or every atlas's) vectors and index against their checksums; exit 1 on a problem.

    Each file is read whole: its sha256 and its per-block checksums (which reads check the blocks
    they use against) are compared with those recorded when it was written. Files written before
    block checksums were kept are reported "unchecked": reads check only their size, mtime, head
    and tail until --fix records their block checksums.

    Without ATLAS, map files are checked too, and leftover files of interrupted writes (claimed by
    no database row) are reported with the command that removes them (`atlas gc`).
    """
    report = open_store(store_dir, db_url).verify(atlas, fix=fix)
    if as_json:
        print_json({"ok": report.ok, "problems": report.problems, "atlases": report.atlases,
                    "maps": report.maps, "leftovers": report.leftovers})
    else:
        for r in report.atlases:
            click.echo(f"{r.atlas}: {'ok' if r.ok else 'PROBLEM'} ({r.backend} {r.spec}, "
                       f"{r.index_count}/{r.expected_count})"
                       + (f" - {r.problem}" if r.problem else ""))
            if r.unchecked:
                click.echo(f"{r.atlas}: unchecked - its {' and '.join(f'{k} file' for k in r.unchecked)} "
                           "has no block checksums (written before they were kept): reads check only its size, "
                           f"mtime, head and tail; `atlas index verify {r.atlas} --fix` records them")
            if r.fixed:
                click.echo(f"{r.atlas}: block checksums recorded for its {' and '.join(f'{k} file' for k in r.fixed)}")
        for m in report.maps:
            click.echo(f"map {m.map}: {'ok' if m.ok else 'PROBLEM - ' + str(m.problem)}")
        for x in report.leftovers:
            click.echo(f"leftover {x.file}: {x.state}" + (f" (pid {x.writer_pid})" if x.writer_pid else ""))
        stale = [x for x in report.leftovers if x.state != "in progress"]
        if stale:
            click.echo(f"PROBLEM - {len(stale)} leftover file(s) claimed by no row; `atlas gc` removes them")
    if not report.ok:
        raise SystemExit(1)


@index.command("rebuild")
@click.argument("atlas")
@click.option("--spec", help="Rebuild with another FAISS spec (e.g. HNSW32); default: the current one.")
@click.option("--index-uri", metavar="URI", callback=lambda _ctx, _param, uri: checked_index_uri(uri),
              help="Rebuild in another place (default: where it is): faiss, a Milvus Lite folder (*.db) or a "
                   "Milvus server URI; moves the atlas's vectors there.")
@store_options
@json_option
def index_rebuild(atlas: str, spec: str | None, index_uri: str | None, store_dir: Path, db_url: str | None,
                  as_json: bool) -> None:
    """Rebuild ATLAS's index from its vector file (the source of truth), atomically."""
    status = open_store(store_dir, db_url).rebuild_index(atlas, spec, index_uri=index_uri)
    if as_json:
        print_json(status)
    else:
        click.echo(f"rebuilt index of {atlas}: {status.backend} {status.spec}, {status.index_count} vectors, "
                   f"{'ok' if status.ok else status.problem}")


@index.command("embed")
@click.argument("atlas")
@click.option("--encoder", type=click.Choice(["static", "sentence"]), default="static", show_default=True,
              help="static: a table of token vectors distilled from all-MiniLM-L6-v2 (a query embeds in "
                   "microseconds; distilled once, ~1 min, kept in the store's models/ folder); sentence: the "
                   "model itself (~20 ms of CPU per query). Lookups embed queries with the encoder recorded here.")
@store_options
@quiet_option
def index_embed(atlas: str, encoder: str, store_dir: Path, db_url: str | None) -> None:
    """Embed ATLAS's labels for semantic lookup (needs the `semantic` extra)."""
    from engine.atlas.lookup import build_label_index

    n = build_label_index(open_store(store_dir, db_url), atlas, encoder=encoder)
    click.echo(f"embedded {n} labels of {atlas} ({encoder} encoder)")
