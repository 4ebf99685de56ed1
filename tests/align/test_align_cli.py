"""`atlas align`, `atlas maps`, `atlas map show|remove` against a real store and tiny real models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from engine.align.corpus import read_corpus, split_heldout
from engine.align.map import load_map
from engine.cli import cli
from engine.store.store import AtlasSource
from tests.tiny_models import (
    CORPUS,
    bpe_tokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_tiny,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("align-cli")
    word = word_tokenizer()
    return {
        "found": save_tiny(root / "found", "gpt2", word, d=48, n_layers=2, seed=1),
        "subj": save_tiny(root / "subj", "llama", word, d=32, n_layers=2, seed=2),
        "subj-bpe": save_tiny(root / "subj-bpe", "qwen2", bpe_tokenizer(), d=32, n_layers=2, seed=3),
    }


@pytest.fixture
def setup(store, folders, tmp_path):
    store.add_model("found", source=str(folders["found"]), d_model=48, n_layers=2)
    store.add_atlas(
        "atl", np.random.default_rng(0).normal(size=(6, 48)), [f"c{i}" for i in range(6)],
        source=AtlasSource(model="found", layer=1),
    )
    words = " ".join(CORPUS).replace(".", "").replace("!", "").split()
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) + "." for _ in range(200)) + "\n")
    return store, corpus


def run(*args):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res


def test_align_then_list_and_show(setup, folders):
    store, corpus = setup
    s = ["--store", str(store.path)]
    res = run("align", str(folders["subj"]), "--layer", "1", "--atlas", "atl", "--corpus", str(corpus), "--json",
              "-q", *s)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["name"] == "subj-L1-atl-procrustes" and info["pairing"] == "token"
    assert info["n_pairs"] >= 48 and info["metrics"]["n_heldout"] > 0
    assert info["metrics"]["subject_resid_norm"] > 0 and "heldout_r2" in info["metrics"]
    assert store.get_model("subj").d_model == 32  # registered on first use
    amap = load_map(store, "subj-L1-atl-procrustes")
    amap.check_site("subj", 1, 32)
    assert amap.atlas_layer == 1 and amap.corpus_fingerprint == info["corpus_fingerprint"]

    # a second map by model name, with ridge and a cap on pairs
    res = run("align", "subj", "-l", "0", "--atlas", "atl", "--corpus", str(corpus), "--method", "ridge",
              "--max-tokens", "300", "-q", *s)
    assert res.exit_code == 0, res.output
    assert "heldout R2" in res.output
    res = run("maps", "--json", *s)
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == ["subj-L0-atl-ridge", "subj-L1-atl-procrustes"]
    assert rows[0]["n_pairs"] == 300 and rows[0]["params"]["lam"] > 0
    assert "subj-L0-atl-ridge" in run("maps", *s).output
    assert "ridge" in run("map", "show", "subj-L0-atl-ridge", *s).output
    assert run("map", "remove", "subj-L0-atl-ridge", *s).exit_code == 0
    assert len(json.loads(run("maps", "--json", *s).output)) == 1


def test_across_tokenizers_auto_picks_span(setup, folders):
    store, corpus = setup
    res = run("align", str(folders["subj-bpe"]), "-l", "1", "--atlas", "atl", "--corpus", str(corpus), "--json",
              "-q", "--cache", "--store", str(store.path))
    assert res.exit_code == 0, res.output
    first = json.loads(res.output)
    assert first["pairing"] == "span"
    # activations of both models, training and held-out texts, cached for the next fit
    assert len(list((store.path / "activations").glob("*/manifest.json"))) == 4
    res = run("align", "subj-bpe", "-l", "1", "--atlas", "atl", "--corpus", str(corpus), "--json", "-q", "--cache",
              "--name", "again", "--store", str(store.path))
    assert json.loads(res.output)["metrics"]["heldout_r2"] == pytest.approx(first["metrics"]["heldout_r2"])
    res = run("align", "subj-bpe", "-l", "1", "--atlas", "atl", "--corpus", str(corpus), "--pairing", "token",
              "--name", "x", "-q", "--store", str(store.path))
    assert res.exit_code == 1 and "--pairing span" in res.output


def test_a_layer_sweep_is_one_pass_with_one_map_per_layer(setup, folders, monkeypatch):
    store, corpus = setup
    s = ["--store", str(store.path)]
    res = run("align", str(folders["subj"]), "--layer", "1", "--atlas", "atl", "--corpus", str(corpus), "--json",
              "-q", "--name", "single", *s)
    single = json.loads(res.output)
    import engine.models.activations as acts

    calls = []
    real = acts.forward_to_layers
    monkeypatch.setattr(acts, "forward_to_layers", lambda m, **kw: (calls.append(1), real(m, **kw))[1])
    res = run("align", "subj", "--layers", "all", "--atlas", "atl", "--corpus", str(corpus), "--json", "-q",
              "--name", "sweep-{layer}", *s)
    assert res.exit_code == 0, res.output
    maps = json.loads(res.output)
    assert [m["name"] for m in maps] == ["sweep-0", "sweep-1"] and [m["subject_layer"] for m in maps] == [0, 1]
    train, held = split_heldout(read_corpus(corpus))
    # each batch of 16 texts (training, then held-out) runs each of the two models once, for both layers
    assert len(calls) == 2 * (-(-len(train) // 16) + -(-len(held) // 16))
    # the sweep's layer-1 map is the single-layer fit (same statistics from the same pass)
    assert maps[1]["metrics"]["heldout_r2"] == pytest.approx(single["metrics"]["heldout_r2"], rel=1e-9)
    np.testing.assert_allclose(load_map(store, "sweep-1").weight, load_map(store, "single").weight, atol=1e-10)
    res = run("align", "subj", "--layers", "0-1", "--atlas", "atl", "--corpus", str(corpus), "-q", *s)
    assert res.exit_code == 0 and "best held-out R2: layer" in res.output and "heldout_cosine" in res.output
    res = run("align", "subj", "--layers", "0-x", "--atlas", "atl", "--corpus", str(corpus), *s)
    assert res.exit_code == 1 and "layers must look like" in res.output
    res = run("align", "subj", "--layers", "1", "--layer", "1", "--atlas", "atl", "--corpus", str(corpus), *s)
    assert res.exit_code == 2


def test_user_errors_are_one_line_messages(setup, folders, tmp_path):
    store, corpus = setup
    s = ["--store", str(store.path)]
    small = tmp_path / "small.txt"
    small.write_text("the red fox.\nthe cat sleeps.\na quiet song.\n")
    res = run("align", str(folders["subj"]), "-l", "1", "--atlas", "atl", "--corpus", str(small), *s)
    assert res.exit_code == 1 and "at least as many pairs as dimensions" in res.output
    assert "Traceback" not in res.output
    res = run("align", str(folders["subj"]), "-l", "5", "--atlas", "atl", "--corpus", str(corpus), *s)
    assert res.exit_code == 1 and "out of range" in res.output
    res = run("align", str(folders["subj"]), "-l", "1", "--atlas", "nope", "--corpus", str(corpus), *s)
    assert res.exit_code == 1 and "no atlas named 'nope'" in res.output
    res = run("align", str(folders["subj"]), "-l", "1", "--atlas", "atl", *s)
    assert res.exit_code == 2 and "--corpus" in res.output
    res = run("align", str(folders["subj"]), "-l", "1", "--atlas", "atl", "--corpus", str(corpus), "--method", "x", *s)
    assert res.exit_code == 1 and "unknown alignment method" in res.output and "procrustes" in res.output
    res = run("map", "show", "nope", *s)
    assert res.exit_code == 1 and "atlas maps" in res.output


def test_read_corpus_formats_and_heldout_split(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a b"}\n\n{"text": "c d"}\n')
    assert read_corpus(p) == ["a b", "c d"]
    q = tmp_path / "docs.txt"
    q.write_text("3\tthe cat.\nplain line\n")
    assert read_corpus(q) == ["the cat.", "plain line"]
    texts = [f"text {i}" for i in range(1000)]
    train, held = split_heldout(texts)
    assert 60 < len(held) < 140 and set(train).isdisjoint(held) and len(train) + len(held) == 1000
    assert split_heldout(texts[::-1])[1] == held[::-1]  # by content, not position


@pytest.mark.parametrize("method", ["whiten", "rcsls"])
def test_every_method_that_needs_only_pairs_fits_through_atlas_align(setup, folders, method):
    """rcsls trains on a sample of the training pairs: the pass keeps one because the method asks for it."""
    store, corpus = setup
    res = run("align", str(folders["subj"]), "--layer", "1", "--atlas", "atl", "--corpus", str(corpus), "--method",
              method, "--json", "-q", "--store", str(store.path))
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["method"] == method and np.isfinite(info["metrics"]["heldout_r2"])
    if method == "rcsls":
        assert info["params"]["loss_last"] < info["params"]["loss_first"]


def test_self_learning_from_atlas_align_says_what_it_needs(setup, folders):
    store, corpus = setup
    res = CliRunner().invoke(cli, ["align", str(folders["subj"]), "--layer", "1", "--atlas", "atl", "--corpus",
                                   str(corpus), "--method", "self_learning", "--store", str(store.path)])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "subject_vectors and atlas_vectors" in lines[0] and "--features sae" in lines[0]
