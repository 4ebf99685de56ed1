"""Every CLI command given bad values: a one-line message naming the fix, exit code 1, no traceback.

Values the engine checks (k, method, pairing and index-spec names, unknown objects, unreadable
files) come back as `AtlasError`s; the root group turns them into one line and exit 1. Click's
own usage errors (a value outside a `Choice`, a missing argument) keep click's exit code 2.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.align.map import AlignmentMap, save_map
from engine.cli import cli


@pytest.fixture
def env(tmp_path, store, saelens_folder):
    """A store with atlas `g` (SAELens, d=32), a registered subject and a map onto `g`."""
    from engine.atlas.importers import import_atlas

    import_atlas(store, "g", saelens_folder)
    store.add_model("subj", source=str(tmp_path / "no-such-model"), d_model=8)
    rng = np.random.default_rng(0)
    amap = AlignmentMap(rng.normal(size=(8, 32)), rng.normal(size=(32, 8)), np.zeros(8), np.zeros(32), "procrustes",
                        subject_model="subj", subject_layer=1, atlas="g", atlas_model="gemma-2-2b", atlas_layer=12,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    save_map(store, amap, "m")
    np.save(tmp_path / "feats.npy", rng.normal(size=(5, 8)).astype(np.float32))
    (tmp_path / "corpus.txt").write_text("one text\nanother text\n")
    from engine.labelling.run import label_features

    label_features(store, "m", str(tmp_path / "feats.npy"), k=3, name="r1", quiet=True)
    _bad_inputs(tmp_path, saelens_folder)
    return store.path, tmp_path


def _bad_inputs(tmp, saelens_folder):
    """Input files each wrong in one way (the import cases below)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(3)
    np.save(tmp / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(tmp / "complex.npy", (rng.normal(size=(4, 8)) + 1j).astype(np.complex64))
    zero = rng.normal(size=(4, 8)).astype(np.float32)
    zero[2] = 0
    np.save(tmp / "zero-row.npy", zero)
    np.save(tmp / "huge.npy", np.full((4, 16), 1e38, np.float32))
    np.save(tmp / "ok100.npy", rng.normal(size=(100, 8)).astype(np.float32))
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    w = load_file(str(saelens_folder / "sae_weights.safetensors"))
    for name, change in [
        ("cfg-layer", lambda cfg, t: cfg.update(hook_layer="abc")),
        ("cfg-meta", lambda cfg, t: cfg.update(metadata="str")),
        ("bad-b-enc", lambda cfg, t: t.update(b_enc=np.zeros(7, np.float32))),
        ("bad-sparsity", None),
    ]:
        folder = tmp / name
        shutil.copytree(saelens_folder, folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        t = dict(w)
        if change is None:
            (folder / "sparsity.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
        else:
            change(cfg, t)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        save_file(t, str(folder / "sae_weights.safetensors"))
    gs = tmp / "layer_3" / "params.npz"
    gs.parent.mkdir()
    np.savez(gs, w_dec=rng.normal(size=(6, 8)).astype(np.float32), w_enc=rng.normal(size=(6, 8)).astype(np.float32))


def _cases(tmp):
    feats, corpus = str(tmp / "feats.npy"), str(tmp / "corpus.txt")
    return [
        ("import-sae", str(tmp / "feats.npy"), "--model", "x", "--layer", "1", "--name", "a3", "--index-spec", "Bogus"),
        ("import-sae", str(tmp / "feats.npy"), "--model", "x", "--layer", "1", "--name", "g"),
        ("import-sae", str(tmp / "feats.npy"), "--model", "x", "--layer", "1", "--name", "bad/name"),
        ("lookup", "rain", "-k", "0"),
        ("neighbors", "g/100000"),
        ("neighbors", "nope/1"),
        ("neighbors", "g/1", "-k", "0"),
        ("show", "not-a-ref"),
        ("index", "rebuild", "g", "--spec", "Bogus"),
        ("index", "rebuild", "nope"),
        ("align", "subj", "--layer", "1", "--atlas", "g", "--corpus", corpus, "--method", "bogus"),
        ("align", "subj", "--layer", "1", "--atlas", "nope", "--corpus", corpus),
        ("map", "show", "nope"),
        ("map", "remove", "nope"),
        ("label", "m", "--features", feats, "-k", "0"),
        ("label", "nope", "--features", feats),
        ("label", "m", "--features", str(tmp / "missing.npy")),
        ("label", "--resume", "nope"),
        ("export", "nope"),
        ("explain", "nope", "some text"),
        ("explain", "m", "some text", "-k", "0"),
        ("search", "m", "--vectors", feats, "-k", "0"),
        ("search", "nope", "--vectors", feats),
        ("steer", "m", "-c", "x", "-p", "the", "--mode", "bogus"),
        ("steer", "m", "-c", "x", "-p", "the", "--strength", "nan"),
        ("steer", "nope", "-c", "x", "-p", "the"),
        ("eval", "retrieval", "--world", "--methods", "bogus"),
        ("eval", "labelling", "--world", "--methods", "bogus"),
        ("eval", "labelling", "--world", "--features", "sae", "--map", "some-map"),
        ("eval", "steering", "--world", "--modes", "bogus"),
        ("eval", "steering", "--world", "--positions", "some"),
        ("eval", "steering", "--world", "--against-strengths", "-1"),
        ("eval", "steering", "--world", "--against-strengths", "nan"),
        ("db", "downgrade", "no-such-revision"),
        ("db", "upgrade", "no-such-revision"),
        # index specs FAISS raises on, aborts on, or accepts and then misbehaves with
        *[("import-sae", str(tmp / "ok100.npy"), "--model", "x", "--layer", "1", "--name", "s", "--index-spec", spec)
          for spec in ("", "LSH", "PQ8", "IDMap,Flat", "IVF99999,Flat", "HNSW0", "HNSW1", "IVF0,Flat",
                       "HNSW32|efSearch=0", "HNSW32|efSearch=99999999999", "IVF4,Flat|nprobe=0", "Flat|nprobe=3")],
        *[("index", "rebuild", "g", "--spec", spec) for spec in ("", "HNSW0", "IVF0,Flat", "IVF99999,Flat")],
        # --index-uri values that name no Milvus (or keep credentials), checked before any work
        *[(cmd, *args, "--index-uri", uri)
          for cmd, *args in [("import-sae", str(tmp / "ok100.npy"), "--model", "x", "--layer", "1", "--name", "s"),
                             ("import-means", corpus, "--model", "x", "--layer", "1", "--name", "s"),
                             ("index", "rebuild", "g")]
          for uri in ("", "bogus", "no-such-dir/x.db", "ftp://h/x", "http://user:pw@h:19530", "http://h:99999",
                      "http://")],
        # inputs that are not directions, or not the SAE they claim to be
        *[("import-sae", str(tmp / f), "--model", "x", "--layer", "1", "--name", "s")
          for f in ("strings.npy", "complex.npy", "zero-row.npy", "huge.npy", "garbage.npz", "cfg-layer", "cfg-meta",
                    "bad-b-enc", "bad-sparsity", "layer_3/params.npz")],
        ("import-sae", feats, "--model", "x", "--layer", "1", "--name", "漢" * 80),
        ("show", "g/99999999999999999999"),
        ("show", "g/-1"),
        ("show", "1", "--atlas", "nope"),
        ("lookup", ""),
        ("lookup", "?! ..."),
        ("lookup", "rain", "-k", "-3"),
        ("lookup", "rain", "--atlas", "nope"),
        ("neighbors", "g/1", "-k", "-1"),
        ("neighbors", "g/99999999999999999999"),
        ("remove", "nope"),
        ("remove", "g"),  # a map and a run depend on it
        ("map", "remove", "m"),  # a run depends on it
        ("label", "m", "--features", feats, "-k", "-2"),
        ("label", "m", "--features", feats, "--batch", "0"),
        ("label", "m", "--features", feats, "--batch", "-4"),
        ("label", "m", "--features", feats, "--name", "r1"),
        ("label", "m", "--features", feats, "--name", "bad/name"),
        ("explain", "m", "some text", "-k", "-2"),
        ("search", "m", "--vectors", feats, "-k", "-1"),
        ("search", "m", "--vectors", str(tmp / "strings.npy")),
        ("steer", "m", "-c", "x", "-p", "the", "--combine", "-1"),
        ("steer", "m", "-c", "x", "-p", "the", "-n", "-5"),
        ("steer", "m", "-c", "x", "-p", "the", "--temperature", "0", "--sample"),
        ("align", "subj", "--layer", "1", "--atlas", "g", "--corpus", corpus, "--batch-size", "0"),
        ("align", "subj", "--layer", "1", "--atlas", "g", "--corpus", corpus, "--name", "bad/name"),
        ("export", "r1", "--output", str(tmp / "no-such-dir" / "out.jsonl")),
        # Ray: an address that is not one, or where no cluster answers (refused at once, not after minutes)
        ("label", "m", "--features", feats, "--name", "ray1", "--ray-address", ""),
        ("label", "m", "--features", feats, "--name", "ray2", "--ray-address", "nonsense"),
        ("label", "m", "--features", feats, "--name", "ray3", "--ray-address", "127.0.0.1:1"),
        ("label", "m", "--features", feats, "--name", "ray4", "--ray-address", "ray://127.0.0.1:1"),
        ("label", "m", "--features", feats, "--name", "ray5", "--ray-address", "127.0.0.1:port"),
    ]


def _probe_cases(tmp):
    """The adversarial probe's round-3 findings: each a traceback, or an answer that was wrong, before."""
    rng = np.random.default_rng(4)
    feats, ok100 = str(tmp / "feats.npy"), str(tmp / "ok100.npy")
    for name, row in (("nan", np.nan), ("zero", 0.0), ("huge", 1e38)):
        x = rng.normal(size=(5, 8)).astype(np.float32)
        x[3] = row
        np.save(tmp / f"{name}8.npy", x)
    np.save(tmp / "d7.npy", rng.normal(size=(20, 7)).astype(np.float32))
    return [
        *[(cmd, *args, "-k", k) for k in ("1000000000000", "99999999999999999999")
          for cmd, *args in [("search", "m", "--vectors", feats), ("lookup", "rain", "--no-semantic"),
                             ("neighbors", "g/1"), ("label", "m", "--features", feats, "--name", "kbig"),
                             ("explain", "m", "some text")]],
        # NaN, all-zero and overflowing rows: refused alike by search, label and import
        *[(cmd, *args, str(tmp / f"{bad}8.npy"), *more) for bad in ("nan", "zero", "huge")
          for cmd, *args, more in [("search", "m", "--vectors", ()), ("label", "m", "--features", ("--name", "bad")),
                                    ("import-sae", ("--model", "x", "--layer", "1", "--name", "bad"))]],
        # the registered model's width, layers and hooks
        ("import-sae", str(tmp / "d7.npy"), "--model", "subj2", "--layer", "1", "--name", "d7"),
        ("import-sae", ok100, "--model", "subj2", "--layer", "99", "--name", "l99"),
        ("import-sae", ok100, "--model", "subj2", "--layer", "-99", "--name", "lneg"),
        ("import-sae", ok100, "--model", "subj2", "--layer", "1", "--hook", "evil/../x", "--name", "hk"),
    ]


def test_the_probes_round_3_findings_are_one_line_errors(env):
    root, tmp = env
    from engine.store.store import Store

    with Store.open(root) as s:
        s.add_model("subj2", d_model=8, n_layers=2)
    failures = []
    for args in _probe_cases(tmp):
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        text = r.output.strip()
        if r.exit_code != 1 or "Traceback" in text or not text.startswith("Error: ") or len(text.splitlines()) != 1:
            failures.append((shlex.join(args)[-90:], r.exit_code, text[-300:], repr(r.exception)[:200]))
    assert not failures, "\n".join(map(str, failures))
    with Store.open(root) as s:
        assert [a.name for a in s.atlases()] == ["g"]  # nothing was imported
    # a k beyond the atlas gives the whole atlas
    r = CliRunner().invoke(cli, ["neighbors", "g/1", "-k", "1000", "--json", "--store", str(root)])
    assert r.exit_code == 0 and len(json.loads(r.output)) == 199


def test_usage_errors_keep_clicks_exit_code(env):
    root, tmp = env
    for args in [("import-sae", str(tmp / "missing"), "--name", "a2"), ("align", "subj", "--layer", "x"),
                 ("align", "subj", "--layer", "1", "--max-tokens", "-5"), ("gc", "--grace", "-1"),
                 ("lookup",), ("steer", "m", "-c", "x", "-p", "the", "--positions", "some"),
                 ("eval", "labelling", "--world", "--max-docs", "0"), ("eval", "labelling", "--world", "--features", "x"),
                 ("world", "build", "--sae", "--no-such-option"),
                 ("eval", "steering", "--world", "--against-prompts", "1"),
                 ("align", "subj", "--layer", "1", "--atlas", "g", "--corpus", str(tmp / "corpus.txt"),
                  "--max-tokens", "5", "--ray")]:
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        assert r.exit_code == 2 and "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith(
            "Error: "), (args, r.output)


def test_the_help_texts_method_names_are_the_registered_ones():
    from engine.align.methods import METHODS
    from engine.cli.common import METHOD_NAMES

    assert set(METHOD_NAMES) == set(METHODS)


@pytest.mark.backends("sqlite", "postgresql")
def test_bad_values_are_one_line_errors(env):
    root, tmp = env
    failures = []
    for args in _cases(tmp):
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        text = r.output.strip()
        if os.environ.get("ATLAS_SHOW_ERRORS"):
            print(" ".join(args)[-70:], "=>", text[:300])
        if r.exit_code != 1 or "Traceback" in text or not text.startswith("Error: ") or len(text.splitlines()) != 1:
            failures.append((" ".join(args), r.exit_code, text[-300:], repr(r.exception)))
    assert not failures, "\n".join(map(str, failures))


def test_database_url_mistakes_are_one_line_errors(env, tmp_path):
    """--db-url values that cannot work, and a store folder whose record of its database is damaged."""
    root, tmp = env
    new = str(tmp_path / "new-store")
    cases = [
        (["init", "--store", new, "--db-url", "not a url"], "not a database URL"),
        (["init", "--store", new, "--db-url", "nosuchdb://u@h/db"], "cannot use the database"),
        (["init", "--store", new, "--db-url", "postgresql+psycopg://atlas:pw@127.0.0.1:1/db"], "cannot connect"),
        (["atlases", "--store", str(root), "--db-url", "postgresql+psycopg://atlas@127.0.0.1:1/db"],
         "keeps its metadata in atlas.db"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(cli, args)
        assert _one_line_error(r) and message in r.output and "pw@" not in r.output, (args, r.output, r.exception)
    (tmp_path / "rec").mkdir()
    for content in ("{not json", '{"url": 3}', '{"path": "x"}'):
        (tmp_path / "rec" / "database.json").write_text(content)
        r = CliRunner().invoke(cli, ["atlases", "--store", str(tmp_path / "rec")])
        assert _one_line_error(r) and "database.json does not name a database" in r.output, (content, r.output)


def _one_line_error(r) -> bool:
    text = r.output.strip()
    return r.exit_code == 1 and "Traceback" not in text and text.startswith("Error: ") and len(text.splitlines()) == 1


# Commands that read or write the database, run on a damaged one: each must say so in one line.
def _db_commands(tmp):
    feats = str(tmp / "feats.npy")
    return [
        ("atlases",), ("models",), ("maps",), ("runs",), ("lookup", "rain"), ("show", "g/1"), ("neighbors", "g/1"),
        ("index", "verify"), ("index", "rebuild", "g"), ("remove", "g", "--cascade"), ("map", "remove", "m"),
        ("import-sae", feats, "--model", "x", "--layer", "1", "--name", "a4"), ("label", "m", "--features", feats),
        ("export", "r1"), ("gc",), ("db", "current"), ("db", "upgrade"), ("init",),
    ]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeros"])
def test_a_damaged_database_is_one_line_in_every_command(env, damage):
    root, tmp = env
    db = root / "atlas.db"
    from engine.store.store import Store

    Store.open(root).engine.dispose()
    for suffix in ("-wal", "-shm"):
        (root / f"atlas.db{suffix}").unlink(missing_ok=True)
    data = db.read_bytes()
    db.write_bytes({"garbage": b"not a database, just bytes\n" * 400, "truncated": data[: len(data) // 3],
                    "zeros": bytes(len(data))}[damage])
    failures = []
    for args in _db_commands(tmp):
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        if not _one_line_error(r):
            failures.append((" ".join(args), r.exit_code, r.output[-300:], repr(r.exception)))
    assert not failures, "\n".join(map(str, failures))


def test_a_database_from_a_newer_version_is_one_line(env):
    root, _ = env
    from engine.store.store import Store

    s = Store.open(root)
    with s.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff-future'")
    s.close()
    for args in (("init",), ("db", "upgrade"), ("db", "downgrade", "0001"), ("atlases",)):
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        assert _one_line_error(r) and "ffff-future" in r.output, (args, r.output, r.exception)


def _run_cli_readonly(root: Path, args_list, folder: str = ""):
    """Run CLI commands in subprocesses on the store ``root`` (or only its ``folder``) made
    read-only: permission bits for a normal user; as root (whom permission bits do not stop) a
    read-only bind mount in a private mount namespace (`unshare -m`), gone with the process."""
    target = root / folder if folder else root
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "ATLAS_QUIET": "1"}
    results = []
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("running as root without mount namespaces: no way to make the store read-only")
        for args in args_list:
            cli_cmd = shlex.join([sys.executable, "-m", "engine.cli", *args, "--store", str(root)])
            script = (f"mount --make-rprivate / && mount --bind -o ro {shlex.quote(str(target))} "
                      f"{shlex.quote(str(target))} && exec {cli_cmd}")
            results.append(subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True,
                                          text=True, timeout=120))
        return results
    paths = [target, *target.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    try:
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        for args in args_list:
            results.append(subprocess.run([sys.executable, "-m", "engine.cli", *args, "--store", str(root)], env=env,
                                          capture_output=True, text=True, timeout=120))
    finally:
        for p in reversed(paths):
            p.chmod(modes[p])
    return results


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
def test_a_read_only_store_reads_and_refuses_writes_in_one_line(env):
    root, tmp = env
    from engine.store.store import Store

    with Store.open(root) as s:
        expected = [a.name for a in s.atlases()]
        neighbours = [h.ref for h in s.neighbors("g/1", k=3)]
    feats = str(tmp / "feats.npy")
    reads = [("atlases", "--json"), ("neighbors", "g/1", "-k", "3", "--json"), ("show", "g/1"), ("maps",), ("runs",),
             ("lookup", "rain", "--no-semantic"), ("index", "verify"), ("export", "r1"), ("gc", "--dry-run")]
    writes = [("import-sae", feats, "--model", "x", "--layer", "1", "--name", "a4"), ("index", "rebuild", "g"),
              ("remove", "g", "--cascade"), ("map", "remove", "m", "--cascade"), ("gc",),
              ("label", "m", "--features", feats, "--name", "r2")]
    results = _run_cli_readonly(root, reads + writes)
    for args, r in zip(reads, results[: len(reads)]):
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
    assert [a["name"] for a in json.loads(results[0].stdout)] == expected
    assert [h["ref"] for h in json.loads(results[1].stdout)] == neighbours
    for args, r in zip(writes, results[len(reads):]):
        err = r.stderr.strip()
        assert r.returncode == 1 and err.startswith("Error: ") and len(err.splitlines()) == 1, (args, r.stderr)
        assert "read-only" in err or "Read-only" in err, (args, err)
    with Store.open(root) as s:  # nothing changed
        assert [a.name for a in s.atlases()] == expected and [r.name for r in s.runs()] == ["r1"]


def test_a_cleanly_closed_store_reads_from_a_read_only_folder(env, store):
    """Closed cleanly, a WAL database has no -wal or -shm file, and ``mode=ro`` cannot create the -shm
    in a folder it cannot write: such a store is opened immutable, and reads."""
    root, _ = env
    from engine.store.store import Store

    with Store.open(root) as s:
        neighbours = [h.ref for h in s.neighbors("g/1", k=3)]
    store.engine.dispose()  # the last connection: SQLite checkpoints and removes -wal and -shm
    assert not (root / "atlas.db-shm").exists() and not (root / "atlas.db-wal").exists()
    reads = [("atlases", "--json"), ("neighbors", "g/1", "-k", "3", "--json")]
    results = _run_cli_readonly(root, reads)
    for args, r in zip(reads, results):
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
    assert [a["name"] for a in json.loads(results[0].stdout)] == ["g"]
    assert [h["ref"] for h in json.loads(results[1].stdout)] == neighbours


@pytest.mark.slow  # many CLI subprocesses: `-m "not slow"` stays a quick loop; CI runs it
@pytest.mark.parametrize("folder", ["vectors", "indexes"])
def test_a_read_only_store_folder_refuses_writes_in_one_line(env, folder):
    root, tmp = env
    feats = str(tmp / "feats.npy")
    reads = [("atlases",), ("neighbors", "g/1", "-k", "3")]
    writes = [("import-sae", feats, "--model", "x", "--layer", "1", "--name", "a4"), ("index", "rebuild", "g")]
    results = _run_cli_readonly(root, reads + writes, folder)
    for args, r in zip(reads, results[: len(reads)]):
        assert r.returncode == 0, (args, r.stderr)
    for args, r in zip(writes, results[len(reads):]):
        err = r.stderr.strip()
        assert r.returncode == 1 and err.startswith("Error: ") and len(err.splitlines()) == 1, (args, err)
        assert "read-only" in err, (args, err)
