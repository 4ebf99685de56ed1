"""Top contexts (`atlas contexts`) on a tiny real model: the stored windows equal a brute-force top-k over
every token of the corpus, for an atlas's own model (SAE encoder and plain projection) and for a map's
subject; a run stopped by an error, by a chunk limit or by SIGKILL resumes to exactly the same rows."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import engine.labelling.contexts as contexts
from engine.align.map import load_map, save_map
from engine.errors import BadValueError, DuplicateError, NotFoundError
from engine.labelling.contexts import ContextSettings, make_window, resolve_source, top_contexts
from engine.store.store import AtlasSource, Store
from tests.steering.test_steering import WORDS, D, save_tiny_model
from tests.steering.test_steering_plan import D_ATLAS, DESCRIPTIONS, LABELS, _map

TOP, CHUNK, BATCH, WINDOW = 4, 12, 4, 20
N_OWN = 9  # concepts of the atlases at the subject's own site


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = [w for w in WORDS if w not in (".", ",")]
    path.write_text("\n".join(" ".join(rng.choice(words, size=int(rng.integers(3, 14)))) for _ in range(n)) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with the tiny subject ``subj``; atlases ``sae`` (JumpReLU encoder) and ``plain`` at its layer 1;
    atlas ``fdn`` of another model with map ``m1`` from ``subj`` layer 1; a corpus of 40 texts."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("contexts")
    store = Store.init(root / "store")
    folder = save_tiny_model("llama", root / "subject")
    store.add_model("subj", source=str(folder), d_model=D, n_layers=3)
    rng = np.random.default_rng(3)
    w_enc = (10 * rng.normal(size=(D, N_OWN))).astype(np.float32)  # residual norms are ~0.13
    store.add_atlas(
        "sae", rng.normal(size=(N_OWN, D)).astype(np.float32),
        encoder={"W_enc": w_enc, "b_enc": np.full(N_OWN, -0.5, np.float32),
                             "threshold": np.full(N_OWN, 0.5, np.float32)},
        source=AtlasSource(model="subj", layer=1),
    )
    store.add_atlas(
        "plain", rng.normal(size=(N_OWN, D)).astype(np.float32), source=AtlasSource(model="subj", layer=1),
    )
    store.add_atlas(
        "fdn", rng.normal(size=(len(LABELS), D_ATLAS)).astype(np.float32), LABELS, DESCRIPTIONS,
        source=AtlasSource(model="foundation", layer=1),
    )
    save_map(store, _map(1, 1), "m1")
    corpus = write_corpus(root / "corpus.txt", 40)
    yield store, corpus, root
    store.close()
    torch.set_num_threads(n)


def brute_force(store: Store, source: str, texts: list[str], top: int, window: int) -> list[tuple]:
    """Every token's activation of every concept over the whole corpus, then per concept the best token of
    each text and the top texts: the rows `engine.store.contexts.ROW_FIELDS` should hold."""
    import torch

    from engine.atlas.encoder import AtlasEncoder
    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered

    src = resolve_source(store, source)
    model, tok = load_registered(store, src.model)
    batches = list(collect(model, tok, texts, Site((src.layer,), src.hook), batch_size=BATCH, desc=None,
                           dtype=torch.float32))
    x = np.concatenate([next(iter(b.acts.values())).numpy() for b in batches])
    text_index = np.concatenate([b.text_index for b in batches])
    position = np.concatenate([b.position for b in batches])
    offsets = np.concatenate([b.offsets for b in batches])
    if src.map is not None:
        x = load_map(store, src.map).map_activations(x)
    encoder = AtlasEncoder.from_tensors(store.atlas_tensors(src.atlas))
    if encoder is not None:
        acts = encoder.encode(x)
    else:
        v = store.atlas_vectors(src.atlas)
        acts = x @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    rows = []
    for c in range(acts.shape[1]):
        best: dict[int, tuple[float, int]] = {}  # text -> (activation, token row)
        for t in range(acts.shape[0]):
            a = float(acts[t, c])
            if encoder is not None and a <= 0:
                continue  # a feature that does not fire: no context
            i = int(text_index[t])
            if i not in best or a > best[i][0]:
                best[i] = (a, t)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
        for rank, (i, (a, t)) in enumerate(ranked, start=1):
            rows.append((c, rank, a, i, int(position[t]), *make_window(texts[i], *map(int, offsets[t]), window)))
    return rows


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    assert [r[:2] + r[3:] for r in got] == [r[:2] + r[3:] for r in expected]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in expected], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("source", ["sae", "plain", "m1"])
def test_stored_windows_are_the_brute_force_top_k(world, source):
    from engine.align.corpus import read_corpus

    store, corpus, _ = world
    run = top_contexts(store, source, corpus, ContextSettings(TOP, CHUNK, BATCH, WINDOW), quiet=True,
                       overwrite=True)
    assert (run.status, run.n_done, run.n_texts) == ("done", 40, 40)
    assert run.scoring == ("encoder" if source == "sae" else "projection")
    assert run.map == (source if source == "m1" else None) and run.model == "subj"
    rows = store.context_rows(run.id)
    expected = brute_force(store, source, read_corpus(corpus), TOP, WINDOW)
    assert len(rows) > 0
    assert_same(rows, expected)
    # every window marks its token, which is a word of the corpus
    assert all(r[5][r[7]:r[8]] in WORDS for r in rows)
    if source == "sae":  # JumpReLU: fewer than TOP texts for a concept that rarely fires
        assert len(rows) < N_OWN * TOP or all(r[2] > 0 for r in rows)


def test_concept_contexts_per_source(world):
    store, corpus, _ = world
    for source in ("sae", "m1"):
        top_contexts(store, source, corpus, ContextSettings(TOP, CHUNK, BATCH, WINDOW), quiet=True)
    [(run, ctx)] = store.concept_contexts("fdn", 2)
    assert run.map == "m1" and [c.rank for c in ctx] == list(range(1, TOP + 1))
    assert all(c.token and c.window[c.token_start:c.token_end] == c.token for c in ctx)
    assert [c.activation for c in ctx] == sorted((c.activation for c in ctx), reverse=True)
    assert len(store.concept_contexts("fdn", 2, limit=2)[0][1]) == 2
    with pytest.raises(NotFoundError, match="no concept fdn/99"):
        store.concept_contexts("fdn", 99)


def test_interrupted_runs_resume_to_the_same_rows(world, monkeypatch):
    from engine.align.corpus import read_corpus

    store, corpus, _ = world
    kw = dict(settings=ContextSettings(TOP, CHUNK, BATCH, WINDOW), quiet=True)
    clean = store.context_rows(top_contexts(store, "plain", corpus, overwrite=True, **kw).id)

    part = top_contexts(store, "plain", corpus, overwrite=True, max_chunks=2, **kw)
    assert (part.status, part.n_done) == ("interrupted", 2 * CHUNK)
    # the committed rows are the top windows of exactly the texts done
    assert_same(store.context_rows(part.id), brute_force(store, "plain", read_corpus(corpus)[: 2 * CHUNK], TOP, WINDOW))

    calls = {"n": 0}
    real = contexts._best_per_text

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # inside the third chunk's second batch
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(contexts, "_best_per_text", failing)
    with pytest.raises(RuntimeError, match="boom"):
        top_contexts(store, "plain", corpus, **kw)
    monkeypatch.setattr(contexts, "_best_per_text", real)
    failed = store.context_run("plain")
    assert (failed.status, failed.n_done) == ("failed", 2 * CHUNK) and "boom" in failed.error

    done = top_contexts(store, "plain", corpus, **kw)
    assert (done.status, done.n_done) == ("done", 40)
    assert store.context_rows(done.id) == clean  # identical, activations included
    again = top_contexts(store, "plain", corpus, **kw)  # done: a no-op
    assert again.updated_at == done.updated_at and store.context_rows(again.id) == clean


def test_another_corpus_or_top_needs_overwrite(world, tmp_path):
    store, corpus, _ = world
    kw = dict(quiet=True)
    s = dict(chunk=CHUNK, batch_size=BATCH, window=WINDOW)
    top_contexts(store, "m1", corpus, ContextSettings(top=TOP, **s), **kw)
    other = write_corpus(tmp_path / "other.txt", 10, seed=1)
    with pytest.raises(DuplicateError, match="another corpus or settings.*--overwrite replaces them"):
        top_contexts(store, "m1", other, ContextSettings(top=TOP, **s), **kw)
    with pytest.raises(DuplicateError, match="--overwrite"):
        top_contexts(store, "m1", corpus, ContextSettings(top=TOP - 1, **s), **kw)
    run = top_contexts(store, "m1", other, ContextSettings(top=2, **s), overwrite=True, **kw)
    assert (run.n_texts, run.top, run.status) == (10, 2, "done")
    assert {r[1] for r in store.context_rows(run.id)} == {1, 2}
    assert len(store.context_runs()) == len({(r.atlas, r.map) for r in store.context_runs()})  # one per source


def test_bad_input_is_an_atlas_error(world, tmp_path):
    store, corpus, _ = world
    with pytest.raises(NotFoundError, match="no atlas or map named 'nope'"):
        top_contexts(store, "nope", corpus)
    with pytest.raises(NotFoundError, match="no map named 'sae'"):
        resolve_source(store, "map:sae")
    with pytest.raises(BadValueError, match="--top must be between 1"):
        top_contexts(store, "m1", corpus, ContextSettings(top=0))
    with pytest.raises(BadValueError, match="--chunk must be >= 1"):
        top_contexts(store, "m1", corpus, ContextSettings(chunk=0))
    with pytest.raises(NotFoundError, match="model 'foundation' has no recorded source"):
        top_contexts(store, "fdn", corpus)  # the atlas's own model cannot be loaded
    assert store.context_run("fdn") is None  # nothing was recorded
    (tmp_path / "empty.txt").write_text("\n")
    from engine.errors import FormatError

    with pytest.raises(FormatError, match="has no texts"):
        top_contexts(store, "m1", tmp_path / "empty.txt")


def test_make_window_cuts_at_spaces_and_marks_the_token():
    text = "alpha beta gamma delta epsilon zeta"
    w, ws, ts, te = make_window(text, 17, 22, 8)  # "delta"
    assert w[ts:te] == "delta" and text[ws:ws + len(w)] == w and w == "gamma delta epsilon"
    assert make_window(text, 0, 5, 100) == (text, 0, 0, 5)
    assert make_window(text, -1, -1, 4) == ("alpha be", 0, -1, -1)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATLAS_QUIET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
def test_killed_process_resumes_to_exactly_the_uninterrupted_rows(world):
    store, _, root = world
    n = 1000
    corpus = write_corpus(root / "long.txt", n, seed=2)
    if (old := store.context_run("plain")) is not None:
        store.remove_context_run(old.id)
    args = ["contexts", "plain", "--corpus", str(corpus), "--top", "3", "--chunk", "8", "--batch", "4",
            "--store", str(store.path), "--quiet"]
    env = {**os.environ, "ATLAS_QUIET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with sqlite3.connect(store.path / "atlas.db") as db:
                row = db.execute("SELECT n_done FROM context_runs r JOIN atlases a ON r.atlas_id = a.id "
                                 "WHERE a.name = 'plain' AND r.map_id IS NULL").fetchone()
            if row and row[0] >= 16:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    cut = store.context_run("plain")
    assert cut.status == "interrupted" and 16 <= cut.n_done < n and cut.n_done % 8 == 0
    out = _cli(*args)  # the same command continues
    assert out.returncode == 0, out.stderr
    assert f"{n}/{n} texts" in out.stdout and "(done)" in out.stdout
    resumed = store.context_rows(store.context_run("plain").id)
    settings = ContextSettings(top=3, chunk=8, batch_size=4)
    clean = store.context_rows(top_contexts(store, "plain", corpus, settings, quiet=True, overwrite=True).id)
    assert resumed == clean


def test_cli_json_and_one_line_errors(world):
    import json

    from click.testing import CliRunner

    from engine.cli import cli

    store, corpus, _ = world
    st = ["--store", str(store.path), "--quiet"]
    r = CliRunner().invoke(cli, ["contexts", "map:m1", "--corpus", str(corpus), "--top", str(TOP), "--chunk",
                                 str(CHUNK), "--batch", str(BATCH), "--window", str(WINDOW), "--overwrite", "--json", *st])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["map"], out["atlas"], out["status"], out["n_done"]) == ("m1", "fdn", "done", 40)
    for args, message in ((["nope"], "no atlas or map named 'nope'"), (["m1", "--top", "0"], "--top must be"),
                          (["m1", "--top", "2"], "--overwrite replaces them")):
        r = CliRunner().invoke(cli, ["contexts", *args, "--corpus", str(corpus), *st])
        assert r.exit_code == 1 and message in r.output and r.output.count("\n") == 1, r.output


def test_removing_the_map_or_atlas_removes_its_contexts(world):  # last: it removes m1 and sae
    import sqlite3

    store, corpus, _ = world
    top_contexts(store, "sae", corpus, ContextSettings(TOP, CHUNK, BATCH, WINDOW), quiet=True)
    ids = {(r.atlas, r.map): r.id for r in store.context_runs()}
    assert ("fdn", "m1") in ids and ("sae", None) in ids
    store.remove_map("m1")
    store.remove_atlas("sae")
    assert store.context_run("fdn", "m1") is None and store.context_run("sae") is None
    with sqlite3.connect(store.path / "atlas.db") as db:
        left = {r[0] for r in db.execute("SELECT DISTINCT run_id FROM concept_contexts")}
    assert not left & {ids[("fdn", "m1")], ids[("sae", None)]}
