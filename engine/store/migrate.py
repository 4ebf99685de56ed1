"""Run the Alembic migrations of ``migrations/`` programmatically.

The migrations ship inside the package, so ``atlas db upgrade`` works from a non-editable
install; the connection is passed to ``env.py`` through ``config.attributes``.

Every store open asks which revision its database is at and which revisions this version knows.
Those answers are read without Alembic (importing it and loading its script directory costs
more than the rest of a lookup): the revision ids from the migration files' own ``revision`` /
``down_revision`` lines, the database's from Alembic's version table. Alembic is imported only
to change a schema (`upgrade`, `downgrade`); a test checks both readings agree with Alembic's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from engine.errors import BadValueError
from engine.store.revisions import (  # noqa: F401 - re-exported: callers ask migrate
    SCRIPT_LOCATION,
    VERSION_TABLE,
    head_revision,
    known_revisions,
    revision_graph,
)

if TYPE_CHECKING:
    from alembic.config import Config


def _config(engine: Engine | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def current_revision(engine: Engine) -> str | None:
    """The database's revision (None for a database no migration has run on)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        versions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(versions) > 1:
        raise BadValueError(f"the store database has several schema heads {sorted(versions)}; "
                            "`atlas db current` shows them")
    return versions[0] if versions else None


def upgrade(engine: Engine, revision: str = "head", root: Path | None = None) -> None:
    """Bring the database to ``revision``; ``root`` is the store's folder (see `_run`)."""
    from alembic import command

    _run(command.upgrade, engine, revision, root)


# Tables whose rows a downgrade can lose (to `base`: all of them), and how `stored_objects` names them.
_COUNTED = {"atlases": "atlas(es)", "alignment_maps": "map(s)", "label_runs": "labelling run(s)",
            "context_runs": "context run(s)", "models": "model(s)"}


def stored_objects(engine: Engine) -> dict[str, int]:
    """How many atlases, maps, runs and models the database holds (tables it lacks are left out)."""
    out = {}
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        for table, what in _COUNTED.items():
            if table in tables:
                out[what] = int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)
    return out


def downgrade(engine: Engine, revision: str, root: Path | None = None) -> None:
    """Take the database back to ``revision``: tables and columns newer than it are dropped, with
    their data (`base`: every table). Callers ask first (`atlas db downgrade` needs ``--yes``)."""
    from alembic import command

    _run(command.downgrade, engine, revision, root)


def _run(step: Callable[[Config, str], None], engine: Engine, revision: str, root: Path | None = None) -> None:
    """Run a migration step in one transaction. Revisions that rewrite paths relative to the store
    find its folder in ``config.attributes["store_root"]`` (on SQLite they may also take it from
    the database file's folder; on PostgreSQL only from there). On SQLite, foreign keys are off while it runs:
    batch mode changes a table by copying it and dropping the old one, which a referenced table
    (models, atlases) would refuse; SQLite only takes that pragma outside a transaction."""
    from alembic.util import CommandError

    sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as conn:
            # on the driver's connection: through SQLAlchemy the pragma would open a transaction first
            raw = conn.connection.driver_connection if sqlite else None
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    cfg = _config(engine)
                    cfg.attributes["connection"] = conn
                    cfg.attributes["store_root"] = Path(root).resolve() if root is not None else None
                    step(cfg, revision)
            finally:
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys=ON")
    except CommandError as e:  # an unknown revision, a downgrade past base
        raise BadValueError(f"{e}; `atlas db current` shows the revisions") from None
