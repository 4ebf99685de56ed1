"""One-shot read commands import only what a read needs (issue 26): ``atlas show``, ``neighbors``
and ``lookup --no-semantic`` in a fresh process load neither torch, Alembic, transformers nor, on
the store's own SQLite file, SQLAlchemy (`engine.store.reader`), and of the core's command modules
only the store commands (`engine.cli.LazyCommands`); they print what the full store prints (the
same commands with --db-url naming the same file go through SQLAlchemy); listing the commands
still loads every module and plug-in."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.atlas.lookup import lookup
from engine.errors import NotFoundError
from engine.store.reader import open_reader
from engine.store.store import AtlasSource
from tests.quick import some_quick

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "alembic", "transformers", "sqlalchemy", "engine.demo", "engine.world"]

PROBE = """
import json, sys
from engine.cli import cli
try:
    cli(sys.argv[1:], prog_name="atlas", standalone_mode=False)
finally:
    print("\\nMODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "alembic", "transformers", "sqlalchemy", "engine"))))
"""


def _run(*args: str, ok: bool = True) -> tuple[str, set[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "ATLAS_STORE")}
    env.update(PYTHONPATH=str(ROOT), ATLAS_QUIET="1")
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert (res.returncode == 0) == ok, res.stderr
    out, _, mods = res.stdout.rpartition("\nMODULES ")
    return out + res.stderr, set(json.loads(mods))


def _atlas(store) -> None:
    rng = np.random.default_rng(0)
    store.add_atlas("at", rng.normal(size=(40, 8)).astype(np.float32),
                    [f"concept {i} {'rain' if i % 3 else 'storm'}" for i in range(40)],
                    [f"weather words {i}" if i % 2 else None for i in range(40)],
                    source=AtlasSource(model="found", layer=1))


@pytest.mark.parametrize("command", [["show", "at/3"], ["neighbors", "at/3", "-k", "3"],
                                     ["lookup", "concept", "--no-semantic"]])
def test_a_read_command_imports_no_torch_alembic_or_world(store, command):
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    out, mods = _run(*command, "--store", str(store.path))
    assert "at/3" in out or "concept" in out
    loaded = {m for m in mods for h in HEAVY if m == h or m.startswith(h + ".")}
    assert not loaded, f"atlas {command[0]} imported {sorted(loaded)}"
    assert "engine.cli.store_cmds" in mods and not {"engine.cli.steer_cmds", "engine.cli.align_cmds"} & mods


def test_listing_the_commands_loads_every_module_and_plugin():
    out, mods = _run("--help")
    assert {"engine.cli.steer_cmds", "engine.cli.plugins.world"} <= mods
    assert all(name in out for name in ("show", "neighbors", "world", "eval", "demo", "serve"))


READS = [["show", "at/3"], ["show", "7", "--atlas", "at"], ["neighbors", "at/3", "-k", "5"],
         ["lookup", "rain storm", "--no-semantic", "-k", "7"], ["lookup", "weather", "--atlas", "at", "--no-semantic"]]


@pytest.mark.parametrize("command", some_quick(READS, quick=[READS[0], READS[3]]))
def test_a_read_command_prints_what_the_full_store_prints(store, command):
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    plain, plain_mods = _run(*command, "--json", "--store", str(store.path))
    full, full_mods = _run(*command, "--json", "--store", str(store.path), "--db-url",
                           f"sqlite:///{store.path / 'atlas.db'}")
    assert "sqlalchemy" not in plain_mods and "engine.store.reader" in plain_mods
    assert "sqlalchemy" in full_mods and "engine.store.reader" not in full_mods  # the other path, truly
    assert json.loads(plain) == json.loads(full) and json.loads(plain)


REFUSED = [["show", "at/99"], ["neighbors", "nope/1"], ["lookup", "rain", "--atlas", "nope"], ["show", "at/x"],
           ["lookup", "!!"]]


@pytest.mark.parametrize("command", some_quick(REFUSED, quick=[REFUSED[0], REFUSED[4]]))
def test_a_read_command_refuses_what_the_full_store_refuses(store, command):
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    plain, _ = _run(*command, "--store", str(store.path), ok=False)
    full, _ = _run(*command, "--store", str(store.path), "--db-url", f"sqlite:///{store.path / 'atlas.db'}", ok=False)
    assert plain.strip().splitlines()[-1] == full.strip().splitlines()[-1]
    assert plain.strip().splitlines()[-1].startswith("click.exceptions.ClickException: ")  # an AtlasError's line


def test_an_outdated_store_is_refused_with_the_upgrade_command(store):
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    with sqlite3.connect(store.path / "atlas.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    out, mods = _run("show", "at/3", "--store", str(store.path), ok=False)
    assert "atlas db upgrade" in out and "sqlalchemy" in mods  # the reader handed it to the full store


def test_a_copied_store_is_checked_once_and_its_new_stamps_kept(store, tmp_path):
    """A copy has new mtimes: the first read runs the files' full checksums (as the store does) and
    has the full store cache the new stamps, so the next read checks the stamps only."""
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    expected, _ = _run("neighbors", "at/3", "--json", "--store", str(store.path))
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy, copy_function=shutil.copy)  # new mtimes
    first, first_mods = _run("neighbors", "at/3", "--json", "--store", str(copy))
    assert json.loads(first) == json.loads(expected) and "sqlalchemy" in first_mods  # the stamps were cached
    again, again_mods = _run("neighbors", "at/3", "--json", "--store", str(copy))
    assert json.loads(again) == json.loads(expected) and "sqlalchemy" not in again_mods


def test_the_reader_answers_as_the_store(store):
    """The reads in one process: `StoreReader` and `Store` run the same queries (`StoreReads`)."""
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    _atlas(store)
    store.add_atlas("other", np.eye(4, dtype=np.float32), ["a", None, "c", "d"], source=AtlasSource(model="m2", layer=0))
    reader = open_reader(store.path)
    assert reader is not None
    with reader:
        assert reader.atlases() == store.atlases()
        assert reader.atlas("other") == store.atlas("other") and reader.atlas("other").n_labelled == 3
        assert reader.concepts("at", [5, 1, 30]) == store.concepts("at", [5, 1, 30])
        assert reader.concepts("other") == store.concepts("other")
        refs = [("at", 5), ("other", 2), ("at", 1)]  # several atlases in one read
        assert reader.concepts_at(refs) == store.concepts_at(refs) == {
            (c.atlas, c.ordinal): c for c in store.concepts("at", [5, 1]) + store.concepts("other", [2])}
        with pytest.raises(NotFoundError, match="at/99"):
            reader.concepts_at([("at", 1), ("at", 99)])
        assert reader.neighbors("at/4", k=6) == store.neighbors("at/4", k=6)
        assert lookup(reader, "storm", k=5) == lookup(store, "storm", k=5)


@pytest.mark.parametrize("command", ["label", "search"])
def test_labelling_and_searching_a_feature_matrix_on_the_cpu_import_no_torch(store, tmp_path, command):
    """A map applied to numpy arrays stays numpy (`engine.align.map`): `atlas label` and `atlas search`
    of a feature matrix never pay torch's import (~1.5 s of a one-shot run)."""
    from engine.align.map import AlignmentMap, save_map

    rng = np.random.default_rng(1)
    store.add_atlas("at", rng.normal(size=(30, 8)).astype(np.float32), [f"concept {i}" for i in range(30)],
                    source=AtlasSource(model="found", layer=1))
    store.add_model("subj", d_model=6)
    amap = AlignmentMap(rng.normal(size=(6, 8)), rng.normal(size=(8, 6)), np.zeros(6), np.zeros(8), "procrustes",
                        subject_model="subj", subject_layer=1, atlas="at", atlas_model="found", atlas_layer=1,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    save_map(store, amap, "m")
    np.save(tmp_path / "feats.npy", rng.normal(size=(12, 6)).astype(np.float32))
    args = (["label", "m", "--features", str(tmp_path / "feats.npy"), "-k", "2", "--json"] if command == "label"
            else ["search", "m", "--vectors", str(tmp_path / "feats.npy"), "-k", "2", "--json"])
    out, mods = _run(*args, "--store", str(store.path))
    assert ('"status": "done"' if command == "label" else "concept") in out, out
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}, f"atlas {command} imported torch"
