"""Bulk labelling runs on a real store: exact results, resume after interruption, export, CLI."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from engine.align.map import save_map
from engine.cli import cli
from engine.errors import AtlasError, BadNameError, DuplicateError, NotFoundError, SiteMismatchError
from engine.labelling import export as labelling_export
from engine.labelling import run as labelling
from engine.labelling.run import RunConflictError, SourceChangedError
from engine.search import project
from engine.store.schema import ConceptRow, FeatureLabelRow, LabelRunRow
from engine.store.store import Store
from engine.util import unit_rows
from tests.search.test_search import D_SUBJECT, brute_force, make_mapped_store

pytestmark = pytest.mark.backends("sqlite", "postgresql")


@pytest.fixture
def mapped(store, tmp_path):
    atlas, amap = make_mapped_store(store)
    feats = np.random.default_rng(7).normal(size=(230, D_SUBJECT)).astype(np.float32)
    path = tmp_path / "feats.npy"
    np.save(path, feats)
    return store, atlas, amap, feats, path


def rows_of(store, name):
    """Every stored row of a run as (feature, rank, concept ordinal, score), in order."""
    with store.session() as s:
        run_id = s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name))
        q = (select(FeatureLabelRow.feature_index, FeatureLabelRow.rank, ConceptRow.ordinal, FeatureLabelRow.score)
             .join(ConceptRow, FeatureLabelRow.concept_id == ConceptRow.id)
             .where(FeatureLabelRow.run_id == run_id)
             .order_by(FeatureLabelRow.feature_index, FeatureLabelRow.rank))
        return [tuple(r) for r in s.execute(q)]


def test_labels_are_the_exact_top_k(mapped):
    store, atlas, amap, feats, path = mapped
    run = labelling.label_features(store, "m", str(path), k=4, batch_size=64, quiet=True)
    assert (run.status, run.n_done, run.n_features, run.k) == ("done", 230, 230, 4)
    rows = rows_of(store, run.name)
    assert len(rows) == 230 * 4 == store.count_run_labels(run.name)
    q = project(amap, feats)
    exact, _ = brute_force(q, atlas, 4)
    sims = unit_rows(q) @ unit_rows(atlas).T
    scores = np.array([r[3] for r in rows]).reshape(230, 4)
    ords = np.array([r[2] for r in rows]).reshape(230, 4)
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, ords, 1), scores, atol=1e-5)  # ties may swap ids
    assert [r[1] for r in rows[:8]] == [1, 2, 3, 4] * 2


def test_interrupted_run_resumes_to_the_same_rows(mapped):
    store, _, _, _, path = mapped
    clean = labelling.label_features(store, "m", str(path), k=3, batch_size=50, name="clean", quiet=True)
    labelling.create_run(store, "m", str(path), k=3, batch_size=50, name="cut")
    part = labelling.run_labelling(store, "cut", max_batches=2, quiet=True)
    assert (part.status, part.n_done) == ("interrupted", 100)
    assert len(rows_of(store, "cut")) == 100 * 3  # a consistent prefix: every row of it, none after
    done = labelling.run_labelling(store, "cut", quiet=True)
    assert (done.status, done.n_done) == ("done", 230)
    assert rows_of(store, "cut") == rows_of(store, clean.name)


def test_ctrl_c_marks_interrupted_and_a_failure_marks_failed(mapped, monkeypatch):
    store, _, _, _, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    index = store.index("at")
    calls = {"n": 0}
    real = index.search

    def flaky(q, k, exc):
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc
        return real(q, k)

    monkeypatch.setattr(index, "search", lambda q, k: flaky(q, k, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        labelling.run_labelling(store, "r", quiet=True)
    assert (store.run("r").status, store.run("r").n_done) == ("interrupted", 100)
    calls["n"] = 0
    monkeypatch.setattr(index, "search", lambda q, k: flaky(q, k, RuntimeError("disk on fire")))
    with pytest.raises(RuntimeError):
        labelling.run_labelling(store, "r", quiet=True)
    run = store.run("r")
    assert run.status == "failed" and "disk on fire" in run.error and run.n_done == 200
    monkeypatch.setattr(index, "search", real)
    assert labelling.run_labelling(store, "r", quiet=True).status == "done"
    assert len(rows_of(store, "r")) == 230 * 2


def test_resume_refuses_changed_features_or_map(mapped):
    store, _, amap, feats, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    labelling.run_labelling(store, "r", max_batches=1, quiet=True)
    np.save(path, feats * 1.001)
    with pytest.raises(SourceChangedError, match="changed"):
        labelling.run_labelling(store, "r")
    np.save(path, feats)
    save_map(store, amap.__class__(**{**amap.__dict__, "weight": amap.weight * 2, "_torch_cache": {}}), "m",
             overwrite=True)
    with pytest.raises(SourceChangedError, match="refitted"):
        labelling.run_labelling(store, "r")


def test_resume_refuses_a_rebuilt_index_and_allows_an_identical_one(mapped):
    """An index rebuilt between kill and resume (another spec: other candidates) would mix two indexes'
    answers in one run; a Flat rebuild writes the same bytes and changes nothing."""
    store, _, _, _, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    labelling.run_labelling(store, "r", max_batches=1, quiet=True)
    store.rebuild_index("at", "Flat")  # the same index again: same bytes
    labelling.run_labelling(store, "r", max_batches=1, quiet=True)
    store.rebuild_index("at", "HNSW16")
    with pytest.raises(SourceChangedError, match="index of atlas .* was rebuilt"):
        labelling.run_labelling(store, "r")
    store.rebuild_index("at", "Flat")
    assert labelling.run_labelling(store, "r", quiet=True).status == "done"


def test_a_run_removed_while_it_labels_is_reported_as_removed(mapped):
    store, _, _, _, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    worker = store.label_pass("r")  # the labelling process: its first batch, then another process removes
    worker.commit_batch(0, 100, np.zeros((100, 2), np.float32), np.zeros((100, 2), np.int64))
    store.remove_atlas("at", cascade=True)  # the atlas, its map and the run
    with pytest.raises(NotFoundError, match="was removed while it ran") as e:
        worker.commit_batch(100, 200, np.zeros((100, 2), np.float32), np.zeros((100, 2), np.int64))
    assert "another process advanced" not in str(e.value)


def test_two_workers_cannot_both_advance_a_run(mapped):
    store, _, _, _, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    labelling.run_labelling(store, "r", max_batches=1, quiet=True)
    stale = store.label_pass("r")
    ids = np.zeros((100, 2), np.int64)
    with pytest.raises(RunConflictError):  # a stale worker re-committing batch 0
        stale.commit_batch(0, 100, np.zeros((100, 2), np.float32), ids)
    with pytest.raises(RunConflictError):  # a worker whose idea of n_done is behind
        stale.commit_batch(50, 150, np.zeros((100, 2), np.float32), ids)
    assert store.run("r").n_done == 100 and len(rows_of(store, "r")) == 200


def test_duplicate_names_and_overwrite(mapped):
    store, _, _, _, path = mapped
    labelling.label_features(store, "m", str(path), k=2, name="r", quiet=True)
    with pytest.raises(DuplicateError, match="atlas export r"):
        labelling.create_run(store, "m", str(path), k=2, name="r")
    run = labelling.label_features(store, "m", str(path), k=3, name="r", overwrite=True, quiet=True)
    assert run.k == 3 and len(rows_of(store, "r")) == 230 * 3


def test_run_names_follow_the_one_name_rule(mapped):
    store, _, _, _, path = mapped
    with pytest.raises(BadNameError, match="bad labelling run name '../r'"):
        labelling.create_run(store, "m", str(path), name="../r")
    long_stem = path.with_name("f" * 230 + ".npy")
    path.rename(long_stem)
    run = labelling.create_run(store, "m", str(long_stem), k=2)  # the default name is shortened to fit
    assert run.name.startswith("m.fff") and run.name.endswith(".k2") and len(run.name) == 200


def test_site_recorded_by_an_sae_is_checked(store, saelens_folder):
    make_mapped_store(store)  # map fitted at subj layer 2; the SAE says gemma-2-2b layer 12, d_in=32
    with pytest.raises(SiteMismatchError, match="layer 12"):
        labelling.create_run(store, "m", str(saelens_folder))
    run = labelling.label_features(store, "m", str(saelens_folder), site_check=False, k=1, quiet=True)
    assert run.n_done == 200 and run.params["source_kind"] == "saelens"


def test_export_jsonl_and_csv_with_margins(mapped):
    store, _, _, _, path = mapped
    labelling.label_features(store, "m", str(path), k=3, name="r", batch_size=100, quiet=True)
    feats = list(labelling_export.iter_labels(store, "r"))
    buf = io.StringIO()
    assert labelling_export.export_run(store, "r", buf, "jsonl") == 230
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [d["feature"] for d in lines] == list(range(230))
    first = lines[0]
    assert first["label"] == feats[0].hits[0].label and first["concept"] == feats[0].hits[0].ref
    assert first["margin"] == pytest.approx(first["hits"][0]["score"] - first["hits"][1]["score"])
    assert first["margin"] >= 0 and len(first["hits"]) == 3
    buf = io.StringIO()
    labelling_export.export_run(store, "r", buf, "csv")
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(rows) == 230 * 3 and rows[0].keys() == {"feature", "rank", "concept", "label", "score", "margin",
                                                         "confidence"}
    assert float(rows[0]["score"]) == first["score"] and float(rows[2]["margin"]) == pytest.approx(first["margin"])


def test_neuronpedia_export_round_trips_through_the_neuronpedia_importer(mapped, tmp_path):
    from engine.atlas.labels import read_labels

    store, _, amap, _, path = mapped
    labelling.label_features(store, "m", str(path), k=3, name="r", batch_size=100, quiet=True)
    out = tmp_path / "explanations.jsonl.gz"
    r = CliRunner().invoke(cli, ["export", "r", "--format", "neuronpedia", "-o", str(out), "--store", str(store.path)])
    assert r.exit_code == 0, r.output
    with gzip.open(out, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    tops = {fl.feature: fl.hits[0] for fl in labelling_export.iter_labels(store, "r")}
    assert len(rows) == 230 and rows[0].keys() >= {"modelId", "layer", "index", "description",
                                                    "explanationModelName", "score"}
    assert {row["modelId"] for row in rows} == {amap.subject_model}
    assert {row["explanationModelName"] for row in rows} == {"concept-atlas:m"}
    assert rows[5]["index"] == "5" and rows[5]["score"] == tops[5].score
    table = read_labels(out)  # the importer `atlas import-sae --labels` uses
    assert table.labels == {i: h.label for i, h in tops.items()}


def test_export_of_an_unfinished_run_needs_partial(mapped):
    store, _, _, _, path = mapped
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="r")
    labelling.run_labelling(store, "r", max_batches=1, quiet=True)
    with pytest.raises(AtlasError, match="--resume r"):
        labelling_export.export_run(store, "r", io.StringIO())
    buf = io.StringIO()
    assert labelling_export.export_run(store, "r", buf, partial=True) == 100


# ---------------------------------------------------------------------- CLI


def _ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_cli_label_runs_export_search(mapped, tmp_path):
    store, atlas, amap, feats, path = mapped
    st = ["--store", store.path]
    out = json.loads(_ok("label", "m", "--features", path, "-k", 2, "--batch", 100, "--name", "r", "--json", *st))
    assert (out["status"], out["n_done"]) == ("done", 230)
    runs = json.loads(_ok("runs", "--json", *st))
    assert [(r["name"], r["status"]) for r in runs] == [("r", "done")]
    assert "r" in _ok("runs", *st)
    _ok("export", "r", "--format", "csv", "-o", tmp_path / "r.csv", *st)
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 230 * 2
    assert len(_ok("export", "r", *st).splitlines()) == 230
    np.save(tmp_path / "q.npy", feats[:3])
    hits = json.loads(_ok("search", "m", "--vectors", tmp_path / "q.npy", "-k", 4, "--json", *st))
    assert len(hits) == 12 and hits[0]["query"] == 0 and hits[0]["rank"] == 1
    exact, _ = brute_force(project(amap, feats[:3]), atlas, 4)
    assert hits[0]["score"] == pytest.approx(exact[0, 0], abs=1e-5)
    # user mistakes are one line, exit 1 (or usage errors, exit 2)
    r = CliRunner().invoke(cli, ["label", "m", "--features", str(path), "--name", "r", *map(str, st)])
    assert r.exit_code == 1 and "--overwrite" in r.output and "Traceback" not in r.output
    assert CliRunner().invoke(cli, ["label", "--resume", "r", "m", *map(str, st)]).exit_code == 2
    r = CliRunner().invoke(cli, ["label", "--resume", "nope", *map(str, st)])
    assert r.exit_code == 1 and "atlas runs" in r.output


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
def test_killed_process_resumes_to_exactly_the_uninterrupted_rows(store, tmp_path):
    """A real `atlas label` process, SIGKILLed mid-run, then resumed: same rows as a clean run."""
    make_mapped_store(store)
    n = 12_000
    path = tmp_path / "many.npy"
    np.save(path, np.random.default_rng(9).normal(size=(n, D_SUBJECT)).astype(np.float32))
    cmd = [sys.executable, "-c", "from engine.cli import main; main()", "label", "m", "--features", str(path),
           "-k", "3", "--batch", "40", "--name", "killed", "--store", str(store.path), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n_done, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with store.read_session() as s:  # the subprocess found the database through the store folder
                n_done = s.scalar(select(LabelRunRow.n_done).where(LabelRunRow.name == "killed")) or 0
            if n_done >= 500:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    cut = store.run("killed")
    assert cut.status == "interrupted" and 500 <= cut.n_done < n and cut.n_done % 40 == 0
    assert len(rows_of(store, "killed")) == cut.n_done * 3  # committed prefix, nothing half-written
    out = _ok("label", "--resume", "killed", "--store", store.path, "--quiet")
    assert "12000/12000" in out
    clean = labelling.label_features(store, "m", str(path), k=3, batch_size=40, name="clean", quiet=True)
    assert clean.status == "done"
    assert rows_of(store, "killed") == rows_of(store, "clean")


def test_store_reopened_sees_runs(mapped):
    store, _, _, _, path = mapped
    labelling.label_features(store, "m", str(path), k=2, name="r", quiet=True)
    with Store.open(store.path) as again:
        assert [r.name for r in again.runs()] == ["r"]


def test_native_features_need_a_world_subject(mapped):
    store = mapped[0]
    with pytest.raises(AtlasError, match="not a ConceptWorld model"):
        labelling.create_run(store, "m", "native:")
    with pytest.raises(AtlasError, match="native:SIZE"):
        labelling.create_run(store, "m", "native:huge")


def test_native_spec_names_every_world_size():
    """``native:medium`` (and a bare ``native:`` on a medium subject) name the medium world, as
    `atlas eval labelling --world --size medium` writes them; an unknown size is refused."""
    from engine.world.sources import _native_world

    assert _native_world("native:medium:0", "world-medium-subject-a") == ("medium", 0)
    assert _native_world("native:", "world-medium-s7-subject-b") == ("medium", 7)
    assert _native_world("native:small", "anything") == ("small", 0)
    with pytest.raises(AtlasError, match=r"SIZE tiny, small, medium"):
        _native_world("native:huge", "world-medium-subject-a")


def test_a_new_run_loads_its_map_once(mapped, monkeypatch):
    """`label_features` (and `atlas label`, through `prepare_run`) reads the map file once per run."""
    store, _, _, _, path = mapped
    loads = []
    real = type(store).map_record

    def counted(self, name):
        loads.append(name)
        return real(self, name)

    monkeypatch.setattr(type(store), "map_record", counted)
    run = labelling.label_features(store, "m", str(path), k=2, batch_size=100, name="once", quiet=True)
    assert run.status == "done" and loads == ["m"]
    labelling.create_run(store, "m", str(path), k=2, batch_size=100, name="twice")
    labelling.run_labelling(store, "twice", quiet=True)  # a resume (no prepared run) loads it again
    assert loads == ["m", "m", "m"]
