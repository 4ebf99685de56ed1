"""Setting a store up: init, db (schema migrations), models (the model registry)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from engine.cli.common import emit, json_option, open_store, print_json, store_options
from engine.errors import BadValueError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from engine.models.loading import ModelKind


def register(cli: click.Group) -> None:
    for cmd in (init, db, models):
        cli.add_command(cmd)


@click.command()
@store_options
@json_option
def init(store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Create a store: its folders and a database at the newest schema revision.

    Running it on an existing store is safe: it only upgrades the database if needed. With
    --db-url (e.g. postgresql+psycopg://user@host/db, the `postgres` extra) the metadata lives in
    that database and the folder records it (database.json, without a password), so later commands
    on the folder need no --db-url; the files (vectors, indexes, maps) stay in the folder.
    """
    from engine.store import migrate
    from engine.store.store import Store

    store = Store.init(store_dir, db_url=db_url)
    result = {"store": str(store_dir), "db": str(store.engine.url), "revision": migrate.current_revision(store.engine)}
    if as_json:
        print_json(result)
    else:
        where = "" if store.engine.dialect.name == "sqlite" else f"metadata in {result['db']}, "
        click.echo(f"initialised store at {store_dir} ({where}schema revision {result['revision']})")


# ---------------------------------------------------------------------- db


@click.group()
def db() -> None:
    """Database schema migrations (Alembic): upgrade, current, downgrade."""


def _raw_engine(store_dir: Path, db_url: str | None) -> Engine:
    from engine.store.base import existing_store_db_url, make_engine

    return make_engine(existing_store_db_url(store_dir, db_url))


@db.command("upgrade")
@click.argument("revision", default="head")
@store_options
def db_upgrade(revision: str, store_dir: Path, db_url: str | None) -> None:
    """Upgrade the store database to REVISION (default: the newest, head)."""
    from engine.store import migrate

    engine = _raw_engine(store_dir, db_url)
    migrate.upgrade(engine, revision, root=store_dir)
    click.echo(f"database at revision {migrate.current_revision(engine)}")


@db.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Downgrade: without it the command only says what it would drop.")
@store_options
def db_downgrade(revision: str, yes: bool, store_dir: Path, db_url: str | None) -> None:
    """Downgrade the store database to REVISION, dropping the tables and columns newer than it with
    their data (`base` removes every table: every atlas, map and run). Asks for --yes."""
    from engine.store import migrate
    from engine.store.base import check_known_revision

    engine = _raw_engine(store_dir, db_url)
    check_known_revision(engine, store_dir)
    if not yes:
        held = ", ".join(f"{n} {what}" for what, n in migrate.stored_objects(engine).items() if n) or "no data yet"
        raise BadValueError(f"a downgrade to {revision} drops the schema newer than it and that data (this store "
                            f"holds {held}); run it again with --yes to downgrade")
    migrate.downgrade(engine, revision, root=store_dir)
    click.echo(f"database at revision {migrate.current_revision(engine) or 'base'}")


@db.command("current")
@store_options
@json_option
def db_current(store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Show the database's schema revision and the newest one this version knows."""
    from engine.store import migrate

    engine = _raw_engine(store_dir, db_url)
    current, head = migrate.current_revision(engine), migrate.head_revision()
    emit({"current": current, "head": head, "up_to_date": current == head}, as_json)


# ---------------------------------------------------------------------- models


MODEL_COLUMNS = ["name", "kind", "architecture", "d_model", "n_layers", "source_kind", "source"]


@click.group(invoke_without_command=True)
@store_options
@json_option
@click.pass_context
def models(ctx: click.Context, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """List the models registered in the store; add, show or remove one.

    A model is registered from a local folder or a hub id (`atlas models add`); its source is
    recorded relative to the store when the folder is inside it, so the store can be moved.
    """
    if ctx.invoked_subcommand is None:
        emit(open_store(store_dir, db_url).models(), as_json, MODEL_COLUMNS)


@models.command("add")
@click.argument("name")
@click.option("--source", required=True, metavar="PATH|HUB_ID", help="Local folder (config, tokenizer, weights) or hub id.")
@click.option("--kind", type=click.Choice(["causal", "encoder"]), default="causal", show_default=True,
              help="causal: a language model with its LM head; encoder: a bare encoder (BERT-style).")
@click.option("--revision", help="Hub revision (commit or tag).")
@click.option("--layer-module", help="Attribute path of the block list, for architectures not known (e.g. model.layers).")
@store_options
@json_option
def models_add(name: str, source: str, kind: ModelKind, revision: str | None, layer_module: str | None,
               store_dir: Path, db_url: str | None,
               as_json: bool) -> None:
    """Register SOURCE as model NAME: architecture, width, depth and tokenizer from its config and
    tokenizer files (no weights are loaded). NAME already registered is re-pointed at SOURCE when
    SOURCE is the same model (weights that moved)."""
    from engine.models.registry import register_model

    emit(register_model(open_store(store_dir, db_url), name, source, kind=kind, revision=revision,
                        layer_module=layer_module), as_json)


@models.command("show")
@click.argument("name")
@store_options
@json_option
def models_show(name: str, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Show a registered model: source, architecture, width, depth, tokenizer, and what uses it."""
    import dataclasses

    from engine.models.registry import model_details

    d = model_details(open_store(store_dir, db_url), name)
    out = {**dataclasses.asdict(d.info), "source_found": d.source_found, "atlases": ", ".join(d.atlases),
           "maps": ", ".join(d.maps)}
    emit(out if not as_json else {**out, "atlases": d.atlases, "maps": d.maps}, as_json)


@models.command("remove")
@click.argument("name")
@store_options
def models_remove(name: str, store_dir: Path, db_url: str | None) -> None:
    """Forget model NAME (its row; the weights are left alone). Refused while an atlas or map uses it."""
    from engine.models.registry import remove_model

    remove_model(open_store(store_dir, db_url), name)
    click.echo(f"removed model {name}")
