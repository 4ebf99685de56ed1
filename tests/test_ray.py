"""Work on Ray (a local Ray with 2 workers, started once per session): the same rows and the same
maps as in-process, and a worker killed mid-run is retried with nothing counted or written twice.

The kill is real: the task's worker process SIGKILLs itself at a failpoint on its first attempt
(`$ATLAS_FAILPOINT_ONCE` names a marker file; the process that creates it dies, the retry runs).
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from engine.distributed import RayConfig, map_ordered
from engine.errors import AtlasError, BadValueError
from engine.labelling import run as labelling
from tests.test_labelling import rows_of
from tests.test_search import D_SUBJECT, make_mapped_store

ray = pytest.importorskip("ray")

CONFIG = RayConfig()  # the session's Ray is used as it is


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test here: 2 CPUs, no dashboard, quiet, a small object store."""
    if not ray.is_initialized():
        # workers import this module by its pytest name (`test_ray`) to run the helpers below
        here = os.path.dirname(os.path.abspath(__file__))
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, old) if p)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True, object_store_memory=100 * 1024 * 1024)
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


@pytest.fixture
def mapped(store, tmp_path):
    make_mapped_store(store)
    feats = np.random.default_rng(7).normal(size=(230, D_SUBJECT)).astype(np.float32)
    path = tmp_path / "feats.npy"
    np.save(path, feats)
    return store, path


def kill_once(monkeypatch, tmp_path, failpoint: str):
    """Make the first Ray task that reaches ``failpoint`` SIGKILL its worker process."""
    marker = tmp_path / f"killed-{failpoint}"
    monkeypatch.setenv("ATLAS_FAILPOINT", failpoint)
    monkeypatch.setenv("ATLAS_FAILPOINT_ONCE", str(marker))
    return marker


# ---------------------------------------------------------------------- labelling


def test_ray_labelling_writes_exactly_the_in_process_rows(ray_local, mapped):
    store, path = mapped
    here = labelling.label_features(store, "m", str(path), k=3, batch_size=20, name="here", quiet=True)
    there = labelling.label_features(store, "m", str(path), k=3, batch_size=20, name="there", quiet=True,
                                     ray=CONFIG)
    assert (there.status, there.n_done) == ("done", 230)
    assert there.params["worker"]["pid"] == here.params["worker"]["pid"]  # the driver commits, not the workers
    assert rows_of(store, "there") == rows_of(store, "here")  # the same (feature, rank, concept, score) rows
    assert store.count_run_labels("there") == 230 * 3


def test_a_killed_ray_worker_is_retried_and_no_row_is_duplicated(ray_local, mapped, monkeypatch, tmp_path):
    store, path = mapped
    labelling.label_features(store, "m", str(path), k=3, batch_size=20, name="here", quiet=True)
    marker = kill_once(monkeypatch, tmp_path, "label.shard")
    run = labelling.label_features(store, "m", str(path), k=3, batch_size=20, name="there", quiet=True,
                                   ray=CONFIG)
    assert marker.exists()  # a worker really died mid-run
    assert (run.status, run.n_done) == ("done", 230)
    rows = rows_of(store, "there")
    assert len(rows) == len({r[:2] for r in rows}) == 230 * 3  # each (feature, rank) once
    assert rows == rows_of(store, "here")


def test_a_run_cut_in_process_resumes_on_ray_to_the_same_rows(ray_local, mapped):
    store, path = mapped
    labelling.label_features(store, "m", str(path), k=3, batch_size=20, name="here", quiet=True)
    labelling.create_run(store, "m", str(path), k=3, batch_size=20, name="cut")
    part = labelling.run_labelling(store, "cut", max_batches=3, quiet=True)
    assert part.n_done == 60
    part = labelling.run_labelling(store, "cut", max_batches=4, quiet=True, ray=CONFIG)
    assert (part.status, part.n_done) == ("interrupted", 140)  # max_batches holds on Ray too
    done = labelling.run_labelling(store, "cut", quiet=True, ray=CONFIG)
    assert (done.status, done.n_done) == ("done", 230)
    assert rows_of(store, "cut") == rows_of(store, "here")


# ---------------------------------------------------------------------- the executor


def _square(x: int) -> int:
    return x * x


def _refuse(x: int) -> int:
    raise BadValueError(f"bad value {x}")


def _die(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_map_ordered_keeps_order_and_raises_the_library_error(ray_local):
    assert list(map_ordered(ray_local, _square, [(i,) for i in range(7)], window=3)) == [i * i for i in range(7)]
    with pytest.raises(BadValueError, match="bad value 1"):  # the first shard's own exception, not a Ray wrapper
        list(map_ordered(ray_local, _refuse, [(1,), (2,)], window=2))
    with pytest.raises(AtlasError, match="died"):  # a worker that dies on every try ends the run
        list(map_ordered(ray_local, _die, [(1,)], window=1, max_retries=1))
