"""Work on Ray (a local Ray with 2 workers, started once per session): the same rows and the same
maps as in-process, and a worker killed mid-run is retried with nothing counted or written twice.

The kill is real: the task's worker process SIGKILLs itself at a failpoint on its first attempt
(`$ATLAS_FAILPOINT_ONCE` names a marker file; the process that creates it dies, the retry runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from engine.align.map import load_map, save_map
from engine.distributed import RayConfig, map_ordered
from engine.errors import AtlasError, BadValueError
from engine.labelling import run as labelling
from engine.store.store import AtlasSource, IndexPlacement
from tests.labelling.test_labelling import rows_of
from tests.search.test_search import D_SUBJECT, make_mapped_store

ray = pytest.importorskip("ray")

CONFIG = RayConfig()  # the session's Ray is used as it is


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test here: 2 CPUs, no dashboard, quiet, a small object store."""
    if not ray.is_initialized():
        # workers import this module by its pytest name (`tests.distributed.test_ray`) to run the
        # helpers below: the repository root on their path
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


@pytest.mark.slow  # the quick loop keeps one Ray labelling run and the killed worker; CI runs it
def test_ray_rows_are_bit_identical_where_the_search_threads_matter(ray_local, store, tmp_path):
    """An atlas large enough that FAISS's scores change in their last bits with its thread count
    (8000 x 384: 300 of 5000 rows differed while workers searched on one thread, the driver on two)."""
    from engine.align.map import AlignmentMap

    rng = np.random.default_rng(0)
    d_s, d_a = 128, 384
    store.add_atlas(
        "big", rng.normal(size=(8000, d_a)).astype(np.float32), [f"c{i}" for i in range(8000)],
        source=AtlasSource(model="f", layer=1), index=IndexPlacement(spec="Flat"),
    )
    store.add_model("sub", d_model=d_s)
    q, _ = np.linalg.qr(rng.normal(size=(d_a, d_s)))
    w = q.T.astype(np.float32)
    save_map(store, AlignmentMap(w, w.T, np.zeros(d_s), np.zeros(d_a), "procrustes", subject_model="sub",
                                subject_layer=1, atlas="big"), "bm")
    np.save(tmp_path / "f.npy", rng.normal(size=(1000, d_s)).astype(np.float32))
    for name, ray_config in (("here", None), ("there", CONFIG)):
        labelling.label_features(store, "bm", str(tmp_path / "f.npy"), k=5, batch_size=500, name=name, quiet=True,
                                 ray=ray_config)
    assert store.run_label_rows("there", 0, 1000) == store.run_label_rows("here", 0, 1000)


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


@pytest.mark.slow  # the quick loop keeps one Ray labelling run and the killed worker; CI runs it
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


@pytest.mark.slow  # the quick loop keeps one Ray labelling run and the killed worker; CI runs it
def test_map_ordered_keeps_order_and_raises_the_library_error(ray_local):
    assert list(map_ordered(ray_local, _square, [(i,) for i in range(7)], window=3)) == [i * i for i in range(7)]
    with pytest.raises(BadValueError, match="bad value 1"):  # the first shard's own exception, not a Ray wrapper
        list(map_ordered(ray_local, _refuse, [(1,), (2,)], window=2))
    with pytest.raises(AtlasError, match="died"):  # a worker that dies on every try ends the run
        list(map_ordered(ray_local, _die, [(1,)], window=1, max_retries=1))


# ---------------------------------------------------------------------- alignment


@pytest.fixture
def world_store(store, tiny_world):
    from engine.store import layout
    from engine.world.locate import ensure_registered

    os.symlink(tiny_world.path, store.path / layout.MODELS_DIR / tiny_world.path.name)  # nothing trained twice
    return store, ensure_registered(store, "tiny", 0)


@pytest.mark.slow
def test_ray_alignment_fits_the_in_process_maps_though_a_worker_is_killed(ray_local, world_store, monkeypatch,
                                                                          tmp_path):
    from engine.align.fit import align_layers
    from engine.align.pairing import PairingConfig
    from engine.align.request import AlignRequest
    from engine.models.hooks import Site
    from engine.world.locate import world_texts

    store, world = world_store
    train, held = world_texts(world)
    train, held = train[:240], held[:60]  # 8 batches of 16 each side of the 2 shards, and a held-out task
    sub = world.subject_a
    layers = Site((sub.default_layer - 1, sub.default_layer))
    config = PairingConfig(batch_size=16, stats_dtype="float64")  # float64 products: shows the merge is exact
    request = AlignRequest(sub.name, world.atlas_name, train, held, layers, config=config)
    here = align_layers(store, dataclasses.replace(request, name="here"), quiet=True)
    marker = kill_once(monkeypatch, tmp_path, "align.shard")
    there = align_layers(store, dataclasses.replace(request, name="there", ray=CONFIG), quiet=True)
    assert marker.exists()  # a worker died mid-pass; its shard was run again and counted once
    for h, t in zip(here, there, strict=True):
        assert (t.subject_layer, t.n_pairs, t.corpus_fingerprint) == (h.subject_layer, h.n_pairs, h.corpus_fingerprint)
        a, b = load_map(store, h.name), load_map(store, t.name)
        # the same map to rounding (relative Frobenius norm of the difference; the map is stored in float32;
        # with float32 statistics the in-process map itself is ~3e-5 from the float64 one, see README)
        for x, y in ((a.weight, b.weight), (a.subject_mean, b.subject_mean), (a.atlas_mean, b.atlas_mean)):
            assert np.linalg.norm(x.astype(np.float64) - y) <= 1e-6 * np.linalg.norm(x)
        assert t.metrics["n_heldout"] == h.metrics["n_heldout"]
        assert t.metrics["heldout_r2"] == pytest.approx(h.metrics["heldout_r2"], abs=1e-6)
        assert t.metrics["heldout_cosine"] == pytest.approx(h.metrics["heldout_cosine"], abs=1e-6)

    # a plug-in's feature source (ConceptWorld's native:) opens on the workers too
    top = f"here-L{sub.default_layer}"
    labelling.label_features(store, top, "native:tiny:0", k=3, name="native-here", quiet=True)
    labelling.label_features(store, top, "native:tiny:0", k=3, name="native-ray", quiet=True, ray=CONFIG)
    assert rows_of(store, "native-ray") == rows_of(store, "native-here") != []


def test_a_pair_cap_is_refused_on_ray(store):
    from engine.align.fit import accumulate_pairs_on_ray
    from engine.align.pairing import PairingConfig
    from engine.models.hooks import Site

    with pytest.raises(BadValueError, match="corpus order"):
        accumulate_pairs_on_ray(store, "s", "f", ["a"], [], (Site((0,)), Site((0,))), PairingConfig(max_pairs=10),
                                CONFIG)


@pytest.mark.slow  # the quick loop keeps one Ray labelling run and the killed worker; CI runs it
def test_label_cli_with_ray_gives_the_in_process_rows(ray_local, mapped):
    from click.testing import CliRunner

    from engine.cli import cli

    store, path = mapped
    base = ["label", "m", "--features", str(path), "-k", "3", "--batch", "50", "--json", "--store", str(store.path)]
    here = CliRunner().invoke(cli, [*base, "--name", "here"])
    there = CliRunner().invoke(cli, [*base, "--name", "there", "--ray"])  # the session's Ray
    assert here.exit_code == 0 and there.exit_code == 0, there.output
    assert json.loads(there.output)["status"] == "done"
    assert rows_of(store, "there") == rows_of(store, "here")
