"""models.source_kind: model sources recorded relative to the store root

A store must work from any folder and after it is copied or moved (docs/design.md §3). A model
folder inside the store is now recorded relative to the store root (``source_kind = 'store'``),
any other folder as an absolute path (``'path'``), a hub id as given (``'hub'``). Earlier versions
recorded ConceptWorld's models as ``<store path as opened>/models/world-…/<model>``, relative to
the working directory of the time when the store was opened by a relative path; those rows, and
absolute paths under the store's root, are rewritten relative to the root. The world's
``world_path`` (now the source's parent) leaves the models' ``extra``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# <anything>/models/world-<size>-<fingerprint>/<model key>: a ConceptWorld model the store built
_WORLD_MODEL = re.compile(r"(?:^|[\\/])(models[\\/]world-[^\\/]+[\\/][^\\/]+)[\\/]?$")


def _store_root(conn: sa.engine.Connection) -> Path | None:
    """The store's folder: as passed by `engine.store.migrate` (any database), else the folder of the
    database where it is a SQLite file (unknown otherwise)."""
    cfg = op.get_context().config
    root = cfg.attributes.get("store_root") if cfg is not None else None
    if root is not None:
        return Path(root)
    url = conn.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).resolve().parent


def _classify(source: str, root: Path | None) -> tuple[str, str]:
    m = _WORLD_MODEL.search(source)
    p = Path(source).expanduser()
    outside = p.is_absolute() and p.exists() and (root is None or not p.resolve().is_relative_to(root))
    if m and not outside:  # a world the store built: under its root, whatever the path was relative to
        return m.group(1).replace("\\", "/"), "store"
    looks_local = os.path.isabs(source) or source.startswith((".", "~"))
    if not looks_local:
        return source, "hub"
    if root is not None and p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix(), "store"
        except ValueError:
            pass
    return str(p.resolve()) if not p.is_absolute() else str(p), "path"


def _extra(value: object) -> dict:
    if isinstance(value, str):
        return json.loads(value or "{}")
    return dict(value or {})


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_kind", sa.String(length=10), nullable=True))
    conn = op.get_bind()
    root = _store_root(conn)
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("source", sa.Text),
                      sa.column("source_kind", sa.String), sa.column("extra", sa.JSON))
    for id_, source, extra in conn.execute(sa.select(models.c.id, models.c.source, models.c.extra)).all():
        values: dict = {}
        if source:
            values["source"], values["source_kind"] = _classify(source, root)
        e = _extra(extra)
        if "world_path" in e:
            e.pop("world_path")
            values["extra"] = e
        if values:
            conn.execute(models.update().where(models.c.id == id_).values(**values))


def downgrade() -> None:
    conn = op.get_bind()
    root = _store_root(conn)
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("source", sa.Text),
                      sa.column("source_kind", sa.String))
    if root is not None:  # earlier versions read sources as given: make store-relative ones absolute
        rows = conn.execute(sa.select(models.c.id, models.c.source).where(models.c.source_kind == "store")).all()
        for id_, source in rows:
            conn.execute(models.update().where(models.c.id == id_).values(source=str(root / source)))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("source_kind")
