"""What every part of the store stands on: the store's folder, its database engine and sessions.

`StoreBase` opens and creates stores (`init` / `open`, which refuse a missing or outdated
database with the command that fixes it) and hands out sessions that commit on success and roll
back on any error. The methods by concept are mixins over it (`engine.store.models`,
`engine.store.atlases`, `engine.store.maps`, `engine.store.runs`), put together as
`engine.store.store.Store`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import indexes
from engine.errors import StoreNotFoundError, StoreOutdatedError
from engine.store import layout, migrate

S = TypeVar("S", bound="StoreBase")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class StoreBase:
    """An opened store's folder and database. Use `init` to create one and `open` to open one."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = Path(path)
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Loaded atlas indexes by (atlas, index checksum): see `engine.store.atlases`.
        self._indexes: dict[tuple[str, str], indexes.VectorIndex] = {}

    @classmethod
    def init(cls: type[S], path: str | Path, db_url: str | None = None) -> S:
        """Create the store's folders and bring its database to the newest schema revision."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for d in layout.STORE_DIRS:
            (root / d).mkdir(exist_ok=True)
        engine = make_engine(db_url or layout.sqlite_url(root))
        migrate.upgrade(engine)
        return cls(root, engine)

    @classmethod
    def open(cls: type[S], path: str | Path, db_url: str | None = None, check_revision: bool = True) -> S:
        """Open an initialised store; raises if it is missing or at an older schema revision."""
        root = Path(path)
        hint = f"`atlas init --store {root}` creates one"
        if not root.is_dir():
            raise StoreNotFoundError(f"no store at {root}; {hint}")
        if db_url is None and not (root / layout.DB_FILE).is_file():
            raise StoreNotFoundError(f"{root} has no {layout.DB_FILE}; {hint}")
        engine = make_engine(db_url or layout.sqlite_url(root))
        if check_revision:
            try:
                current = migrate.current_revision(engine)
            except OperationalError as e:
                raise StoreNotFoundError(f"cannot read the store database at {engine.url}: {e.orig}") from None
            head = migrate.head_revision()
            if current is None:
                raise StoreNotFoundError(f"{root} is not an initialised store; {hint}")
            if current != head:
                if current in migrate.known_revisions():
                    raise StoreOutdatedError(
                        f"the store database is at revision {current}, this version needs {head}; "
                        f"run `atlas db upgrade --store {root}`"
                    )
                raise StoreOutdatedError(
                    f"the store database is at revision {current}, unknown to this version "
                    f"(newest known: {head}); upgrade concept-atlas"
                )
        return cls(root, engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A database session that commits on success and rolls back on any error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
