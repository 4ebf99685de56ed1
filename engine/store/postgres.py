"""A store's metadata on PostgreSQL: what makes the engine behave as it does on SQLite.

Why a lock per write transaction: on SQLite every write transaction takes the database's one write
lock when it begins (``BEGIN IMMEDIATE``, `engine.store.base`), so the store's read-then-write logic
(claim a name, advance a run's ``n_done``) is serialised with other writers and never fails on a
stale read. PostgreSQL has row locks and no such lock, so a write transaction takes a
transaction-scoped advisory lock (`WRITE_LOCK`) first: writers queue as they do on SQLite, readers
never wait. The wait is bounded by ``lock_timeout`` and ends in `StoreBusyError`, as SQLite's busy
timeout does. One database holds one store (its tables are not namespaced), so one lock key suffices.

Driver errors that are states of the database (cannot connect, lock wait timed out, read-only, disk
full) become one-line `AtlasError`s; constraint violations stay `IntegrityError`s for the store's
logic to handle. Errors are told apart by SQLSTATE, so any PostgreSQL driver works.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from engine.errors import AtlasError, ReadOnlyStoreError, StoreBusyError, StoreNotFoundError

# The advisory lock key of a store's write transactions (any constant: one store per database).
WRITE_LOCK = 0x41544C53  # "ATLS"


def begin_write(conn: Any, timeout_s: float) -> None:
    """Take the store's write lock in the transaction that ``conn`` begins (released at its end)."""
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")


def analyze(engine: Any, *tables: str) -> None:
    """Refresh the planner's statistics of ``tables`` after a bulk write: autovacuum would within a
    minute, and until then the planner may scan a table instead of using its GIN index. Called after
    the write committed, so a failure here loses nothing and is not the write's: it is ignored."""
    try:
        with engine.connect() as conn:
            for t in tables:
                conn.exec_driver_sql(f"ANALYZE {t}")
            conn.commit()
    except (DBAPIError, AtlasError):
        pass


def safe_url(url: str | URL) -> str:
    """The URL without its password: what is shown in messages and recorded in a store's folder."""
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)  # set() keeps a None


def translate_error(ctx: Any, timeout_s: float) -> AtlasError | None:
    """A `handle_error` listener's answer for PostgreSQL: the store-state errors as `AtlasError`s."""
    if ctx.is_pre_ping:  # a pooled connection the server dropped (a restart): SQLAlchemy opens a new one
        return None
    orig = ctx.original_exception
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    where = safe_url(ctx.engine.url) if ctx.engine is not None else "the database"
    if code == "55P03":  # lock_not_available: lock_timeout passed
        return StoreBusyError(f"the store database {where} stayed locked by another writer for "
                              f"{timeout_s:.0f} s; try again when it has finished")
    if code == "25006":  # read_only_sql_transaction (a hot standby, default_transaction_read_only)
        return ReadOnlyStoreError(f"the store database {where} is read-only ({first}); writing needs a "
                                  "writable primary server")
    if code in ("53100", "53200"):  # disk_full, out_of_memory
        return AtlasError(f"the database server of {where} cannot write ({first}); free space and retry")
    if code == "3D000":  # invalid_catalog_name: the database does not exist
        return StoreNotFoundError(f"the database of {where} does not exist ({first}); create it "
                                  "(createdb) and `atlas init --db-url ...`")
    if code.startswith("28"):  # invalid authorisation: a wrong user or password
        return StoreNotFoundError(f"cannot log in to {where} ({first}); check the user, and the password in "
                                  "PGPASSWORD or ~/.pgpass")
    if ctx.is_disconnect or code.startswith("08") or (not code and ctx.connection is None):
        return StoreNotFoundError(f"cannot connect to the store database {where} ({first}); check that the "
                                  "server is running and the URL")
    return None
