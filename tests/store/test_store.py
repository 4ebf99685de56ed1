"""The store on a real SQLite file and real FAISS index: atlases, concepts, search, integrity."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select

from engine.errors import (
    AtlasError,
    BadNameError,
    DuplicateError,
    IndexIntegrityError,
    NotFoundError,
    ShapeError,
    StoreNotFoundError,
    StoreOutdatedError,
)
from engine.store import migrate
from engine.store.schema import AtlasRow, ConceptRow
from engine.store.store import AtlasSource, Store
from engine.util import check_name, unit_rows
from tests.conftest import clustered_directions

pytestmark = pytest.mark.backends("sqlite", "postgresql")


def _add(store, name="a", n=60, d=16, **kw):
    x = clustered_directions(n, d, seed=2)
    labels = [f"concept {i}" if i % 3 else None for i in range(n)]
    site = {k: kw.pop(k) for k in ("hook", "revision") if k in kw}
    return x, store.add_atlas(name, x, labels, source=AtlasSource(model="m", layer=2, **site), **kw)


def test_add_atlas_records_provenance_and_labels(store):
    x, info = _add(store, revision="abc123", hook="resid_pre")
    assert (info.name, info.model, info.layer, info.hook, info.dim, info.n_concepts) == ("a", "m", 2, "resid_pre", 16, 60)
    assert info.n_labelled == 40 and info.revision == "abc123"
    c0, c1 = store.concept("a/0"), store.concept(1, atlas="a")
    assert (c0.label, c0.labelled) == ("0", False)  # unlabelled keeps its index as label
    assert (c1.label, c1.labelled) == ("concept 1", True)
    np.testing.assert_array_equal(store.atlas_vectors("a"), x)
    assert store.get_model("m").d_model == 16
    store.add_model("m", extra={"kind": "masked"})
    assert store.model_extra("m") == {"kind": "masked"} and store.model_extra("nope") == {}


def test_search_matches_exact_cosine(store):
    x, _ = _add(store)
    q = np.random.default_rng(5).normal(size=(7, 16)).astype(np.float32)
    hits = store.search_vectors("a", q * 3.0, k=5)  # scale does not matter: cosine
    exact = unit_rows(q) @ unit_rows(x).T
    for row, h in zip(exact, hits):
        np.testing.assert_allclose([x.score for x in h], np.sort(row)[::-1][:5], atol=1e-5)
        assert [x.rank for x in h] == [1, 2, 3, 4, 5]
        for hit in h:
            assert abs(row[hit.ordinal] - hit.score) < 1e-5


def test_neighbors_exclude_the_concept_itself(store):
    x, _ = _add(store)
    hits = store.neighbors("a/4", k=5)
    assert len(hits) == 5 and all(h.ordinal != 4 for h in hits)
    sims = unit_rows(x) @ unit_rows(x)[4]
    sims[4] = -np.inf
    assert hits[0].ordinal == int(np.argmax(sims))


def test_errors_are_named_and_say_the_fix(store, tmp_path):
    _add(store)
    with pytest.raises(DuplicateError, match="exists"):
        _add(store)
    with pytest.raises(NotFoundError, match="atlas atlases"):
        store.atlas("nope")
    with pytest.raises(NotFoundError, match="ordinals run 0..59"):
        store.concept("a/99")
    with pytest.raises(ShapeError, match="3 labels for 60 vectors"):
        store.add_atlas("b", np.ones((60, 4)), ["x"] * 3, source=AtlasSource(model="m", layer=0))
    with pytest.raises(ShapeError, match="NaN"):
        store.add_atlas("b", np.full((2, 4), np.nan), source=AtlasSource(model="m", layer=0))
    with pytest.raises(ShapeError, match=r"needs \(n, 16\)"):
        store.search_vectors("a", np.ones((1, 15)), 3)
    with pytest.raises(StoreNotFoundError, match="atlas init"):
        Store.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="atlas init"):
        Store.open(tmp_path / "empty")


@pytest.mark.parametrize("name", ["a", "Layer-12_v1.0", "ü" * 100, "x" * 200])
def test_one_name_rule_accepts(name):
    check_name(name, "atlas")


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../evil", "a b", "tab\t", "x" * 201, "ü" * 101])
def test_one_name_rule_refuses_with_the_rule(store, name):
    with pytest.raises(BadNameError, match="bad atlas name") as e:
        check_name(name, "atlas")
    assert isinstance(e.value, AtlasError) and repr(name)[:40] in str(e.value) and "200 bytes" in str(e.value)
    with pytest.raises(BadNameError, match="bad atlas name"):
        store.add_atlas(name, np.ones((2, 4)), source=AtlasSource(model="m", layer=0))


def test_uninitialised_or_outdated_database_says_what_to_run(store):
    # A store at an older revision (0001) opened by this code asks for `atlas db upgrade`, which works.
    current = migrate.head_revision()
    assert current != "0001"
    migrate.downgrade(store.engine, "0001")
    with pytest.raises(StoreOutdatedError, match="atlas db upgrade"):
        Store.open(store.path)
    migrate.upgrade(store.engine)
    Store.open(store.path).close()
    # A database from a newer version than this code: upgrade the package.
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff-future'")
    with pytest.raises(StoreOutdatedError, match="upgrade concept-atlas"):
        Store.open(store.path)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{current}'")
    migrate.downgrade(store.engine, "base")
    with pytest.raises(StoreNotFoundError, match="not an initialised store"):
        Store.open(store.path)


def test_failed_import_leaves_no_atlas_and_no_files(store, monkeypatch):
    from engine.store import atlases as store_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store_mod, "insert", boom)  # fail inside the DB transaction, after files
    with pytest.raises(RuntimeError, match="disk full"):
        _add(store)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(AtlasRow)) == 0
        assert s.scalar(select(func.count()).select_from(ConceptRow)) == 0
    assert not any((store.path / "vectors").iterdir()) and not any((store.path / "indexes").iterdir())
    monkeypatch.undo()
    _add(store)  # the name is free again
    assert store.atlas("a").n_concepts == 60


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "stale"])
def test_damaged_index_is_detected_and_rebuild_restores_identical_results(store, damage):
    x, _ = _add(store)
    q = np.random.default_rng(9).normal(size=(5, 16)).astype(np.float32)
    before = store.search_vectors("a", q, 7)
    path = store.path / store.atlas_files("a")["index"]
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "delete":
        path.unlink()
    else:  # a valid index of other vectors: stale
        import indexes

        other = indexes.create_index(16, "Flat")
        other.add(unit_rows(x[:10]), np.arange(10))
        other.save(path)
    fresh = Store.open(store.path)  # a new process would see the damage on open
    status = fresh.verify_index("a")
    assert not status.ok and "atlas index rebuild a" in status.problem
    with pytest.raises(IndexIntegrityError, match="atlas index rebuild a"):
        fresh.search_vectors("a", q, 7)
    assert fresh.rebuild_index("a").ok
    assert Store.open(store.path).search_vectors("a", q, 7) == before


def test_corrupt_vector_file_cannot_be_rebuilt_and_says_so(store):
    _add(store)
    (store.path / store.atlas_files("a")["vectors"]).write_bytes(b"garbage")
    with pytest.raises(IndexIntegrityError, match="re-import"):
        store.rebuild_index("a")
    assert not store.verify_index("a").ok


def test_rebuild_with_another_spec(store):
    _add(store, n=300)
    status = store.rebuild_index("a", "HNSW16")
    assert status.ok and status.spec == "HNSW16"
    assert Store.open(store.path).atlas("a").index_spec == "HNSW16"


def test_remove_atlas_deletes_rows_and_files(store):
    _add(store)
    files = store.atlas_files("a")
    store.remove_atlas("a")
    assert store.atlases() == []
    assert not any((store.path / f).exists() for f in files.values())
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(ConceptRow)) == 0


@pytest.mark.backends("postgresql")
def test_postgres_writers_queue_on_the_store_lock_and_say_busy(store, monkeypatch):
    """On PostgreSQL a write transaction takes the store's advisory lock when it begins, like SQLite's
    BEGIN IMMEDIATE: another writer waits, then says the store is busy; readers never wait."""
    from sqlalchemy import text

    from engine.errors import StoreBusyError
    from engine.store import base

    monkeypatch.setattr(base, "BUSY_TIMEOUT_S", 0.5)
    other = Store.open(store.path)  # finds the database through the folder's database.json
    with store.session() as s:
        s.execute(text("SELECT 1"))  # the transaction has begun: the lock is held
        with pytest.raises(StoreBusyError, match="locked by another writer"):
            other.add_model("late", d_model=4)
        assert other.atlases() == []  # a reader does not wait
    other.add_model("late", d_model=4)  # the lock went with the transaction
    assert [m.name for m in store.models()] == ["late"]
    other.close()


def test_a_bulk_write_has_a_large_page_cache_and_gives_the_connection_its_own_back(tmp_path):
    from engine.store.base import BULK_CACHE_KIB, bulk_page_cache

    store = Store.init(tmp_path / "s")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA cache_size=-1234")
        with bulk_page_cache(conn):
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == -BULK_CACHE_KIB
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == -1234
        with pytest.raises(RuntimeError), bulk_page_cache(conn):
            raise RuntimeError("a failed write")
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == -1234
    store.close()
