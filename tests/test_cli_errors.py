"""Every CLI command given bad values: a one-line message naming the fix, exit code 1, no traceback.

Values the engine checks (k, method, pairing and index-spec names, unknown objects, unreadable
files) come back as `AtlasError`s; the root group turns them into one line and exit 1. Click's
own usage errors (a value outside a `Choice`, a missing argument) keep click's exit code 2.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from engine.align.map import AlignmentMap
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
    store.save_map(amap, "m")
    np.save(tmp_path / "feats.npy", rng.normal(size=(5, 8)).astype(np.float32))
    (tmp_path / "corpus.txt").write_text("one text\nanother text\n")
    return store.path, tmp_path


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
        ("db", "downgrade", "no-such-revision"),
    ]


def test_usage_errors_keep_clicks_exit_code(env):
    root, tmp = env
    for args in [("import-sae", str(tmp / "missing"), "--name", "a2"), ("align", "subj", "--layer", "x"),
                 ("lookup",), ("steer", "m", "-c", "x", "-p", "the", "--positions", "some")]:
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        assert r.exit_code == 2 and "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith(
            "Error: "), (args, r.output)


def test_the_help_texts_method_names_are_the_registered_ones():
    from engine.align.methods import METHODS
    from engine.cli.common import METHOD_NAMES

    assert set(METHOD_NAMES) == set(METHODS)


def test_bad_values_are_one_line_errors(env):
    root, tmp = env
    failures = []
    for args in _cases(tmp):
        r = CliRunner().invoke(cli, [*args, "--store", str(root)])
        text = r.output.strip()
        if r.exit_code != 1 or "Traceback" in text or not text.startswith("Error: ") or len(text.splitlines()) != 1:
            failures.append((" ".join(args), r.exit_code, text[-300:], repr(r.exception)))
    assert not failures, "\n".join(map(str, failures))
