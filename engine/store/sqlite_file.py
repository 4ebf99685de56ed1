"""The store's SQLite file as the driver sees it, without SQLAlchemy: whether this process may write
it, how a read-only one is opened, and which driver errors are states of the store (locked,
read-only, not a database) with the one-line message that says what to do.

Shared by the store's engine (`engine.store.base.make_engine`) and the plain ``sqlite3`` reader of
the one-shot read commands (`engine.store.reader`), so both open and fail alike.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from engine.errors import (
    AtlasError,
    ReadOnlyStoreError,
    StoreBusyError,
    StoreCorruptError,
    StoreNotFoundError,
)
from engine.store import layout

# How long a writer waits for another's write lock before giving up with `StoreBusyError`. Write
# transactions are short (files are written before them), so a wait this long means a stuck writer.
BUSY_TIMEOUT_S = 60.0


def sqlite_error(orig: BaseException, db: str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> AtlasError | None:
    """Driver errors that are states of the store, not bugs: one-line `AtlasError`s saying what to do."""
    if not isinstance(orig, sqlite3.Error) or isinstance(orig, sqlite3.IntegrityError):
        return None
    code = getattr(orig, "sqlite_errorname", "") or ""
    msg = str(orig)
    if code.startswith("SQLITE_BUSY") or code.startswith("SQLITE_LOCKED") or "is locked" in msg:
        return StoreBusyError(f"{db} stayed locked by another writer for {busy_timeout_s:.0f} s ({msg}); "
                              "try again when it has finished")
    if code.startswith("SQLITE_READONLY") or "readonly database" in msg:
        return ReadOnlyStoreError(f"{db} is read-only ({msg}); writing needs write access to it and its folder")
    if code in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in msg or "malformed" in msg:
        return StoreCorruptError(f"{db} is not a readable store database ({msg}); restore it from a backup, "
                                 "or move it away and `atlas init` a new store")
    if code.startswith("SQLITE_CANTOPEN") or "unable to open" in msg:
        return StoreNotFoundError(f"cannot open {db} ({msg}); check that it exists and its folder is readable")
    if code.startswith("SQLITE_FULL") or "disk is full" in msg:
        return AtlasError(f"cannot write {db}: the disk is full; free space and retry")
    if code.startswith("SQLITE_IOERR") or "disk I/O error" in msg:
        return StoreCorruptError(f"cannot read or write {db} ({msg}); check the disk and the file")
    return None


def store_is_writable(root: Path, db_file: Path | None) -> bool:
    """Whether this process can write the store's database and create files next to it (SQLite's
    WAL and lock files). A store that is not writable is opened read-only."""
    folders = [root / d for d in layout.STORE_DIRS if (root / d).is_dir()]
    if db_file is not None:
        if db_file.exists() and not os.access(db_file, os.W_OK):
            return False
        folders.append(db_file.parent)
    return all(os.access(f, os.W_OK) for f in folders)


def readonly_mode(db_file: Path) -> str:
    """How a read-only store's SQLite file is opened: ``mode=ro``; or, where its folder cannot be written
    and it was closed cleanly (no ``-wal`` holding commits), ``immutable=1``: SQLite then reads the file
    as it is, without the ``-shm`` file that ``mode=ro`` would need to create and cannot there. (It
    assumes nobody writes the store meanwhile: a writer, of another user, would need that folder for its
    ``-wal``; a store handed out read-only is not being written.)"""
    wal = Path(f"{db_file}-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    if not os.access(db_file.parent, os.W_OK) and not has_wal and not Path(f"{db_file}-shm").exists():
        return "immutable=1"
    return "mode=ro"
