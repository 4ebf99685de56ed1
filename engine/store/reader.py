"""A store read through a bare ``sqlite3`` connection: the one-shot read commands' way in.

Why: ``atlas show``, ``neighbors`` and ``lookup`` run as whole processes, and on a store of a
million concepts most of such a run was Python importing SQLAlchemy (~0.2 s) and setting up its
engine, for a few SELECTs (issue 26). `StoreReader` holds the store's reads
(`engine.store.reads.StoreReads`: the same queries the `Store` runs, written once) over a
``sqlite3`` connection, and imports neither SQLAlchemy nor the ORM schema.

It opens the store folder's own SQLite database only (`open_reader`): a store whose metadata lives
elsewhere (``database.json``, PostgreSQL) or a database not at the current schema revision gives
``None``, and the caller opens the full `Store`, which serves it or refuses it with its own message.
A read-only store is opened as `Store.open` opens it (`engine.store.sqlite_file.readonly_mode`), and
driver errors that are states of the store become the same one-line messages. The one write a read
can make, caching the new stamp of a file whose full checksum was just checked (a copied store),
is handed to a full `Store` opened for it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from engine.store import layout
from engine.store.blocksums import BlockCheck
from engine.store.reads import StoreReads
from engine.store.revisions import VERSION_TABLE, head_revision
from engine.store.sqlite_file import BUSY_TIMEOUT_S, readonly_mode, sqlite_error, store_is_writable
from engine.util import FileStamp


class StoreReader(StoreReads):
    """The reads of a store whose metadata is its folder's SQLite file, over ``sqlite3``."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn = conn
        self._indexes = {}
        self._blocks = BlockCheck()  # blocks of atlas files found intact (`engine.store.blocksums`)

    @property
    def dialect(self) -> str:
        return "sqlite"

    def read(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, dict(params or {})).fetchall()
        except sqlite3.Error as e:
            error = sqlite_error(e, str(self.path / layout.DB_FILE))
            if error is None:
                raise
            raise error from None

    def _remember_stamp(self, name: str, kind: str, path: Path, stamp: FileStamp) -> None:
        from engine.store.store import Store

        with Store.open(self.path) as store:
            store._remember_stamp(name, kind, path, stamp)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(root: Path) -> StoreReader | None:
    """A `StoreReader` of the store at ``root``, or ``None`` where the full `Store` must open it: no
    store there, metadata kept in another database (``database.json``), or a database that is not at
    this version's schema revision (or not readable): `Store.open` says what is wrong."""
    root = Path(root)
    db = root / layout.DB_FILE
    if (root / layout.DB_URL_FILE).exists() or not db.is_file():
        return None
    readonly = not store_is_writable(root, db.resolve())
    mode = readonly_mode(db) if readonly else "mode=rw"
    try:
        conn = sqlite3.connect(f"file:{quote(str(db.resolve()))}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        current = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
    except sqlite3.Error:
        current = []
    if current != [(head_revision(),)]:
        conn.close()
        return None
    return StoreReader(root, conn, readonly)
