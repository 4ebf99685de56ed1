"""Writers at once, in real processes: every one succeeds, or fails with a one-line message.

N >= 4 concurrent writers of each kind start at the same instant (once every one has
imported): imports with a new model name, imports of one atlas name, imports beside
labelling runs, labelling runs on one map. Afterwards every row and file is checked: SQLite's
integrity check, `Store.verify` (no leftover files), one model row, each run's labels equal to a
run made alone. The imports run on PostgreSQL too (its write lock: `engine.store.postgres`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from engine.align.map import save_map
from engine.store.store import AtlasSource, Store

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1"}
N = int(os.environ.get("ATLAS_CONCURRENCY_N", "4"))
DRIVER = (
    "import os, sys, time\n"
    "import engine.labelling.run  # noqa: F401  (torch loaded before the start, not after)\n"
    "from engine.cli import cli\n"
    "open(sys.argv[1], 'w').close()  # imported: ready\n"
    "while not os.path.exists(sys.argv[2]):  # the start, once every process is ready\n"
    "    time.sleep(0.002)\n"
    "cli.main(sys.argv[3:], prog_name='atlas')\n"
)


def _together(commands: list[list[str]], store: Path) -> list[subprocess.CompletedProcess]:
    """Run CLI commands in separate processes that all start working at the same moment: each says
    it is ready once it has imported, and all start when the last one is (a barrier of files)."""
    with tempfile.TemporaryDirectory() as barrier:
        ready = [Path(barrier) / f"ready{i}" for i in range(len(commands))]
        go = Path(barrier) / "go"
        procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(r), str(go), *cmd, "--store", str(store)],
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r, cmd in zip(ready, commands)]
        deadline = time.monotonic() + 300
        while not all(r.exists() for r in ready):
            dead = [p.args for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"not ready: {dead or 'timed out'}"
            time.sleep(0.01)
        go.touch()
        out = []
        for p, cmd in zip(procs, commands):
            stdout, stderr = p.communicate(timeout=600)
            out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def _one_line_error(r: subprocess.CompletedProcess) -> bool:
    err = r.stderr.strip()
    return r.returncode == 1 and err.startswith("Error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def _clean(store: Path) -> Store:
    if (store / "atlas.db").exists():
        with sqlite3.connect(store / "atlas.db") as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s = Store.open(store)
    report = s.verify()
    assert report.ok and not report.leftovers, (report.problems, report.leftovers)
    files = sorted(str(p.relative_to(store)) for d in ("vectors", "indexes", "maps") for p in (store / d).iterdir())
    assert files == sorted(s.claimed_files())
    return s


@pytest.fixture
def world(tmp_path, db_url):
    """A store with atlas `a`, subject `subj` and map `m`; matrices to import and features to label."""
    from engine.align.map import AlignmentMap
    from tests.conftest import clustered_directions

    rng = np.random.default_rng(0)
    for i in range(N):
        np.save(tmp_path / f"x{i}.npy", clustered_directions(150, 16, seed=10 + i))
    np.save(tmp_path / "feats.npy", rng.normal(size=(60, 8)).astype(np.float32))
    store = Store.init(tmp_path / "st", db_url=db_url)  # later commands find the database in the folder
    store.add_atlas("a", clustered_directions(200, 16, seed=1), source=AtlasSource(model="x", layer=1))
    store.add_model("subj", d_model=8)
    save_map(store, AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16),
                                "procrustes", subject_model="subj", subject_layer=1, atlas="a", atlas_model="x",
                                atlas_layer=1, metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0}), "m")
    store.close()
    return tmp_path / "st", tmp_path


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
@pytest.mark.backends("sqlite", "postgresql")
def test_imports_with_one_new_model_name_all_succeed(world):
    root, tmp = world
    results = _together([["import-sae", str(tmp / f"x{i}.npy"), "--model", "brand-new", "--layer", "3",
                          "--name", f"i{i}"] for i in range(N)], root)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    s = _clean(root)
    assert sorted(a.name for a in s.atlases()) == ["a", *[f"i{i}" for i in range(N)]]
    assert [m.name for m in s.models()].count("brand-new") == 1
    for i in range(N):
        np.testing.assert_array_equal(s.atlas_vectors(f"i{i}"), np.load(tmp / f"x{i}.npy"))


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
def test_imports_of_one_name_one_wins_the_others_say_so(world):
    root, tmp = world
    results = _together([["import-sae", str(tmp / f"x{i}.npy"), "--model", "x", "--layer", "1", "--name", "same"]
                         for i in range(N)], root)
    won = [i for i, r in enumerate(results) if r.returncode == 0]
    assert len(won) == 1, [r.stderr for r in results]
    for i, r in enumerate(results):
        if i not in won:
            assert _one_line_error(r) and "exists" in r.stderr, r.stderr
    s = _clean(root)  # the losers removed their own files and nothing else
    np.testing.assert_array_equal(s.atlas_vectors("same"), np.load(tmp / f"x{won[0]}.npy"))


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
def test_runs_and_imports_at_once_all_succeed_with_exact_labels(world):
    root, tmp = world
    alone = tmp / "alone"
    shutil.copytree(root, alone)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "m", "--features", str(tmp / "feats.npy"),
                        "-k", "4", "--batch", "7", "--name", "solo", "--store", str(alone)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Store.open(alone) as s:
        expected = s.run_label_rows("solo", 0, 60)
    labels = [["label", "m", "--features", str(tmp / "feats.npy"), "-k", "4", "--batch", "7", "--name", f"r{i}"]
              for i in range(N)]
    imports = [["import-sae", str(tmp / f"x{i}.npy"), "--model", f"model-{i % 2}", "--layer", "2", "--name",
                f"i{i}"] for i in range(N)]
    results = _together([c for pair in zip(labels, imports) for c in pair], root)
    assert all(r.returncode == 0 for r in results), [r.stderr[-400:] for r in results if r.returncode]
    s = _clean(root)
    assert sorted(r.name for r in s.runs()) == [f"r{i}" for i in range(N)]
    for i in range(N):
        run = s.run(f"r{i}")
        assert run.status == "done" and s.run_label_rows(f"r{i}", 0, 60) == expected
    assert len(s.atlases()) == N + 1
