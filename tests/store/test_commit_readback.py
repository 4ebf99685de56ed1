"""A write whose commit fails keeps or removes its files by what the database holds, not by the error.

A connection that drops as a COMMIT returns leaves the writer unsure whether it landed
(`ConnectionLostError`). `add_atlas` (and `rebuild_index`) read back whether their row committed
before removing the files they wrote: a committed row keeps its files (the import is done, only its
answer was lost), a row that did not commit has its files removed, and a database that cannot say
keeps them (`atlas gc` removes them later if no row claims them). The faults are injected at the
commit through the session's own events, so each case is deterministic; on PostgreSQL a server-side
termination of the connection before its COMMIT is the real drop.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import event

from engine.errors import ConnectionLostError
from engine.store.base import BEGIN_OPTION
from engine.store.schema import AtlasRow
from engine.store.store import AtlasSource, Store
from tests.conftest import clustered_directions

pytestmark = pytest.mark.backends("sqlite", "postgresql")


def _owned_files(store: Store, name: str) -> list[str]:
    return sorted(str(p.relative_to(store.path)) for d in ("vectors", "indexes") for p in (store.path / d).glob(f"{name}@*"))


def _fail_commit_of_atlas(store: Store, when: str) -> dict[str, int]:
    """Make the commit of the session that writes an atlas row raise `ConnectionLostError` once, ``when``
    "after" it landed (the answer lost) or "before" it (nothing committed); returns the fault's count."""
    fired = {"n": 0}
    flushed: set[int] = set()

    @event.listens_for(store._sessions, "after_flush")
    def saw(session, _ctx):
        if any(isinstance(o, AtlasRow) for o in session.new) or any(isinstance(o, AtlasRow) for o in session.dirty):
            flushed.add(id(session))

    @event.listens_for(store._sessions, f"{when}_commit")
    def fault(session):
        if id(session) in flushed and not fired["n"]:
            fired["n"] += 1
            flushed.discard(id(session))
            raise ConnectionLostError("injected: the server closed the connection as the transaction committed")

    return fired


def test_an_import_whose_commit_landed_keeps_its_files_and_succeeds(store):
    """The answer to the COMMIT is lost, the commit is not: the import reads its row back and is done."""
    x = clustered_directions(200, 16, seed=1)
    fired = _fail_commit_of_atlas(store, "after")
    info = store.add_atlas("a", x, source=AtlasSource(model="x", layer=1))
    assert fired["n"] == 1 and info.n_concepts == 200
    files = store.atlas_files("a")
    assert sorted([files["vectors"], files["index"]]) == _owned_files(store, "a")
    fresh = Store.open(store.path)
    assert fresh.verify_index("a").ok and np.array_equal(fresh.atlas_rows("a", [7]), x[[7]])
    assert fresh.verify().ok  # no leftover, nothing missing


def test_an_import_whose_commit_did_not_land_removes_its_files(store):
    fired = _fail_commit_of_atlas(store, "before")
    with pytest.raises(ConnectionLostError):
        store.add_atlas("a", clustered_directions(200, 16, seed=1), source=AtlasSource(model="x", layer=1))
    assert fired["n"] == 1 and _owned_files(store, "a") == []
    assert [a.name for a in Store.open(store.path).atlases()] == []


def test_an_import_that_cannot_read_back_keeps_its_files_for_gc(store):
    """The commit landed and the database is still away when the import asks: its files are kept (a
    row claims them), and the error says to run the command again."""
    fired = _fail_commit_of_atlas(store, "after")

    @event.listens_for(store._read_sessions, "after_begin")
    def away(*_args):
        if fired["n"]:  # from the commit's fault on
            raise ConnectionLostError("injected: the server is still away")

    with pytest.raises(ConnectionLostError):
        store.add_atlas("a", clustered_directions(200, 16, seed=1), source=AtlasSource(model="x", layer=1))
    assert fired["n"] == 1
    fresh = Store.open(store.path)
    assert fresh.verify_index("a").ok and fresh.verify().ok  # committed, and every file it claims is there


def test_a_rebuild_whose_commit_landed_keeps_its_new_index(store):
    x = clustered_directions(200, 16, seed=1)
    store.add_atlas("a", x, source=AtlasSource(model="x", layer=1))
    before = [h.ordinal for h in store.neighbors("a/3", k=5)]
    fired = _fail_commit_of_atlas(store, "after")
    status = store.rebuild_index("a", spec="HNSW16")
    assert fired["n"] == 1 and status.ok and status.spec.startswith("HNSW16")
    fresh = Store.open(store.path)
    assert fresh.verify().ok and [h.ordinal for h in fresh.neighbors("a/3", k=5)] == before


@pytest.mark.backends("postgresql")  # a server-side termination
def test_postgres_connection_dropped_before_commit_removes_the_import(store):
    """A real drop: the server terminates the import's connection just before its COMMIT."""
    flushed: set[int] = set()

    @event.listens_for(store._sessions, "after_flush")
    def saw(session, _ctx):
        if any(isinstance(o, AtlasRow) for o in session.new):
            flushed.add(id(session))

    @event.listens_for(store._sessions, "before_commit")
    def drop(session):
        if id(session) in flushed:
            flushed.discard(id(session))
            pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with store.engine.execution_options(**{BEGIN_OPTION: "DEFERRED"}).connect() as other:  # no write lock
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")

    with pytest.raises(ConnectionLostError):
        store.add_atlas("a", clustered_directions(200, 16, seed=1), source=AtlasSource(model="x", layer=1))
    assert _owned_files(store, "a") == [] and Store.open(store.path).atlases() == []
