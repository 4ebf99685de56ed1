"""Activation collection (hooks, padding, specials, shards, dtype) and the three pairings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.align.pairing import iter_batch_pairs, iter_pairs, pair_batches, token_words, word_spans
from engine.errors import SiteMismatchError
from engine.models.activations import collect
from engine.models.hooks import Site, read_residuals
from engine.models.loading import load_model
from tests.tiny_models import (
    CORPUS,
    bpe_tokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_tiny,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A GPT-2 foundation and a Llama subject on one word tokenizer, and a Llama on a BPE tokenizer."""
    root = tmp_path_factory.mktemp("acts")
    word = word_tokenizer()
    f = load_model(save_tiny(root / "f", "gpt2", word, d=48, n_layers=2, seed=1))
    a = load_model(save_tiny(root / "a", "llama", word, d=32, n_layers=3, seed=2))
    b = load_model(save_tiny(root / "b", "llama", bpe_tokenizer(), d=32, n_layers=2, seed=3))
    return {"f": f, "a": a, "b": b}


def _all(gen):
    return list(gen)


def test_padding_never_changes_a_texts_activations(models):
    model, tok = models["a"]
    batched = _all(collect(model, tok, CORPUS, Site((0, 2)), batch_size=4, desc=None))
    single = _all(collect(model, tok, CORPUS, Site((0, 2)), batch_size=1, desc=None))
    for L in (0, 2):
        a = torch.cat([b.acts[L] for b in batched])
        s = torch.cat([b.acts[L] for b in single])
        torch.testing.assert_close(a, s, atol=1e-5, rtol=1e-4)
    ids = np.concatenate([b.token_id for b in batched])
    n_words = sum(len(t.split()) + t.count(".") + t.count("!") for t in CORPUS)
    assert len(ids) == n_words  # every real token, and nothing else
    assert tok.bos_token_id not in ids and tok.pad_token_id not in ids


def test_special_tokens_of_an_encoder_never_come_out(tmp_path):
    model, tok = load_model(save_tiny(tmp_path / "bert", "bert"), kind="encoder")
    batches = _all(collect(model, tok, CORPUS[:3], Site((1,)), batch_size=2, desc=None))
    ids = np.concatenate([b.token_id for b in batches])
    assert not set(ids) & {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    assert batches[0].acts[1].shape[1] == 32


def test_resid_pre_and_post_agree_and_max_tokens_stops(models):
    model, tok = models["a"]
    post = _all(collect(model, tok, CORPUS, Site((0,), "resid_post"), batch_size=2, desc=None))
    pre = _all(collect(model, tok, CORPUS, Site((1,), "resid_pre"), batch_size=2, desc=None))
    torch.testing.assert_close(torch.cat([b.acts[0] for b in post]), torch.cat([b.acts[1] for b in pre]))
    few = _all(collect(model, tok, CORPUS, Site((0,)), batch_size=2, max_tokens=5, desc=None))
    assert len(few) == 1 and few[0].n_tokens >= 5


def test_dtype_control(models):
    model, tok = models["a"]
    (b, *_) = _all(collect(model, tok, CORPUS[:2], Site((1,)), batch_size=2, dtype="float16", desc=None))
    assert b.acts[1].dtype == torch.float16


def test_early_stop_skips_the_rest_of_the_model(models):
    model, tok = models["a"]
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        _all(collect(model, tok, CORPUS[:2], Site((0,)), batch_size=2, desc=None))
    finally:
        h.remove()
    assert calls == []


def test_shards_are_written_and_reused(models, tmp_path, monkeypatch):
    model, tok = models["a"]
    first = _all(collect(model, tok, CORPUS, Site((1,)), batch_size=3, shard_dir=tmp_path / "c", desc=None))
    (folder,) = (tmp_path / "c").iterdir()
    assert (folder / "manifest.json").is_file()
    assert len(list(folder.glob("shard-*.safetensors"))) == len(first)
    # other settings: another cache beside it
    _all(collect(model, tok, CORPUS, Site((0,)), batch_size=3, shard_dir=tmp_path / "c", desc=None))
    assert len(list((tmp_path / "c").iterdir())) == 2

    def boom(*a, **k):
        raise AssertionError("the model ran although the shards were complete")

    monkeypatch.setattr(model, "forward", boom)
    again = _all(collect(model, tok, CORPUS, Site((1,)), batch_size=3, shard_dir=tmp_path / "c", desc=None))
    monkeypatch.undo()
    for x, y in zip(first, again, strict=True):
        torch.testing.assert_close(x.acts[1], y.acts[1])
        np.testing.assert_array_equal(x.offsets, y.offsets)
        assert x.texts == y.texts


def test_an_abandoned_pass_leaves_no_manifest(models, tmp_path):
    model, tok = models["a"]
    gen = collect(model, tok, CORPUS, Site((1,)), batch_size=2, shard_dir=tmp_path / "c", desc=None)
    next(gen)
    gen.close()
    assert not list((tmp_path / "c").glob("*/manifest.json"))


def test_read_residuals_removes_hooks_on_error(models):
    model, _ = models["a"]
    blocks = model.model.layers
    before = [len(b._forward_hooks) for b in blocks]
    with pytest.raises(RuntimeError):
        with read_residuals(model, [0, 1]):
            raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in blocks] == before


def test_prepend_reads_before_an_edit_and_append_after(models):
    model, tok = models["a"]
    enc = tok(CORPUS[:1], return_tensors="pt")
    block = model.model.layers[0]
    edit = block.register_forward_hook(lambda m, a, o: o + 1.0)
    try:
        with read_residuals(model, [0], prepend=True) as first, read_residuals(model, [0], prepend=False) as last:
            with torch.no_grad():
                model(**enc)
    finally:
        edit.remove()
    torch.testing.assert_close(last.acts[0], first.acts[0] + 1.0)


# ----------------------------------------------------------------------------- pairing


def test_token_pairing_one_pair_per_token(models):
    chunks = _all(iter_pairs(models["a"], models["f"], CORPUS, Site((0, 2)), Site((-1,)), "token", batch_size=3, desc=None))
    n = sum(c.n for c in chunks)
    assert n == sum(b.n_tokens for b in collect(*models["a"], CORPUS, Site((0,)), desc=None))
    assert chunks[0].x[2].shape[1] == 32 and chunks[0].y.shape[1] == 48
    capped = _all(iter_pairs(models["a"], models["f"], CORPUS, Site((0,)), Site((1,)), "token", max_pairs=10, desc=None))
    assert sum(c.n for c in capped) == 10


def test_token_pairing_refuses_different_tokenizers(models):
    with pytest.raises(SiteMismatchError, match="span"):
        next(iter_pairs(models["b"], models["f"], CORPUS, Site((0,)), Site((1,)), "token"))


def test_span_pairing_across_tokenizers(models):
    (sb, fb), *_ = _all(iter_batch_pairs(models["b"], models["f"], CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                          desc=None))
    n_words = sum(len(word_spans(t)) for t in CORPUS)
    # BPE pieces really do split words here, so this is a cross-tokenizer test
    assert sb.n_tokens > fb.n_tokens - sum(t.count(".") + t.count("!") for t in CORPUS)
    last = pair_batches(sb, fb, CORPUS, "span", [1], 1, pool="last")
    mean = pair_batches(sb, fb, CORPUS, "span", [1], 1, pool="mean")
    assert last.n == mean.n == n_words
    # the word "thunder" in text 1: its last BPE piece, and the mean of its pieces
    keys = token_words(sb, CORPUS)
    start = CORPUS[1].index("thunder")
    w = int(np.searchsorted(word_spans(CORPUS[1])[:, 0], start))
    rows = np.nonzero(keys == ((1 << 32) | w))[0]
    assert len(rows) >= 1
    order = sorted({int(k) for k in keys if k >= 0})
    i = order.index((1 << 32) | w)
    torch.testing.assert_close(last.x[1][i], sb.acts[1][rows[-1]])
    torch.testing.assert_close(mean.x[1][i], sb.acts[1][rows].mean(0), atol=1e-6, rtol=1e-5)
    # the foundation is word-level: one token per word, so last == mean on its side
    torch.testing.assert_close(last.y, mean.y)


def test_text_pairing_pools_each_text(models):
    (sb, fb), *_ = _all(iter_batch_pairs(models["b"], models["f"], CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                          desc=None))
    mean = pair_batches(sb, fb, CORPUS, "text", [1], 1, pool="mean")
    mx = pair_batches(sb, fb, CORPUS, "text", [1], 1, pool="max")
    assert mean.n == mx.n == len(CORPUS)
    rows = np.nonzero(fb.text_index == 2)[0]
    torch.testing.assert_close(mean.y[2], fb.acts[1][rows].mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mx.y[2], fb.acts[1][rows].max(0).values)


def test_span_pairing_pairs_punctuation_marks_like_words(models):
    assert word_spans("Rain fell, then stopped.").tolist() == [[0, 4], [5, 9], [9, 10], [11, 15], [16, 23], [23, 24]]
    (sb, fb), *_ = _all(iter_batch_pairs(models["b"], models["f"], CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                          desc=None))
    chunk = pair_batches(sb, fb, CORPUS, "span", [1], 1)
    # every text ends in "." or "!": its last pair is that mark, the foundation's last token of the text
    last_rows = [int(np.nonzero(fb.text_index == t)[0][-1]) for t in range(len(CORPUS))]
    keys = sorted({int(k) for k in token_words(fb, CORPUS) if k >= 0})
    ends = [keys.index((t << 32) | (len(word_spans(CORPUS[t])) - 1)) for t in range(len(CORPUS))]
    torch.testing.assert_close(chunk.y[ends], fb.acts[1][last_rows])


def test_span_pooling_of_transformed_pieces_is_the_brute_force(models):
    """``transform`` runs before pooling: ``max`` pools each word's transformed pieces (SAE codes
    of every piece), the same as transforming the tokens by hand and taking the max per word."""
    (sb, fb), *_ = _all(iter_batch_pairs(models["b"], models["f"], CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                          desc=None))
    w = torch.randn(32, 7, generator=torch.Generator().manual_seed(0))

    def relu(a):
        return torch.relu(a @ w)

    got = pair_batches(sb, fb, CORPUS, "span", [1], 1, pool="max", transform=(relu, None))
    keys = token_words(sb, CORPUS)
    order = sorted({int(k) for k in keys if k >= 0})
    want = torch.stack([relu(sb.acts[1][np.nonzero(keys == k)[0]]).max(0).values for k in order])
    assert (np.bincount(np.unique(keys[keys >= 0], return_inverse=True)[1]) > 1).any()  # some words have pieces
    torch.testing.assert_close(got.x[1], want)
    torch.testing.assert_close(got.y, pair_batches(sb, fb, CORPUS, "span", [1], 1, pool="max").y)


def test_span_pairing_lets_each_model_read_its_own_length(models):
    import copy

    fm, ftok = models["f"]
    short = copy.deepcopy(ftok)
    short.model_max_length = 4  # the foundation reads 4 tokens of each text, the subject all of its own
    own = _all(iter_batch_pairs(models["b"], (fm, short), CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                lengths="own", desc=None))[0]
    same = _all(iter_batch_pairs(models["b"], (fm, short), CORPUS, Site((1,)), Site((1,)), batch_size=len(CORPUS),
                                 desc=None))[0]
    full = _all(collect(*models["b"], CORPUS, Site((1,)), batch_size=len(CORPUS), desc=None))[0]
    n_short = own[1].n_tokens  # the first few words of each text (the limit counts the <bos> too)
    assert n_short == same[1].n_tokens == same[0].n_tokens and 0 < n_short <= 4 * len(CORPUS)
    assert own[0].n_tokens == full.n_tokens > n_short
    # span pairing: every foundation word, each covered whole by the subject's side
    assert pair_batches(*own, CORPUS, "span", [1], 1).n == n_short
    assert pair_batches(*same, CORPUS, "span", [1], 1).n < n_short  # the BPE side's cut splits words off
