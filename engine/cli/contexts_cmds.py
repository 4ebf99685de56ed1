"""`atlas contexts`: per concept, the top activating text windows of a corpus (engine.labelling.contexts)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.cli.common import (
    json_option,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    store_options,
)


def register(cli: click.Group) -> None:
    cli.add_command(contexts)


@click.command()
@click.argument("source", metavar="ATLAS|MAP")
@click.option("--corpus", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts: JSONL with a 'text' field, or one document per line.")
@click.option("--top", default=20, show_default=True, help="Windows kept per concept.")
@click.option("--window", default=60, show_default=True, help="Characters kept either side of the token.")
@click.option("--chunk", default=256, show_default=True,
              help="Texts per commit (the unit of resume; a new run only).")
@click.option("--batch", "batch_size", default=16, show_default=True, help="Texts per forward pass (a new run only).")
@click.option("--overwrite", is_flag=True, help="Discard the source's stored top contexts and start again.")
@store_options
@json_option
@quiet_option
def contexts(source: str, corpus: Path, top: int, window: int, chunk: int, batch_size: int, overwrite: bool,
             store_dir: Path, db_url, as_json: bool) -> None:
    """Run a corpus through a model once and store, per concept, its top activating text windows.

    ATLAS: the atlas's own (registered) model at the atlas's layer and hook. MAP: the map's subject
    model, its residuals mapped into the atlas, so the subject's tokens get the atlas concepts'
    contexts. A token's activation is the atlas SAE's (where the atlas has an encoder), else the
    projection on the concept's unit direction; each window marks its token (`atlas serve` shows
    them on the concept page). Progress is committed every --chunk texts: running the same command
    again continues a stopped run (nothing to do when it is done); --overwrite starts over. Say
    atlas:NAME or map:NAME where a name is both.
    """
    from engine.labelling.contexts import ContextSettings, top_contexts

    store = open_store(store_dir, db_url)
    quiet_transformers()
    try:
        run = top_contexts(store, source, corpus, ContextSettings(top, chunk, batch_size, window),
                           overwrite=overwrite)
    except KeyboardInterrupt:
        from engine.labelling.contexts import resolve_source

        src = resolve_source(store, source)
        cut = store.context_run(src.atlas, src.map)
        done = f"at {cut.n_done}/{cut.n_texts} texts" if cut else ""
        click.echo(f"interrupted {done}; the same command continues", err=True)
        sys.exit(130)
    if as_json:
        print_json(run)
    else:
        click.echo(f"top contexts of {run.source}: {run.n_done}/{run.n_texts} texts through {run.model} "
                   f"(layer {run.params.get('layer')}), top {run.top} windows per concept of {run.atlas} by "
                   f"{run.scoring} ({run.status})")
