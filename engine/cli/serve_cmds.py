"""`atlas serve`: the HTTP API and the web explorer (engine.serve)."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import store_options
from engine.extras import require


def register(cli: click.Group) -> None:
    cli.add_command(serve)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="ATLAS_TOKEN", default=None,
              help="Secret every request must carry (header 'Authorization: Bearer TOKEN', or ?token=TOKEN once in "
                   "the browser). Required to bind a non-loopback address. Env: ATLAS_TOKEN.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@store_options
def serve(host: str, port: int, token: str | None, log_level: str, store_dir: Path, db_url: str | None) -> None:
    """Browse the store at http://127.0.0.1:8765: search, concepts, runs, explain, steer.

    The page and a JSON API (schema at /openapi.json, docs at /docs) over the same engine
    functions as these commands. Models load once, on the first explain or steer. Needs the
    `serve` extra: pip install -e ".[serve]".
    """
    require("serve", "atlas serve")
    from engine.serve.server import serve as run_server

    run_server(store_dir, db_url=db_url, host=host, port=port, token=token, log_level=log_level,
               announce=lambda line: click.echo(line, err=True))
