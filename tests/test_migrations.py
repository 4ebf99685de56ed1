"""Alembic: upgrade → downgrade → upgrade on a real SQLite file; models and migrations agree."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from engine.store import migrate
from engine.store.schema import Base, include_object
from engine.store.store import make_engine

TABLES = {"models", "atlases", "concepts", "alignment_maps", "label_runs", "feature_labels", "context_runs",
          "concept_contexts"}


def test_upgrade_downgrade_upgrade(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine)
    assert TABLES | {"concepts_fts"} <= set(inspect(engine).get_table_names())
    assert migrate.current_revision(engine) == migrate.head_revision()
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())


def test_models_and_migrations_agree(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True, "render_as_batch": True}
        )
        diff = compare_metadata(ctx, Base.metadata)
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


def test_downgrade_and_upgrade_keep_the_rows(tmp_path):
    """A store with an atlas, a map and a finished run goes down to 0001 and back up; every row,
    file claim and answer is the same, and verify is clean."""
    import numpy as np

    from engine.align.map import AlignmentMap
    from engine.labelling.run import label_features
    from engine.store.store import Store
    from tests.conftest import clustered_directions

    rng = np.random.default_rng(0)
    store = Store.init(tmp_path / "st")
    store.add_atlas("a", clustered_directions(50, 16), [f"concept {i}" for i in range(50)], model="x", layer=1)
    store.add_model("subj", d_model=8)
    store.save_map(AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16),
                                "procrustes", subject_model="subj", subject_layer=1, atlas="a", atlas_model="x",
                                atlas_layer=1, metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0}), "m")
    np.save(tmp_path / "f.npy", rng.normal(size=(20, 8)).astype(np.float32))
    label_features(store, "m", str(tmp_path / "f.npy"), k=3, name="r1", quiet=True)
    before = _contents(store)
    store.close()
    for target in ("0002", "0001"):
        engine = make_engine(f"sqlite:///{tmp_path / 'st' / 'atlas.db'}")
        migrate.downgrade(engine, target)
        assert migrate.current_revision(engine) == target
        migrate.upgrade(engine)
        engine.dispose()
        with Store.open(tmp_path / "st") as s:
            assert _contents(s) == before
            assert s.verify().ok
