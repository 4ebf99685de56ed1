"""What every part of the store stands on: the store's folder, its database engine and sessions.

`StoreBase` opens and creates stores (`init` / `open`, which refuse a missing or outdated
database with the command that fixes it) and hands out sessions that commit on success and roll
back on any error. The methods by concept are mixins over it (`engine.store.models`,
`engine.store.atlases`, `engine.store.maps`, `engine.store.runs`), put together as
`engine.store.store.Store`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, delete, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

import indexes
from engine.errors import (
    AtlasError,
    BadValueError,
    ReadOnlyStoreError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreOutdatedError,
)
from engine.store import layout, migrate, postgres
from engine.store.blocksums import BlockCheck
from engine.store.reads import StoreReads
from engine.store.schema import WriteClaimRow
from engine.store.sqlite_file import (  # noqa: F401 - re-exported: BUSY_TIMEOUT_S, store_is_writable
    BUSY_TIMEOUT_S,
    readonly_mode,
    sqlite_error,
    store_is_writable,
)
from engine.util import write_store_file

S = TypeVar("S", bound="StoreBase")

# Execution option naming how a transaction begins on SQLite: "IMMEDIATE" (the default on a writable
# store: the write lock is taken at BEGIN, so a read-then-write transaction can neither deadlock nor
# fail on a stale snapshot) or "DEFERRED" (read-only transactions: never wait for writers).
BEGIN_OPTION = "atlas_begin"


def _sqlite_connect(readonly: bool):
    def on_connect(dbapi_conn, _record) -> None:
        # The driver must not open transactions on its own: `_sqlite_begin` does, in the mode asked.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not readonly:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


# SQLite's page cache while a batch of label rows is written (KiB): feature_labels' concept_id index
# takes rows in random order, and with the default 2 MiB every insert past a few million rows reads
# its index pages back; 256 MiB keeps that index's pages in memory for the batch (10M rows into a
# 1M-concept store in 31 batches: 169 s -> 102 s, `benchmarks/bench_row_writes.py`; 1 GiB no better).
BULK_CACHE_KIB = 256 * 1024


@contextlib.contextmanager
def bulk_page_cache(conn: Connection) -> Iterator[None]:
    """A larger SQLite page cache on ``conn`` for one bulk write, the connection's own size after it
    (so a pooled connection does not keep the memory); a no-op on other databases."""
    if conn.dialect.name != "sqlite":
        yield
        return
    before = int(conn.exec_driver_sql("PRAGMA cache_size").scalar_one())
    conn.exec_driver_sql(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size={before}")


def _sqlite_begin(readonly: bool):
    def on_begin(conn) -> None:
        mode = "DEFERRED" if readonly else conn.get_execution_options().get(BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return on_begin


def _sqlite_error(ctx) -> AtlasError | None:
    url = ctx.engine.url if ctx.engine is not None else None
    db = (url.database or "the database") if url is not None else "the database"
    return sqlite_error(ctx.original_exception, db.removeprefix("file:").split("?")[0], BUSY_TIMEOUT_S)


def _translate_errors(ctx) -> AtlasError | None:
    return _sqlite_error(ctx)


def _postgres_begin(conn) -> None:
    if conn.get_execution_options().get(BEGIN_OPTION, "IMMEDIATE") == "IMMEDIATE":
        postgres.begin_write(conn, BUSY_TIMEOUT_S)


def _postgres_errors(ctx) -> AtlasError | None:
    return postgres.translate_error(ctx, BUSY_TIMEOUT_S)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (``None`` for other databases and in-memory ones)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database.removeprefix("file:").split("?")[0])


def make_engine(url: str, readonly: bool = False) -> Engine:
    """The SQLAlchemy engine of a store database.

    On SQLite: WAL journal, foreign keys on, a busy timeout of `BUSY_TIMEOUT_S`, transactions begun
    ``IMMEDIATE`` (see `BEGIN_OPTION`) and driver errors that are store states (locked, read-only,
    not a database) raised as `AtlasError`s. ``readonly`` opens the file with ``mode=ro`` (or
    ``immutable=1``: `readonly_mode`): no journal-mode change, every write refused with `ReadOnlyStoreError`.
    """
    path = sqlite_path(url)
    if path is not None:
        kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
        if readonly:
            url = f"sqlite:///file:{path.resolve()}?{readonly_mode(path)}&uri=true"
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_connect(readonly))
        event.listen(engine, "begin", _sqlite_begin(readonly))
        event.listen(engine, "handle_error", _translate_errors)
        return engine
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except (ImportError, ArgumentError) as e:  # a driver that is not installed, a database SQLAlchemy lacks
        raise BadValueError(f"cannot use the database {postgres.safe_url(url)} ({e}); for PostgreSQL give "
                            "postgresql+psycopg://... and pip install 'concept-atlas[postgres]'") from None
    if engine.dialect.name == "postgresql":
        event.listen(engine, "begin", _postgres_begin)
        event.listen(engine, "handle_error", _postgres_errors)
        postgres.wait_for_restarts(engine)
    return engine


def recorded_db_url(root: Path) -> str | None:
    """The database URL recorded in a store's folder by ``atlas init --db-url`` (None: the SQLite file)."""
    f = root / layout.DB_URL_FILE
    if not f.is_file():
        return None
    try:
        url = json.loads(f.read_text(encoding="utf-8"))["url"]
        make_url(url)
    except (OSError, ValueError, KeyError, TypeError, ArgumentError) as e:
        raise StoreCorruptError(f"{f} does not name a database ({type(e).__name__}: {e}); it should read "
                                '{"url": "postgresql+psycopg://user@host/db"}') from None
    return str(url)


def store_db_url(root: Path, db_url: str | None) -> str:
    """The database of the store at ``root``: ``db_url`` if given, else the one its folder records, else
    its SQLite file. A ``db_url`` that names another database than the recorded one is refused (the
    folder's files belong to the recorded one); it may add the password the record leaves out."""
    recorded = recorded_db_url(root)
    if db_url is None:
        return recorded or layout.sqlite_url(root)
    try:
        given = make_url(db_url)
    except (ArgumentError, ValueError):
        raise BadValueError(f"--db-url {db_url!r} is not a database URL; expected e.g. "
                            "postgresql+psycopg://user@host:5432/dbname or sqlite:///path/atlas.db") from None
    if recorded is not None and postgres.safe_url(given) != postgres.safe_url(recorded):
        raise BadValueError(f"the store at {root} keeps its metadata in {recorded}, not "
                            f"{postgres.safe_url(given)}; leave out --db-url (and ATLAS_DB_URL)")
    if given.get_backend_name() != "sqlite" and recorded is None and (root / layout.DB_FILE).is_file():
        raise BadValueError(f"the store at {root} keeps its metadata in {layout.DB_FILE}, not "
                            f"{postgres.safe_url(given)}; leave out --db-url (and ATLAS_DB_URL)")
    return db_url


def existing_store_db_url(root: Path, db_url: str | None) -> str:
    """`store_db_url` of a store that must exist: a missing folder or SQLite file is `StoreNotFoundError`."""
    hint = f"`atlas init --store {root}` creates one"
    if not root.is_dir():
        raise StoreNotFoundError(f"no store at {root}; {hint}")
    url = store_db_url(root, db_url)
    if sqlite_path(url) == (root / layout.DB_FILE).resolve() and not (root / layout.DB_FILE).is_file():
        raise StoreNotFoundError(f"{root} has no {layout.DB_FILE}; {hint}")
    return url


def _record_db_url(root: Path, url: str) -> None:
    """Record a non-SQLite database in the store's folder (without its password), once."""
    if make_url(url).get_backend_name() != "sqlite" and recorded_db_url(root) is None:
        data = json.dumps({"url": postgres.safe_url(url)}, indent=2) + "\n"
        write_store_file(root / layout.DB_URL_FILE, data.encode())


class StoreBase(StoreReads):
    """An opened store's folder and database. Use `init` to create one and `open` to open one.

    Its reads of atlases and concepts and the search of their indexes (`StoreReads`) run their SQL
    through `read`."""

    def __init__(self, path: Path, engine: Engine, readonly: bool = False) -> None:
        self.path = Path(path)
        self.engine = engine
        self.readonly = readonly
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}),
                                           expire_on_commit=False)
        # Loaded atlas indexes by (atlas, index checksum): see `engine.store.atlases`.
        self._indexes: dict[tuple[str, str], indexes.VectorIndex] = {}
        self._held_claims: set[str] = set()  # tokens `claim_token` took with ``hold``: released on close
        self._integrity_checked = False  # `check_integrity` ran (before this store's first write)
        self._blocks = BlockCheck()  # blocks of atlas files found intact (`engine.store.blocksums`)

    @classmethod
    def init(cls: type[S], path: str | Path, db_url: str | None = None) -> S:
        """Create the store's folders and bring its database to the newest schema revision."""
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            for d in layout.STORE_DIRS:
                (root / d).mkdir(exist_ok=True)
        except OSError as e:
            raise ReadOnlyStoreError(f"cannot create the store at {root} ({e.strerror}); pick a folder "
                                     "you can write") from None
        url = store_db_url(root, db_url)
        engine = make_engine(url)
        check_known_revision(engine, root)
        migrate.upgrade(engine, root=root)
        _record_db_url(root, url)
        return cls(root, engine)

    @classmethod
    def open(cls: type[S], path: str | Path, db_url: str | None = None, check_revision: bool = True) -> S:
        """Open an initialised store; raises if it is missing or at an older schema revision.

        A store this process cannot write (its database or folders read-only) is opened read-only:
        reads work, writes fail with `ReadOnlyStoreError`.
        """
        root = Path(path)
        hint = f"`atlas init --store {root}` creates one"
        url = existing_store_db_url(root, db_url)
        readonly = not store_is_writable(root, sqlite_path(url))
        engine = make_engine(url, readonly=readonly)
        if check_revision:
            current = check_known_revision(engine, root)
            head = migrate.head_revision()
            if current is None:
                raise StoreNotFoundError(f"{root} is not an initialised store; {hint}")
            if current != head:
                raise StoreOutdatedError(
                    f"the store database is at revision {current}, this version needs {head}; "
                    f"run `atlas db upgrade --store {root}`"
                )
        return cls(root, engine, readonly=readonly)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A database session that commits on success and rolls back on any error.

        On SQLite its transaction takes the write lock when it begins (``BEGIN IMMEDIATE``), so
        read-then-write logic in it is serialised with other writers; `read_session` is for reads.
        """
        with _committing(self._read_sessions if self.readonly else self._sessions) as s:
            yield s

    @contextlib.contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reads: it never waits for writers (WAL) and never takes the write lock."""
        with _committing(self._read_sessions) as s:
            yield s

    @property
    def dialect(self) -> str:
        return str(self.engine.dialect.name)

    def read(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement (``:name`` parameters): on SQLite on a pooled driver
        connection (its own implicit read transaction; SQLAlchemy's statement and result layers cost
        more than a short indexed query), elsewhere in a read session."""
        if self.engine.dialect.name != "sqlite":
            with self.read_session() as s:
                return [tuple(r) for r in s.execute(text(sql), dict(params or {})).all()]
        raw = self.engine.raw_connection()
        try:
            return list(raw.driver_connection.execute(sql, dict(params or {})).fetchall())  # type: ignore[union-attr]
        except sqlite3.Error as e:
            error = sqlite_error(e, str(sqlite_path(str(self.engine.url)) or "the database"), BUSY_TIMEOUT_S)
            if error is None:
                raise
            raise error from None
        finally:
            raw.close()

    def check_writable(self) -> None:
        """Raise `ReadOnlyStoreError` before a write on a store opened read-only, and `StoreCorruptError`
        on a SQLite database with damaged pages (`check_integrity`: once per opened store)."""
        if self.readonly:
            raise ReadOnlyStoreError(f"the store at {self.path} is read-only for this user (its database or "
                                     "folders cannot be written); writing needs write access")
        if not self._integrity_checked:
            self.check_integrity()
            self._integrity_checked = True

    def check_integrity(self) -> None:
        """SQLite's ``PRAGMA quick_check`` (every page and row read once, no index cross-check: about a
        read of the file), so a database whose pages are damaged refuses writes as its reads fail, instead
        of adding rows to it. A no-op on PostgreSQL, which checks its own pages."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}).connect() as conn:  # a reader: no lock
            found = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(3)")]
        if found != ["ok"]:
            problem = " ".join(" ".join(found).split())[:200]
            raise StoreCorruptError(f"{sqlite_path(str(self.engine.url)) or 'the database'} is not a readable store "
                                    f"database (damaged pages: {problem}); restore it from a backup, or move it "
                                    "away and `atlas init` a new store")

    def claim_token(self, hold: bool = False) -> str:
        """A new file token (`layout.new_token`) claimed by this process before any file is named with
        it: a committed ``write_claims`` row, so `Store.gc` keeps the token's files while this process
        lives, whatever its grace. Release it with `release_claim` once the files are committed (or
        removed); with ``hold`` it is released when the store closes (files a later commit claims)."""
        self.check_writable()
        token = layout.new_token()
        with self.session() as s:
            s.add(WriteClaimRow(token=token, host=layout.host_tag(), pid=os.getpid()))
        if hold:
            self._held_claims.add(token)
        return token

    def release_claim(self, *tokens: str) -> None:
        """Delete claims of this process, best effort: a row left behind (the database gone away) is
        removed by `Store.gc` once this process has ended."""
        if not tokens:
            return
        try:
            with self.session() as s:
                s.execute(delete(WriteClaimRow).where(WriteClaimRow.token.in_(tokens)))
        except Exception:  # noqa: BLE001 - cleanup after a commit or a failure must not raise
            pass

    @contextlib.contextmanager
    def claimed_token(self) -> Iterator[str]:
        """`claim_token`, released when the block ends (after its commit, or after its failure's cleanup)."""
        token = self.claim_token()
        try:
            yield token
        finally:
            self.release_claim(token)

    def close(self) -> None:
        """Release held claims, the database and the Milvus Lite folders inside the store (another
        process may then open them; Lite serves one process at a time)."""
        held, self._held_claims = self._held_claims, set()
        self.release_claim(*held)
        self.engine.dispose()
        root = self.path.resolve()
        for uri in indexes.milvus.open_uris():
            if uri.endswith(".db") and Path(uri).resolve().is_relative_to(root):
                indexes.milvus.release(uri)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _committing(factory: sessionmaker) -> Iterator[Session]:
    """A session of ``factory`` that commits when the block ends and rolls back on any error."""
    with factory() as s:
        try:
            yield s
            s.commit()
        except BaseException:
            try:
                s.rollback()
            except Exception:  # noqa: BLE001 - a session the failure left unable to roll back (its
                pass  # connection gone, its commit done): the failure is the error to report
            raise


def check_known_revision(engine: Engine, root: Path) -> str | None:
    """The database's schema revision; a revision this version does not know is an error."""
    try:
        current = migrate.current_revision(engine)
    except AtlasError:
        raise
    except DBAPIError as e:
        raise StoreNotFoundError(f"cannot read the store database at {root}: {e.orig}") from None
    if current is not None and current not in migrate.known_revisions():
        raise StoreOutdatedError(
            f"the store database is at revision {current}, unknown to this version "
            f"(newest known: {migrate.head_revision()}); upgrade concept-atlas"
        )
    return current
