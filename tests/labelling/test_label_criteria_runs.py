"""Labelling runs under each criterion (nn, csls, isf), with a confidence on every label (issue 25).

Real store, real FAISS index, real SQLite: the rows of a run are checked against the brute-force
criterion (`criterion_scores` over the full matrix), a SIGKILLed run is resumed to exactly the rows
of an uninterrupted one, the confidence column is the shipped model's prediction on the signals
recomputed here from scratch, and exports and the run page honour --min-confidence.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

import indexes
from engine.cli import cli
from engine.errors import BadValueError, SourceChangedError
from engine.labelling import request
from engine.labelling import run as labelling
from engine.labelling.confidence import NO_MATCH
from engine.labelling.criteria import AtlasSideStats, AtlasStat, candidate_k, criterion_scores, rerank, top_k
from engine.labelling.export import export_run, iter_labels, label_page
from engine.search import project
from engine.store.schema import ConceptRow, FeatureLabelRow, LabelRunRow
from engine.store.store import Store
from tests.labelling.test_labelling import mapped  # noqa: F401 - the fixture: 230 features through map m
from tests.quick import some_quick
from tests.search.test_search import N_CONCEPTS, make_mapped_store

REPO = Path(__file__).resolve().parents[2]
N = 230  # the features of `mapped`
CRITERIA = ("nn", "csls", "isf")


def rows_of(store, name):
    """Every stored row of a run: (feature, rank, concept id, score, confidence), in order."""
    with store.read_session() as s:
        run_id = s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name))
        q = (select(FeatureLabelRow.feature_index, FeatureLabelRow.rank, FeatureLabelRow.concept_id,
                    FeatureLabelRow.score, FeatureLabelRow.confidence)
             .where(FeatureLabelRow.run_id == run_id).order_by(FeatureLabelRow.feature_index, FeatureLabelRow.rank))
        return [tuple(r) for r in s.execute(q)]


def brute_stat(q: np.ndarray, atlas: np.ndarray, k: int = 10, beta: float = 30.0) -> AtlasStat:
    """The atlas-side statistic from the full similarity matrix (no streaming)."""
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (atlas / np.linalg.norm(atlas, axis=1, keepdims=True)).T
    top = -np.sort(-cos, axis=0)[:k]
    z = beta * cos.astype(np.float64)
    m = z.max(0)
    log_z = m + np.log(np.exp(z - m).sum(0))
    return AtlasStat(k, beta, top.mean(0).astype(np.float32), log_z, len(q), top[0].astype(np.float32))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_rows_are_the_brute_force_criterion(mapped, criterion):  # noqa: F811
    store, atlas, amap, feats, path = mapped
    run = labelling.label_features(store, "m", str(path), k=4, batch_size=64, criterion=criterion, quiet=True)
    assert run.status == "done" and run.params["criterion"] == criterion
    q = project(amap, feats)
    stat = brute_stat(q, atlas)
    exact_s, exact_i = top_k(criterion_scores(q, atlas, criterion, stat if criterion != "nn" else None), 4)
    labels = list(iter_labels(store, run.name))
    ids = np.array([[h.ordinal for h in fl.hits] for fl in labels])
    scores = np.array([[h.score for h in fl.hits] for fl in labels])
    if criterion == "isf":
        # isf re-ranks the candidate_k cosine neighbours (criteria.py): exact on them, and the
        # first hit is the full matrix's on nearly every row of this (hub-free, random) data
        cs, ci = top_k(criterion_scores(q, atlas, "nn"), candidate_k(4, len(atlas)))
        exact_s, exact_i = rerank(cs, ci, "isf", stat, 4)
        full = top_k(criterion_scores(q, atlas, "isf", stat), 1)[1][:, 0]
        assert (ids[:, 0] == full).mean() > 0.95
    np.testing.assert_allclose(scores, exact_s, rtol=1e-4, atol=1e-4)
    assert (ids[:, 0] == exact_i[:, 0]).mean() > 0.99  # float ties aside
    if criterion == "nn":
        assert "files" not in run.params  # nn makes no pre-pass and saves nothing
    else:
        rec = run.params["files"]["stat"]
        assert rec["file"].startswith("runs/") and len(rec["sha256"]) == 64
        saved = AtlasStat.load(store.path / rec["file"])
        np.testing.assert_allclose(saved.r_atlas, stat.r_atlas, atol=1e-5)
        if criterion == "isf":
            np.testing.assert_allclose(saved.log_z, stat.log_z, rtol=1e-6)
        # the candidates the rows were re-ranked from: each feature's exact cosine top-k'
        with np.load(store.path / run.params["files"]["cand"]["file"]) as z:
            cs, ci = z["scores"], z["ids"]
        ws, wi = top_k(criterion_scores(q, atlas, "nn"), candidate_k(4, len(atlas)))
        np.testing.assert_allclose(cs, ws, atol=1e-5)
        assert cs.shape == (N, candidate_k(4, len(atlas))) and (ci == wi).mean() > 0.99


@pytest.mark.parametrize("criterion", ["csls", "isf"])
def test_resume_reads_the_recorded_statistic_and_gives_the_same_rows(mapped, criterion, monkeypatch):  # noqa: F811
    store, _, _, _, path = mapped
    clean = labelling.label_features(store, "m", str(path), k=3, batch_size=50, name="clean", criterion=criterion,
                                     quiet=True)
    labelling.create_run(store, "m", str(path), k=3, batch_size=50, name="cut", criterion=criterion)
    part = labelling.run_labelling(store, "cut", max_batches=2, quiet=True)
    assert (part.status, part.n_done) == ("interrupted", 100)

    def no_recompute(*a, **kw):
        raise AssertionError("a resumed run must read its statistic back, not stream it again")

    monkeypatch.setattr(AtlasSideStats, "update", no_recompute)
    monkeypatch.setattr(indexes.FaissIndex, "search", no_recompute)  # nor search: the candidates are recorded
    done = labelling.run_labelling(store, "cut", quiet=True)
    assert done.status == "done" and done.params["files"] == part.params["files"]
    assert set(done.params["files"]) == {"stat", "cand"}
    assert [r[1:] for r in rows_of(store, "cut")] == [r[1:] for r in rows_of(store, clean.name)]
    # a statistic file that changed cannot be resumed from
    labelling.create_run(store, "m", str(path), k=3, batch_size=50, name="bad", criterion=criterion)
    monkeypatch.undo()
    labelling.run_labelling(store, "bad", max_batches=1, quiet=True)
    for kind in ("stat", "cand"):
        f = store.path / store.run("bad").params["files"][kind]["file"]
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
        with pytest.raises(SourceChangedError, match=f"the {kind} file .* changed"):
            labelling.run_labelling(store, "bad", quiet=True)
        f.write_bytes(data)
    # removing the run removes its files; gc claims nothing left
    files = [store.path / rec["file"] for rec in store.run("bad").params["files"].values()]
    store.remove_run("bad")
    assert not any(f.exists() for f in files) and store.leftovers() == []


def _label_cmd(store, path, criterion, name):
    return [sys.executable, "-m", "engine.cli", "label", "m", "--features", str(path), "-k", "3", "--batch", "40",
            "--name", name, "--criterion", criterion, "--store", str(store.path), "--quiet"]


POINTS = ("label.stat_saved", "label.batch_committed")


@pytest.mark.parametrize("point, criterion", some_quick(
    [(p, c) for p in POINTS for c in CRITERIA if not (p == "label.stat_saved" and c == "nn")],  # nn has no statistic
    quick=[("label.stat_saved", "csls"), ("label.batch_committed", "isf")]))
def test_sigkilled_run_resumes_to_the_uninterrupted_rows(mapped, criterion, point):  # noqa: F811
    """A real `atlas label` process killed (SIGKILL) after its statistic is saved or after a batch
    commits, then resumed: the rows are those of a clean run, under each criterion."""
    store, _, _, _, path = mapped
    env = {"PYTHONPATH": str(REPO), "ATLAS_QUIET": "1", "ATLAS_FAILPOINT": point,
           **{k: v for k, v in __import__("os").environ.items() if k not in ("ATLAS_FAILPOINT",)}}
    env["ATLAS_FAILPOINT"] = point
    r = subprocess.run(_label_cmd(store, path, criterion, "killed"), env=env, capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()
    cut = store.run("killed")
    # killed before the run recorded its statistic (and started): still pending; after a batch: interrupted
    assert (cut.status, cut.n_done) == (("pending", 0) if point == "label.stat_saved" else ("interrupted", 40))
    if point == "label.stat_saved":  # the file was written, its record not: a leftover gc removes
        # (the statistic and the candidates)
        assert "files" not in cut.params and [x.state for x in store.leftovers()] == ["orphan", "orphan"]
        store.gc()
    env.pop("ATLAS_FAILPOINT")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "--resume", "killed", "--store", str(store.path),
                        "--quiet"], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    clean = labelling.label_features(store, "m", str(path), k=3, batch_size=40, name="clean", criterion=criterion,
                                     quiet=True)
    assert store.run("killed").status == "done"
    assert [r[1:] for r in rows_of(store, "killed")] == [r[1:] for r in rows_of(store, clean.name)]
    assert store.leftovers() == []


@pytest.mark.parametrize("criterion", ["nn", "csls"])
def test_confidence_is_the_models_prediction_on_the_signals(mapped, criterion):  # noqa: F811
    store, atlas, amap, feats, path = mapped
    run = labelling.label_features(store, "m", str(path), k=3, batch_size=64, criterion=criterion, quiet=True)
    model = labelling.default_confidence("map.nn" if criterion == "nn" else "map.stat")
    assert run.params["confidence"]["coef"] == list(model.coef)
    assert {"worlds", "reported_seeds_excluded"} <= set(request._default_models()["meta"])
    assert not {0, 1, 2} & {w["seed"] for w in model.meta["fitted_on"]}  # development seeds only
    q = project(amap, feats)
    cos = criterion_scores(q, atlas, "nn")
    order = np.argsort(-cos, axis=1)[:, :2]
    top2 = np.take_along_axis(cos, order, 1)
    signals = np.zeros((len(q), 4))
    signals[:, 0], signals[:, 1] = top2[:, 0], top2[:, 0] - top2[:, 1]
    if criterion == "csls":
        stat = brute_stat(q, atlas)
        c = -np.sort(-criterion_scores(q, atlas, "csls", stat), axis=1)[:, :2]
        signals[:, 2] = c[:, 0] - c[:, 1]
        signals[:, 3] = cos.argmax(0)[order[:, 0]] == np.arange(len(q))  # mutual nearest neighbours
        assert 0 < signals[:, 3].sum() < len(q)
    cols = [0, 1] if criterion == "nn" else [0, 1, 2, 3]
    expected = model.predict(signals[:, cols])
    rows = rows_of(store, run.name)
    conf = np.array([r[4] for r in rows if r[1] == 1])
    assert all(r[4] is None for r in rows if r[1] > 1)
    np.testing.assert_allclose(conf, expected, atol=1e-4)
    assert 0 < conf.min() < conf.max() < 1


def test_export_with_min_confidence_writes_no_match(mapped, tmp_path):  # noqa: F811
    store, _, _, _, path = mapped
    run = labelling.label_features(store, "m", str(path), k=2, batch_size=64, name="r", quiet=True)
    conf = np.array([fl.confidence for fl in iter_labels(store, run.name)])
    p = float(np.median(conf))
    below = int((conf < p).sum())
    assert 0 < below < len(conf)
    buf = io.StringIO()
    assert export_run(store, "r", buf, "jsonl", min_confidence=p) == N  # nothing dropped
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    misses = [d for d in lines if d["label"] == NO_MATCH]
    assert len(misses) == below and all(d["concept"] is None and d["confidence"] < p for d in misses)
    assert all(d["confidence"] >= p and d["label"] == d["hits"][0]["label"] for d in lines if d["label"] != NO_MATCH)
    buf = io.StringIO()
    export_run(store, "r", buf, "csv", min_confidence=p)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert sum(r["label"] == NO_MATCH for r in rows) == below and len(rows) == below + 2 * (N - below)
    # the CLI: the same file, and --help says what happens below the threshold
    st = ["--store", str(store.path)]
    out = CliRunner().invoke(cli, ["export", "r", "--min-confidence", str(p), *st])
    assert out.exit_code == 0 and sum(json.loads(x)["label"] == NO_MATCH for x in out.output.splitlines()) == below
    assert "no match" in CliRunner().invoke(cli, ["export", "--help"]).output
    out = CliRunner().invoke(cli, ["export", "r", "--min-confidence", "1.5", *st])
    assert out.exit_code == 2
    # a run labelled without confidence refuses a threshold (every row would be no match)
    labelling.label_features(store, "m", str(path), k=2, name="plain", confidence="none", quiet=True)
    with pytest.raises(BadValueError, match="no label confidence"):
        export_run(store, "plain", io.StringIO(), min_confidence=0.5)


def test_cli_label_criterion_and_min_confidence(mapped):  # noqa: F811
    store, _, _, _, path = mapped
    st = ["--store", str(store.path)]
    r = CliRunner().invoke(cli, ["label", "m", "--features", str(path), "--criterion", "csls", "--csls-k", "5",
                                 "--name", "c", "--min-confidence", "0.3", "--json", *st])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["params"]["criterion"] == "csls" and out["params"]["csls_k"] == 5
    conf = np.array([fl.confidence for fl in iter_labels(store, "c")])
    assert out["confidence"]["n_matched"] == int((conf >= 0.3).sum())
    assert out["confidence"]["mean"] == pytest.approx(conf.mean())
    r = CliRunner().invoke(cli, ["label", "m", "--features", str(path), "--name", "n", "--min-confidence", "0.3", *st])
    assert r.exit_code == 0 and "labels at confidence >= 0.3" in r.output and "by nn" in r.output
    r = CliRunner().invoke(cli, ["label", "--resume", "c", "--criterion", "isf", *st])
    assert r.exit_code == 2 and "run records them" in r.output
    r = CliRunner().invoke(cli, ["label", "m", "--features", str(path), "--criterion", "bogus", *st])
    assert r.exit_code == 2


def test_run_page_marks_labels_below_min_confidence(mapped):  # noqa: F811
    import httpx

    from engine.serve.app import create_app
    from tests.serve_helpers import running

    store, _, _, _, path = mapped
    labelling.label_features(store, "m", str(path), k=2, batch_size=64, name="r", quiet=True)
    page = label_page(store, "r", "confidence", descending=True, limit=N)
    conf = [fl.confidence for fl in page]
    assert conf == sorted(conf, reverse=True)
    p = float(np.median(conf))
    with running(create_app(store)) as url, httpx.Client(base_url=url, timeout=60) as client:
        _check_page(client, conf, p)
    static = (REPO / "engine" / "serve" / "static" / "app.js").read_text()
    assert "min_confidence" in static


def _check_page(client, conf, p):
    body = client.get("/api/runs/r/rows", params={"order": "confidence", "desc": True, "min_confidence": p, "limit": N}).json()
    rows = body["rows"]
    assert body["min_confidence"] == p and [r["confidence"] for r in rows] == pytest.approx(conf)
    assert all((r["label"] == NO_MATCH) == (r["confidence"] < p) for r in rows)
    assert any(r["label"] == NO_MATCH for r in rows) and all(r["hits"] for r in rows)
    text = client.get("/api/runs/r/export", params={"min_confidence": p}).text
    assert sum(json.loads(x)["label"] == NO_MATCH for x in text.splitlines()) == sum(c < p for c in conf)
    assert client.get("/api/runs/r/rows", params={"min_confidence": 2}).status_code == 422


# ---------------------------------------------------------------------- labelled concepts only


@pytest.fixture
def partly_labelled(store, tmp_path):
    """`mapped`'s store with every third atlas concept unlabelled (an SAE atlas with explanations for some latents)."""
    labels = [None if i % 3 == 0 else f"concept {i}" for i in range(N_CONCEPTS)]
    atlas, amap = make_mapped_store(store, labels=labels)
    feats = np.random.default_rng(7).normal(size=(N, amap.d_subject)).astype(np.float32)
    path = tmp_path / "feats.npy"
    np.save(path, feats)
    return store, atlas, amap, feats, path, np.array([i for i in range(N_CONCEPTS) if i % 3])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_labelled_only_rows_are_the_brute_force_over_labelled_concepts(partly_labelled, criterion):
    """A labelled-only run ranks the labelled concepts only, as the criterion over that sub-atlas
    (its statistic over those concepts' queries) ranks them, ordinals the atlas's."""
    store, atlas, amap, feats, path, cols = partly_labelled
    run = labelling.label_features(store, "m", str(path), k=4, batch_size=64, criterion=criterion,
                                   labelled_only=True, quiet=True)
    assert run.status == "done" and run.params["labelled_only"] is True
    assert {"labelled", "stat", "cand"} <= set(run.params["files"])
    with np.load(store.path / run.params["files"]["labelled"]["file"]) as z:
        assert z["ordinals"].tolist() == cols.tolist()
    q = project(amap, feats)
    sub = atlas[cols]
    stat = brute_stat(q, sub)
    cs, ci = top_k(criterion_scores(q, sub, "nn"), candidate_k(4, len(sub)))
    exact_s, exact_i = rerank(cs, ci, criterion, stat if criterion != "nn" else None, 4)
    labels = list(iter_labels(store, run.name))
    ids = np.array([[h.ordinal for h in fl.hits] for fl in labels])
    scores = np.array([[h.score for h in fl.hits] for fl in labels])
    assert all(h.labelled for fl in labels for h in fl.hits) and set(ids.ravel()) <= set(cols.tolist())
    np.testing.assert_allclose(scores, exact_s, rtol=1e-4, atol=1e-4)
    assert (ids[:, 0] == cols[exact_i[:, 0]]).mean() > 0.99  # float ties aside
    # the recorded statistic is the sub-atlas's, scattered onto the atlas's ordinals
    saved = AtlasStat.load(store.path / run.params["files"]["stat"]["file"])
    np.testing.assert_allclose(saved.r_atlas[cols], stat.r_atlas, atol=1e-5)
    assert not saved.r_atlas[np.setdiff1d(np.arange(len(atlas)), cols)].any()
    # without the option the same features hit unlabelled concepts too
    plain = labelling.label_features(store, "m", str(path), k=4, criterion=criterion, name="all", quiet=True)
    assert not all(h.labelled for fl in iter_labels(store, plain.name) for h in fl.hits)


def test_labelled_only_needs_a_labelled_concept_and_records_its_concepts(partly_labelled, store, tmp_path):
    store, atlas, amap, feats, path, cols = partly_labelled
    labelling.create_run(store, "m", str(path), k=3, batch_size=50, name="cut", labelled_only=True)
    part = labelling.run_labelling(store, "cut", max_batches=2, quiet=True)
    assert (part.status, part.n_done) == ("interrupted", 100)
    # relabelling the atlas after the run started does not change what the run ranks: it reads its file
    with store.session() as s:
        for row in s.scalars(select(ConceptRow)):
            row.labelled = True
    done = labelling.run_labelling(store, "cut", quiet=True)
    assert done.status == "done"
    assert {h.ordinal for fl in iter_labels(store, "cut") for h in fl.hits} <= set(cols.tolist())
    bare = Store.init(tmp_path / "bare")
    make_mapped_store(bare, labels=[None] * 400)
    with pytest.raises(BadValueError, match="no labelled concepts"):
        labelling.create_run(bare, "m", str(path), labelled_only=True)
    bare.close()


@pytest.mark.parametrize("point, criterion", some_quick([(p, c) for p in POINTS for c in ("nn", "csls")],
                                                       quick=[("label.stat_saved", "csls")]))
def test_sigkilled_labelled_only_run_resumes_to_the_uninterrupted_rows(partly_labelled, criterion, point):
    """`atlas label --labelled-only` killed (SIGKILL) after its pre-pass is saved or after a batch,
    then resumed: the rows of a clean run."""
    store, _, _, _, path, _ = partly_labelled
    env = {**{k: v for k, v in __import__("os").environ.items()}, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1",
           "ATLAS_FAILPOINT": point}
    r = subprocess.run([*_label_cmd(store, path, criterion, "killed"), "--labelled-only"], env=env,
                       capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()
    cut = store.run("killed")
    assert (cut.status, cut.n_done) == (("pending", 0) if point == "label.stat_saved" else ("interrupted", 40))
    if point == "label.stat_saved":  # the concepts, the statistic and the candidates: written, not recorded
        assert "files" not in cut.params and [x.state for x in store.leftovers()] == ["orphan"] * 3
        store.gc()
    env.pop("ATLAS_FAILPOINT")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "--resume", "killed", "--store", str(store.path),
                        "--quiet"], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "--resume", "killed", "--labelled-only",
                        "--store", str(store.path)], env=env, capture_output=True, timeout=300)
    assert r.returncode == 2 and b"run records them" in r.stderr
    clean = labelling.label_features(store, "m", str(path), k=3, batch_size=40, name="clean", criterion=criterion,
                                     labelled_only=True, quiet=True)
    assert store.run("killed").status == "done" and store.run("killed").params["labelled_only"] is True
    assert [r[1:] for r in rows_of(store, "killed")] == [r[1:] for r in rows_of(store, clean.name)]
    assert store.leftovers() == []
