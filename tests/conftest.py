"""Shared fixtures: real stores in tmp_path, SAE fixtures in real file formats.

Databases: a store's metadata is a SQLite file unless a test asks for more. A module (or test) marked
``@pytest.mark.backends("sqlite", "postgresql")`` runs each test that uses ``db_url`` (or ``store``,
which uses it) once per database. The PostgreSQL cases need a server: ``$ATLAS_TEST_PG_URL``, e.g.
``eval "$(.ci/postgres.sh start)"`` (CI does this); without it they skip. Each PostgreSQL case gets
a database of its own (a copy of one at the newest revision: `pg_template`), dropped after it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from engine.store import layout
from engine.store.store import Store

PG_URL_ENV = "ATLAS_TEST_PG_URL"
BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config):
    """The static encoder's machine cache under ``$ATLAS_TEST_CACHE``; under pytest-xdist, each
    worker's torch gets its share of the CPUs (``-n auto``: one each), so two workers on two cores do
    not each start a thread per core and fight over them."""
    # The static encoder's table is distilled once per machine (engine.atlas.static_encoder): with
    # ATLAS_TEST_CACHE, the suite keeps it there rather than in the user's cache.
    if os.environ.get("ATLAS_TEST_CACHE") and not os.environ.get("ATLAS_CACHE_DIR"):
        os.environ["ATLAS_CACHE_DIR"] = str(Path(os.environ["ATLAS_TEST_CACHE"]) / "machine-cache")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "db_url" in metafunc.fixturenames:
        unknown = set(marker.args) - set(BACKENDS)
        assert not unknown, f"unknown backends {unknown}; known: {BACKENDS}"
        metafunc.parametrize("db_url", marker.args, indirect=True)


@pytest.fixture(scope="session")
def pg_admin():
    """An autocommit engine on ``$ATLAS_TEST_PG_URL``'s database, to create and drop test databases."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: set {PG_URL_ENV} (`eval \"$(.ci/postgres.sh start)\"` starts one)")
    from sqlalchemy import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def db_url(request) -> str | None:
    """The metadata database of the test's store: None (the store's SQLite file) or the URL of a new,
    empty PostgreSQL database, dropped after the test (see the module docstring)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    with pg_database(request.getfixturevalue("pg_admin"), template=request.getfixturevalue("pg_template")) as url:
        yield url


@pytest.fixture(scope="session")
def pg_template(pg_admin, tmp_path_factory):
    """A database at the newest schema revision (made once, by `Store.init`) that each test's database
    copies: creating and migrating a database per test took 0.85 s, a copy takes a fraction."""
    with pg_database(pg_admin) as url:
        Store.init(tmp_path_factory.mktemp("pg-template") / "store", db_url=url).close()
        yield make_url(url).database


@contextlib.contextmanager
def pg_database(admin, template: str | None = None):
    """A new PostgreSQL database on ``admin``'s server (its URL): empty, or a copy of ``template``;
    dropped on exit."""
    from sqlalchemy import text

    name = f"atlas_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(admin.url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # WITH (FORCE): connections a test left open are ended
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def store(tmp_path: Path, db_url: str | None, request) -> Store:
    """An initialised store (real database at Alembic head: SQLite unless ``db_url`` says otherwise). A SQLite
    store starts from a copy of `sqlite_template`'s file, as a PostgreSQL one from `pg_template`'s database."""
    root = tmp_path / "store"
    if db_url is None:
        root.mkdir()
        shutil.copyfile(request.getfixturevalue("sqlite_template"), root / layout.DB_FILE)
    s = Store.init(root, db_url=db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """An empty store's SQLite file at the newest revision, made once (by `Store.init`): `Store.init` on a copy
    finds it at head (6 ms), where migrating a new file takes 50 ms, in hundreds of tests."""
    root = tmp_path_factory.mktemp("sqlite-template") / "store"
    Store.init(root).close()
    return root / layout.DB_FILE


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory) -> str:
    """One Milvus Lite folder for the whole session (its in-process server starts once, ~1 s);
    tests keep apart by collection names, which are all unique."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    return str(tmp_path_factory.mktemp("milvus") / "lite.db")


_N_COLLECTIONS = [0]


def index_location(backend: str, milvus_uri: str | None) -> dict[str, str]:
    """Where a test's new index of ``backend`` lives: nothing for FAISS, a fresh collection for Milvus."""
    if backend != "milvus":
        return {}
    assert milvus_uri is not None
    _N_COLLECTIONS[0] += 1
    return {"uri": milvus_uri, "collection": f"test_{_N_COLLECTIONS[0]}"}


def clustered_directions(n: int, d: int, n_base: int = 64, k: int = 3, noise: float = 0.05, seed: int = 0):
    """SAE-like directions: sparse combinations of a few base directions plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, d)).astype(np.float32)
    idx = rng.integers(0, n_base, size=(n, k))
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = np.einsum("nk,nkd->nd", w, base[idx]) + noise * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32)


@pytest.fixture
def saelens_folder(tmp_path: Path) -> Path:
    """A SAELens SAE folder (cfg.json + sae_weights.safetensors + sparsity) with d_in=32, d_sae=200."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    d_in, d_sae = 32, 200
    folder = tmp_path / "sae"
    folder.mkdir()
    save_file(
        {
            "W_dec": clustered_directions(d_sae, d_in, seed=1),
            "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
            "b_enc": np.zeros(d_sae, np.float32),
            "b_dec": np.zeros(d_in, np.float32),
        },
        str(folder / "sae_weights.safetensors"),
    )
    save_file({"sparsity": np.full(d_sae, -2.0, np.float32)}, str(folder / "sparsity.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post",
        "hook_layer": 12,
    }))
    return folder


NEURONPEDIA_LABELS = {
    0: "weather and rain",
    1: "cats and other pets",
    2: "musical instruments and songs",
    3: "rain storms and thunder",
    7: "programming languages",
}


@pytest.fixture
def neuronpedia_export(tmp_path: Path) -> Path:
    """A Neuronpedia explanation export (JSONL.gz) labelling a few features of `saelens_folder`."""
    path = tmp_path / "explanations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, desc in NEURONPEDIA_LABELS.items():
            f.write(json.dumps({"modelId": "gemma-2-2b", "layer": "12-gemmascope-res-16k", "index": str(i),
                                "description": desc, "explanationModelName": "gpt-4o-mini",
                                "typeName": "oai_token-act-pair"}) + "\n")
        # a second explanation of feature 0: the first one is kept
        f.write(json.dumps({"modelId": "gemma-2-2b", "layer": "12", "index": "0", "description": "other"}) + "\n")
    return path


# ---------------------------------------------------------------------- ConceptWorld (engine.world)

# Fixtures that train (a world, its SAEs): only a test marked ``slow`` may use them, so that
# ``-m "not slow"`` trains nothing (a hand-made model from tests/tiny_models.py serves the others).
TRAINING_FIXTURES = frozenset({"tiny_world"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Fail, before any fixture is set up, a test outside the ``slow`` marker that would train: it
    reaches a fixture of ``TRAINING_FIXTURES``, directly or through another fixture."""
    training = TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
    if training and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} uses {', '.join(sorted(training))}, which trains: mark it slow "
                    "(tests/conftest.py TRAINING_FIXTURES), or test it on a hand-made model (tests/tiny_models.py)",
                    pytrace=False)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` ConceptWorld, really built and trained once per test session.

    Built under ``$ATLAS_TEST_CACHE`` when set, where it is reused across sessions (by configuration
    fingerprint, like the store does), else under the run's temporary folder. With pytest-xdist
    (``-n 2``) the workers share that folder, and a file lock lets one of them build while the others
    wait and then reuse its world: the world is trained once per run, not once per worker.
    """
    from engine.world import build_world

    cache = os.environ.get("ATLAS_TEST_CACHE")
    if cache:
        root = Path(cache) / "worlds"
    else:  # under xdist each worker's basetemp is <the run's basetemp>/<worker id>: share the run's
        base = tmp_path_factory.getbasetemp()
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "worlds"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".tiny-world.lock"):
        return build_world("tiny", seed=0, root=root, progress=False)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) across processes: one holder at a time."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
