"""PostgreSQL restarted under two writers: a labelling run and a series of imports, two processes on
two connections, and `pg_ctl restart -m fast` (every connection dropped, the server away for a
moment) while both write.

Each writer either finishes or stops with a one-line error; a stopped run resumes (`atlas label
--resume`) and a stopped import is done again. In the end the run's rows are exactly those of a run
made alone, every import's vectors are the matrix imported, and nothing is half-committed: the
store verifies clean (every row's file present, no file without its row).

The server is a throw-away cluster of its own (`.ci/postgres.sh start|restart|stop`, on a free
port), never the suite's shared one ($ATLAS_TEST_PG_URL); the test skips where PostgreSQL's server
binaries are not installed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.align.map import AlignmentMap, save_map
from engine.labelling import run as labelling
from engine.store.store import AtlasSource, Store
from tests.conftest import clustered_directions

pytest.importorskip("psycopg")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "postgres.sh"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1"}
N_FEATURES, BATCH, K = 2000, 10, 4

# imports one after another until the file argv[3] exists (each one's outcome a JSON line in argv[2])
IMPORTER = """
import json, sys, os, traceback
import click
from engine.cli import cli
store, log, stop, tmp = sys.argv[1:5]
open(log, "a").close()  # started: the CLI is imported
i = 0
while not os.path.exists(stop):
    args = ["import-sae", f"{tmp}/x{i % 3}.npy", "--model", "x", "--layer", "1", "--name", f"i{i}", "--store", store]
    try:
        cli.main(args, prog_name="atlas", standalone_mode=False)
        out = {"i": i, "ok": True}
    except click.ClickException as e:
        out = {"i": i, "ok": False, "error": e.format_message()}
    except BaseException:
        out = {"i": i, "ok": False, "traceback": traceback.format_exc()}
    with open(log, "a") as f:
        f.write(json.dumps(out) + "\\n")
    i += 1
"""


def _pg_bin() -> str | None:
    """The folder of PostgreSQL's server binaries, as .ci/postgres.sh finds it (None: not installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0]))
    b = os.environ.get("ATLAS_PG_BIN") or (found[-1] if found else None)
    return b if b and all(os.access(os.path.join(b, x), os.X_OK) for x in ("initdb", "pg_ctl")) else None


@pytest.fixture(scope="module")
def pg_server():
    """A throw-away PostgreSQL cluster: (its database URL, a function that restarts it)."""
    if _pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb): install postgresql or set ATLAS_PG_BIN")
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_PG_PORT", "ATLAS_PG_STARTED", "ATLAS_PG_DIR")}
    r = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    started = dict(kv.split("=", 1) for kv in r.stdout.split()[1:])  # export A=.. B=.. C=..
    env.update(started)

    def restart() -> None:
        rr = subprocess.run([str(SCRIPT), "restart"], env=env, capture_output=True, text=True, timeout=120, cwd="/")
        assert rr.returncode == 0, rr.stderr

    try:
        yield started["ATLAS_TEST_PG_URL"], restart
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120, cwd="/")


def _one_line_error(err: str) -> bool:
    err = err.strip()
    return err.startswith("Error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def _atlas(*args: str) -> None:
    """`atlas ARGS` in this process (the CLI's own code path), which must succeed."""
    from click.testing import CliRunner

    from engine.cli import cli

    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output


def _database(url: str, name: str) -> str:
    """A new database ``name`` on the server of ``url`` (one store per database), its URL."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _mapped_store(root: Path, url: str, tmp_path: Path) -> Store:
    """A store with atlas `a`, subject `subj` and map `m` (as tests/store/test_concurrency.py), and the
    features to label."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "feats.npy", rng.normal(size=(N_FEATURES, 8)).astype(np.float32))
    store = Store.init(root, db_url=url)
    store.add_atlas("a", clustered_directions(300, 16, seed=1), source=AtlasSource(model="x", layer=1))
    store.add_model("subj", d_model=8)
    save_map(store, AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16),
                                "procrustes", subject_model="subj", subject_layer=1, atlas="a", atlas_model="x",
                                atlas_layer=1), "m")
    return store


@pytest.mark.slow  # two CLI processes and a labelling run of 200 batches: `-m "not slow"` stays quick; CI runs it
def test_two_writers_through_a_server_restart_end_exact(pg_server, tmp_path):
    url, restart = pg_server
    xs = [clustered_directions(500, 16, seed=10 + i) for i in range(3)]
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x)
    root = tmp_path / "st"
    store = _mapped_store(root, _database(url, "writers"), tmp_path)
    labelling.label_features(store, "m", str(tmp_path / "feats.npy"), k=K, batch_size=BATCH, name="solo", quiet=True)
    expected = store.run_label_rows("solo", 0, N_FEATURES)

    log, stop = tmp_path / "imports.jsonl", tmp_path / "stop"
    importer = subprocess.Popen([sys.executable, "-c", IMPORTER, str(root), str(log), str(stop), str(tmp_path)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    label_args = ["label", "m", "--features", str(tmp_path / "feats.npy"), "-k", str(K), "--batch", str(BATCH),
                  "--name", "r", "--store", str(root)]
    labeller = subprocess.Popen([sys.executable, "-m", "engine.cli", *label_args], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # both are writing: the run has committed batches, the importer is importing
        end = time.monotonic() + 300
        while not ([r for r in store.runs() if r.name == "r" and r.n_done > 0] and log.exists()):
            assert labeller.poll() is None and importer.poll() is None, (labeller.stderr.read(), importer.stderr.read())
            assert time.monotonic() < end
            time.sleep(0.05)
        n_at_restart = store.run("r").n_done
        restart()
        stop.touch()  # the import in flight, and maybe one more
        import_err = importer.communicate(timeout=600)[1]
        label_err = labeller.communicate(timeout=600)[1]
    finally:
        for p in (labeller, importer):
            if p.poll() is None:
                p.kill()
    assert importer.returncode == 0, import_err
    assert n_at_restart < N_FEATURES, "the run ended before the restart"
    # the run rode through: its step in flight was committed once (`ResumablePass.commit` retries a
    # transaction the server cut off), new connections waited for the server
    assert labeller.returncode == 0, label_err
    run = store.run("r")  # this process's pooled connections were dropped too: replaced, not an error
    assert (run.status, run.n_done) == ("done", N_FEATURES)
    assert store.run_label_rows("r", 0, N_FEATURES) == expected

    outcomes = [json.loads(line) for line in log.read_text().splitlines()]
    assert all("traceback" not in o for o in outcomes), [o["traceback"] for o in outcomes if "traceback" in o]
    names = {a.name for a in store.atlases()}
    for o in outcomes:
        if not o["ok"]:  # cut off: a one-line message, no atlas; the same import again succeeds
            assert len(o["error"].splitlines()) == 1, o["error"]
            assert f"i{o['i']}" not in names
            _atlas("import-sae", str(tmp_path / f"x{o['i'] % 3}.npy"), "--model", "x", "--layer", "1", "--name",
                   f"i{o['i']}", "--store", str(root))
    for o in outcomes:
        np.testing.assert_array_equal(store.atlas_vectors(f"i{o['i']}"), xs[o["i"] % 3])
    report = store.verify()
    assert report.ok and not report.leftovers, (report.problems, report.leftovers)
    store.close()


def test_a_step_whose_connection_the_server_drops_is_committed_once(pg_server, tmp_path):
    """The server ends the step's transaction (its backend terminated mid-transaction, as a restart
    does): the step is run again on a new connection and committed once."""
    url, _ = pg_server
    store = _mapped_store(tmp_path / "st", _database(url, "cutoff"), tmp_path)
    labelling.create_run(store, "m", str(tmp_path / "feats.npy"), k=K, batch_size=BATCH, name="cut")
    job = store.label_pass("cut")
    tries = []

    def write(conn):
        tries.append(conn.exec_driver_sql("SELECT n_done FROM label_runs WHERE name = 'cut'").scalar())
        if len(tries) == 1:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    job.commit(0, BATCH, write)
    assert tries == [BATCH, BATCH]  # the advance, rolled back with the first try, made again
    assert (job.done, store.run("cut").n_done) == (BATCH, BATCH)
    store.close()
