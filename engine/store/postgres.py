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

A server restart (or failover) is survived where that is safe: a pooled connection the server
dropped is replaced (SQLAlchemy's pre-ping), a new connection waits for a restarting server
(`wait_for_restarts`), and a transaction the drop cut off fails with `ConnectionLostError`; a
labelling step retries it (`engine.store.passes`: the guarded advance of ``n_done`` tells whether
it had committed), other writes stop with that one-line error and are run again.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from engine.errors import (
    AtlasError,
    ConnectionLostError,
    ReadOnlyStoreError,
    StoreBusyError,
    StoreNotFoundError,
)

# The advisory lock key of a store's write transactions (any constant: one store per database).
WRITE_LOCK = 0x41544C53  # "ATLS"
# How long new connections wait for a server that restarts (`wait_for_restarts`).
RECONNECT_S = 30.0


def begin_write(conn: Any, timeout_s: float) -> None:
    """Take the store's write lock in the transaction that ``conn`` begins (released at its end)."""
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")


def wait_for_restarts(engine: Any, wait_s: float = RECONNECT_S) -> None:
    """Make ``engine``'s new connections wait up to ``wait_s`` for a server that is restarting.

    A server that answers that it is starting up or shutting down (SQLSTATE 57P03) is waited for;
    a refused connection is too, once this process has been connected to the server (the server
    it was talking to went away: a restart). A first connection that is refused fails at once (a
    wrong URL, a server not started), as it would without this.
    """
    server = safe_url(engine.url)

    def connect(dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                conn = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as e:
                if not _restarting(e, server in _CONNECTED) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            _CONNECTED.add(server)
            return conn

    event.listen(engine, "do_connect", connect)


_CONNECTED: set[str] = set()  # the servers (URLs without password) this process has been connected to
# what a server that restarts answers a new connection (libpq's connection errors carry no SQLSTATE)
_RESTARTING = ("the database system is starting up", "the database system is shutting down",
               "the database system is in recovery mode", "the database system is not yet accepting connections")


def _restarting(e: Exception, was_connected: bool) -> bool:
    """Whether a connection error ``e`` says the server is restarting (worth waiting for)."""
    code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None) or ""
    msg = str(e)
    if code == "57P03" or any(m in msg for m in _RESTARTING):
        return True
    return was_connected and not code  # refused, reset: the server this process used went away


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
    if ctx.connection is not None and (ctx.is_disconnect or code.startswith("08") or code == "57P01"):
        return ConnectionLostError(f"the database server of {where} closed the connection in a transaction "
                                   f"({first}); it restarted or failed over: run the command again")
    if ctx.is_disconnect or code.startswith("08") or (not code and ctx.connection is None):
        return StoreNotFoundError(f"cannot connect to the store database {where} ({first}); check that the "
                                  "server is running and the URL")
    return None
