"""Store commands: init, db, atlases, import, lookup, neighbors, show, index."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import store_options


def register(cli: click.Group) -> None:
    cli.add_command(init)


@click.command()
@store_options
def init(store_dir: Path, db_url: str | None) -> None:
    """Create a store: folders and a database at the newest schema revision."""
    from engine.store import Store

    Store.init(store_dir, db_url=db_url)
    click.echo(f"initialised store at {store_dir}")
