"""Run the Alembic migrations of ``migrations/`` programmatically.

The migrations ship inside the package, so ``atlas db upgrade`` works from a non-editable
install; the connection is passed to ``env.py`` through ``config.attributes``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Engine

import migrations
from engine.errors import BadValueError

SCRIPT_LOCATION = str(Path(migrations.__file__).parent)


def _config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def head_revision() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head", root: Path | None = None) -> None:
    """Bring the database to ``revision``; ``root`` is the store's folder (see `_run`)."""
    _run(command.upgrade, engine, revision, root)


def downgrade(engine: Engine, revision: str, root: Path | None = None) -> None:
    _run(command.downgrade, engine, revision, root)


def _run(step: Callable[[Config, str], None], engine: Engine, revision: str, root: Path | None = None) -> None:
    """Run a migration step in one transaction. Revisions that rewrite paths relative to the store
    find its folder in ``config.attributes["store_root"]`` (on SQLite they may also take it from
    the database file's folder; on PostgreSQL only from there). On SQLite, foreign keys are off while it runs:
    batch mode changes a table by copying it and dropping the old one, which a referenced table
    (models, atlases) would refuse; SQLite only takes that pragma outside a transaction."""
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
