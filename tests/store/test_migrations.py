"""Alembic: upgrade → downgrade → upgrade on a real SQLite file and a real PostgreSQL database; models
and migrations agree on both."""

from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from engine.align.map import save_map
from engine.store import migrate
from engine.store.schema import Base, include_object
from engine.store.store import AtlasSource, IndexPlacement, make_engine

pytestmark = pytest.mark.backends("sqlite", "postgresql")

TABLES = {"models", "atlases", "concepts", "alignment_maps", "label_runs", "feature_labels", "context_runs",
          "concept_contexts"}


def _full_text_objects(engine) -> set[str]:
    """The database's full-text objects outside the ORM: FTS5's table (SQLite); the GIN index, the
    text search configuration and its dictionary (PostgreSQL)."""
    if engine.dialect.name == "sqlite":
        return {t for t in inspect(engine).get_table_names() if t == "concepts_fts"}
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE indexname = 'concepts_fts_gin' "
            "UNION SELECT cfgname FROM pg_ts_config WHERE cfgname = 'atlas_english' "
            "UNION SELECT dictname FROM pg_ts_dict WHERE dictname = 'atlas_english_stem'")).scalars())


def test_upgrade_downgrade_upgrade(tmp_path, db_url):
    engine = make_engine(db_url or f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())
    full_text = {"sqlite": {"concepts_fts"},
                 "postgresql": {"concepts_fts_gin", "atlas_english", "atlas_english_stem"}}[engine.dialect.name]
    assert _full_text_objects(engine) == full_text
    assert migrate.current_revision(engine) == migrate.head_revision()
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert _full_text_objects(engine) == set()
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert _full_text_objects(engine) == full_text
    engine.dispose()


def test_revisions_read_without_alembic_agree_with_alembic(tmp_path, db_url):
    """A store open reads the revision chain from the migration files' headers and the database's
    revision from the version table, without Alembic: both agree with Alembic's own answers, at
    every revision of the chain and before the first."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", migrate.SCRIPT_LOCATION)
    script = ScriptDirectory.from_config(cfg)
    assert migrate.revision_graph() == {s.revision: s.down_revision for s in script.walk_revisions()}
    assert migrate.head_revision() == script.get_current_head()
    assert migrate.known_revisions() == {s.revision for s in script.walk_revisions()}

    engine = make_engine(db_url or f"sqlite:///{tmp_path / 'r.db'}")

    def alembic_current():
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    assert migrate.current_revision(engine) == alembic_current()  # None on SQLite; the fixture's on PostgreSQL
    if alembic_current() is not None:
        migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None and alembic_current() is None
    for rev in [s.revision for s in script.walk_revisions()][::-1]:  # oldest first
        migrate.upgrade(engine, rev)
        assert migrate.current_revision(engine) == alembic_current() == rev
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None and alembic_current() is None
    engine.dispose()


def test_opening_a_store_does_not_import_alembic(tmp_path):
    """`atlas neighbors` and `atlas lookup` open a store per command: Alembic (a third of the
    command's start-up) is only imported to change a schema."""
    import subprocess
    import sys

    from engine.store.store import Store

    Store.init(tmp_path / "st").close()
    code = ("import sys; from engine.store.store import Store; Store.open(sys.argv[1]).close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_models_and_migrations_agree(tmp_path, db_url):
    engine = make_engine(db_url or f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True, "render_as_batch": True}
        )
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_wal_and_foreign_keys_on(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _contents(store) -> dict:
    """Every row a user can see, and the answers built on them."""
    from engine.atlas.lookup import lookup

    return {
        "atlases": [(a.name, a.n_concepts, a.n_labelled, a.index_spec) for a in store.atlases()],
        "concepts": store.labels("a"),
        "files": store.atlas_files("a"),
        "maps": [(m.name, m.sha256, m.file) for m in store.maps()],
        "runs": [(r.name, r.status, r.n_done) for r in store.runs()],
        "labels": store.run_label_rows("r1", 0, 20),
        "lookup": [h.ref for h in lookup(store, "concept 4", k=3, semantic=False)],
        "neighbors": [h.ref for h in store.neighbors("a/3", k=4)],
    }


def test_downgrade_and_upgrade_keep_the_rows(tmp_path, db_url):
    """A store with an atlas, a map and a finished run goes down to 0001 and back up; every row,
    file claim and answer is the same, and verify is clean."""
    import numpy as np

    from engine.align.map import AlignmentMap
    from engine.labelling.run import label_features
    from engine.store.store import Store
    from tests.conftest import clustered_directions

    rng = np.random.default_rng(0)
    store = Store.init(tmp_path / "st", db_url=db_url)
    store.add_atlas(
        "a", clustered_directions(50, 16), [f"concept {i}" for i in range(50)],
        source=AtlasSource(model="x", layer=1),
    )
    store.add_model("subj", d_model=8)
    save_map(store, AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16),
                                "procrustes", subject_model="subj", subject_layer=1, atlas="a", atlas_model="x",
                                atlas_layer=1, metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0}), "m")
    np.save(tmp_path / "f.npy", rng.normal(size=(20, 8)).astype(np.float32))
    # no confidence: a downgrade below 0009 drops that column (test_label_criteria_runs checks what it keeps)
    label_features(store, "m", str(tmp_path / "f.npy"), k=3, name="r1", quiet=True, confidence="none")
    before = _contents(store)
    store.close()
    for target in ("0002", "0001"):
        engine = make_engine(db_url or f"sqlite:///{tmp_path / 'st' / 'atlas.db'}")
        migrate.downgrade(engine, target, root=tmp_path / "st")
        assert migrate.current_revision(engine) == target
        migrate.upgrade(engine, root=tmp_path / "st")
        engine.dispose()
        with Store.open(tmp_path / "st") as s:
            assert _contents(s) == before
            assert s.verify().ok


def test_0004_rewrites_model_sources_relative_to_the_store_root(tmp_path, monkeypatch, db_url):
    """Rows written by earlier versions: a world model recorded relative to the working directory
    of the time, one recorded absolute under the store, a folder outside it, a hub id."""
    from engine.store.store import Store

    root = tmp_path / "st"
    Store.init(root, db_url=db_url).close()
    outside = tmp_path / "weights" / "llama"
    outside.mkdir(parents=True)
    engine = make_engine(db_url or f"sqlite:///{root / 'atlas.db'}")
    migrate.downgrade(engine, "0002", root=root)
    rows = {
        "w-found": "st/models/world-tiny-abc/foundation",  # relative to a cwd long gone
        "w-sub": f"{root}/models/world-tiny-abc/subject_a",
        "inside": f"{root}/models/mine",
        "outside": str(outside),
        "hub": "google/gemma-2-2b",
    }
    with engine.begin() as conn:
        for name, source in rows.items():
            conn.execute(text("INSERT INTO models (name, source, extra, created_at) VALUES (:n, :s, :e, '2026-01-01')"),
                         {"n": name, "s": source, "e": json.dumps({"world_path": "st/models/world-tiny-abc"})})
    migrate.upgrade(engine, root=root)
    with engine.connect() as conn:  # JSON comes back as text from SQLite, parsed from PostgreSQL
        got = {n: (s, k, e if isinstance(e, dict) else json.loads(e))
               for n, s, k, e in conn.execute(text("SELECT name, source, source_kind, extra FROM models"))}
    assert got["w-found"][:2] == ("models/world-tiny-abc/foundation", "store")
    assert got["w-sub"][:2] == ("models/world-tiny-abc/subject_a", "store")
    assert got["inside"][:2] == ("models/mine", "store")
    assert got["outside"][:2] == (str(outside), "path")
    assert got["hub"][:2] == ("google/gemma-2-2b", "hub")
    assert all("world_path" not in e for _, _, e in got.values())
    # the store reads them back resolved against its root, from any folder
    monkeypatch.chdir(tmp_path / "weights")
    store = Store.open(root)
    assert store.get_model("w-found").source == str(root.resolve() / "models/world-tiny-abc/foundation")
    assert store.get_model("hub").source == "google/gemma-2-2b"
    store.close()
    # downgrading writes absolute paths back (what earlier versions read)
    migrate.downgrade(engine, "0002", root=root)
    with engine.connect() as conn:
        src = conn.execute(text("SELECT source FROM models WHERE name = 'inside'")).scalar()
    assert src == str(root.resolve() / "models/mine")
    engine.dispose()


def test_0007_records_the_backend_and_refuses_to_drop_milvus_atlases(tmp_path, milvus_uri):
    """Below 0007 a store cannot say an atlas lives in Milvus: the downgrade refuses while one does,
    and goes through (FAISS atlases intact) once it has moved back to a FAISS file."""
    import pytest

    from engine.store.store import Store
    from tests.conftest import clustered_directions

    with Store.init(tmp_path / "st") as store:
        store.add_atlas("f", clustered_directions(30, 8), source=AtlasSource(model="x", layer=1))
        store.add_atlas(
            "m", clustered_directions(30, 8, seed=1), source=AtlasSource(model="x", layer=1),
            index=IndexPlacement(uri=milvus_uri),
        )
    engine = make_engine(f"sqlite:///{tmp_path / 'st' / 'atlas.db'}")
    with pytest.raises(RuntimeError, match="1 atlas.*keep their vectors in Milvus"):
        migrate.downgrade(engine, "0005")
    assert migrate.current_revision(engine) == migrate.head_revision()
    with Store.open(tmp_path / "st") as store:
        store.rebuild_index("m", index_uri="faiss")
    migrate.downgrade(engine, "0005")
    assert "index_backend" not in {c["name"] for c in inspect(engine).get_columns("atlases")}
    migrate.upgrade(engine)
    engine.dispose()
    with Store.open(tmp_path / "st") as store:
        assert [a.index_backend for a in store.atlases()] == ["faiss", "faiss"] and store.verify().ok
