"""ConceptWorld parts that need no trained world: concepts, corpus, tokenizers, config, maths.

These run in seconds; the trained tiny world is tested in test_world_build.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from engine.errors import AtlasError, ShapeError
from engine.world.concepts import CONCEPTS, MAX_CONCEPTS, concept_table, member_index
from engine.world.config import WorldConfig, config_for, fingerprint
from engine.world.corpus import (
    BODY_TEMPLATES,
    NEUTRAL_PROMPTS,
    OPENING_TEMPLATES,
    concept_counts,
    count_word_tokens,
    documents_from_text,
    documents_to_text,
    first_sentence,
    make_corpus,
    other_topic_prompts,
    plurality_concept,
)
from engine.world.directions import centred_topic_means, document_means
from engine.world.gates import greedy_continuations, probe_accuracy, unigram_perplexity
from engine.world.tokenizers import (
    learn_bpe,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
    train_word_tokenizer,
    word_counts,
)
from engine.world.train import ModelSpec, encode_documents, make_model, train_model
from tests.tiny_models import one_thread  # noqa: F401  (autouse fixture)

K = 10


@pytest.fixture(scope="module")
def concepts():
    return concept_table(K)


@pytest.fixture(scope="module")
def corpus(concepts):
    return make_corpus(concepts, n_train=600, n_heldout_per_concept=5, seed=0, max_tokens=62, mix_prob=0.1)


@pytest.fixture(scope="module")
def word_tok(corpus):
    return train_word_tokenizer([t for t, _ in corpus.train], max_length=64)


@pytest.fixture(scope="module")
def bpe_tok(corpus):
    return train_bpe_tokenizer([t for t, _ in corpus.train], vocab_size=300, max_length=128)


# ---------------------------------------------------------------------- concepts


def template_words() -> set[str]:
    """Every word the templates and neutral prompts use (none may be a member word)."""
    text = " ".join(OPENING_TEMPLATES + BODY_TEMPLATES + NEUTRAL_PROMPTS)
    return set(re.findall(r"[a-z]+", text.replace("{0}", " ").replace("{1}", " ")))


def test_concept_table_is_large_labelled_and_disjoint():
    assert len(CONCEPTS) >= 32
    words = [w for c in CONCEPTS for w in c.members]
    assert len(words) == len(set(words)), "a member word belongs to two concepts"
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    for c in CONCEPTS:
        assert len(c.members) >= 10, c.name
        assert c.label and c.description.endswith("."), c.name
        assert all(re.fullmatch(r"[a-z]+", w) for w in c.members), c.name
    assert not template_words() & set(words), "a template word is also a member word"


def test_concept_table_prefixes_and_bounds():
    assert concept_table(10) == list(CONCEPTS[:10])
    with pytest.raises(ValueError, match="n_concepts"):
        concept_table(MAX_CONCEPTS + 1)


# ---------------------------------------------------------------------- corpus


def test_same_seed_gives_identical_bytes(concepts):
    a = make_corpus(concepts, 300, 4, seed=7, max_tokens=62, mix_prob=0.1)
    b = make_corpus(concepts, 300, 4, seed=7, max_tokens=62, mix_prob=0.1)
    c = make_corpus(concepts, 300, 4, seed=8, max_tokens=62, mix_prob=0.1)
    assert documents_to_text(a.train).encode() == documents_to_text(b.train).encode()
    assert documents_to_text(a.heldout).encode() == documents_to_text(b.heldout).encode()
    assert documents_to_text(a.train) != documents_to_text(c.train)
    assert documents_from_text(documents_to_text(a.train)) == a.train


def test_documents_have_one_dominant_concept(corpus, concepts):
    index = member_index(concepts)
    mixed = 0
    for text, k in corpus.train:
        assert count_word_tokens(text) <= 62
        assert plurality_concept(text, concepts) == k, text
        opening = first_sentence(text)
        assert {index[w] for w in re.findall(r"[a-z]+", opening) if w in index} == {k}, opening
        counts = concept_counts(text, concepts)
        mixed += sum(counts) - counts[k]
        assert text.count(".") >= 2, "the topic must persist over several sentences"
    assert mixed > 0, "documents should mix in some words of other concepts"


def test_heldout_is_balanced_and_disjoint(corpus):
    train = {t for t, _ in corpus.train}
    assert not train & {t for t, _ in corpus.heldout}
    assert sorted(np.bincount([k for _, k in corpus.heldout])) == [5] * K
    assert sorted(np.bincount([k for _, k in corpus.train])) == [60] * K


def test_plurality_concept(concepts):
    red, lion = concepts[0].members[0], concepts[1].members[0]
    assert plurality_concept(f"the {red} and the {red} near a {lion}.", concepts) == 0
    assert plurality_concept(f"the {red} and the {lion}.", concepts) is None  # a tie
    assert plurality_concept("the and a.", concepts) is None
    assert plurality_concept(f"THE {lion.upper()}.", concepts) == 1


def test_prompts(corpus, concepts):
    for p in NEUTRAL_PROMPTS:
        assert sum(concept_counts(p, concepts)) == 0, p
    prompts = other_topic_prompts(corpus.heldout, per_concept=2)
    assert len(prompts) == 2 * K
    for text, k in prompts:
        assert plurality_concept(text, concepts) == k and text.endswith(".")


# ---------------------------------------------------------------------- tokenizers


def test_word_tokenizer_reloads_with_offsets(word_tok, corpus, tmp_path):
    from transformers import AutoTokenizer

    word_tok.save_pretrained(tmp_path / "w")
    tok = AutoTokenizer.from_pretrained(tmp_path / "w")
    text = corpus.heldout[0][0]
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    assert enc["input_ids"] == word_tok(text)["input_ids"]
    assert enc["input_ids"][0] == tok.bos_token_id and enc["special_tokens_mask"][0] == 1
    words = re.findall(r"\w+|[^\w\s]+", text)
    spans = [text[s:e] for (s, e), sp in zip(enc["offset_mapping"], enc["special_tokens_mask"]) if not sp]
    assert spans == words
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    assert tok.unk_token_id not in enc["input_ids"]


def test_bpe_tokenizer_differs_and_reloads_with_offsets(bpe_tok, word_tok, corpus, concepts, tmp_path):
    from transformers import AutoTokenizer

    bpe_tok.save_pretrained(tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    text = corpus.heldout[1][0]
    enc = tok(text, return_offsets_mapping=True)
    assert enc["input_ids"] == bpe_tok(text)["input_ids"]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    # Offsets cover each word with its pieces: concatenating piece spans between spaces gives the words.
    pieces = [text[s:e] for s, e in enc["offset_mapping"][1:]]
    assert "".join(pieces) == text.replace(" ", "")
    members = [w for c in concepts for w in c.members]
    split = [w for w in members if len(tok(w, add_special_tokens=False)["input_ids"]) > 1]
    assert len(split) > len(members) // 4, "BPE should split many member words (cross-tokenizer alignment)"
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(word_tok)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(bpe_tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)


def test_tokenizers_are_a_function_of_the_corpus(corpus, word_tok, bpe_tok):
    texts = [t for t, _ in corpus.train]
    assert tokenizer_fingerprint(train_word_tokenizer(texts, 64)) == tokenizer_fingerprint(word_tok)
    assert tokenizer_fingerprint(train_bpe_tokenizer(texts, 300, 128)) == tokenizer_fingerprint(bpe_tok)
    assert tokenizer_fingerprint(train_bpe_tokenizer(list(reversed(texts)), 300, 128)) == tokenizer_fingerprint(bpe_tok)


def test_learn_bpe_merges_most_frequent_pair_first_and_breaks_ties_by_spelling():
    counts = word_counts(["ab ab ab cd cd cd xy"])
    vocab, merges = learn_bpe(counts, vocab_size=len(counts) + 20, min_frequency=2)
    assert merges == [("a", "##b"), ("c", "##d")]  # equal counts: alphabetical order
    assert vocab["ab"] < vocab["cd"] and "xy" not in vocab  # "xy" occurs once: below min_frequency


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_config_round_trip_and_fingerprint(size):
    cfg = config_for(size)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    assert fingerprint(cfg, 0) == fingerprint(WorldConfig.from_dict(cfg.to_dict()), 0)
    assert fingerprint(cfg, 0) != fingerprint(cfg, 1)
    archs = {cfg.foundation.architecture, cfg.subject_a.architecture, cfg.subject_b.architecture}
    assert cfg.foundation.architecture == "gpt2" and cfg.subject_a.architecture == "llama" and len(archs) >= 2
    f, a = cfg.foundation, cfg.subject_a
    assert (f.d_model, f.n_layers, f.seed) != (a.d_model, a.n_layers, a.seed)
    assert f.d_model != a.d_model and f.n_layers != a.n_layers and f.seed != a.seed


def test_config_validation_names_the_field():
    cfg = config_for("tiny").to_dict()
    with pytest.raises(ValueError, match="mix_prob"):
        WorldConfig.from_dict({**cfg, "mix_prob": 0.7})
    with pytest.raises(ValueError, match="size"):
        WorldConfig.from_dict({**cfg, "size": "huge"})
    with pytest.raises(ValueError, match="architecture"):
        ModelSpec.from_dict({**cfg["foundation"], "architecture": "bert"})
    with pytest.raises(ValueError, match="unknown world size"):
        config_for("huge")


# ---------------------------------------------------------------------- maths


def test_centred_topic_means_are_token_weighted_and_centred():
    means = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [10.0, 10.0]], dtype=np.float32)
    counts = np.array([1, 3, 2, 5])
    dirs = centred_topic_means(means, counts, [0, 0, 1, 2], 3)
    raw = np.array([[2.5, 0.0], [0.0, 2.0], [10.0, 10.0]])  # topic 0: (1*1 + 3*3) / 4
    np.testing.assert_allclose(dirs, raw - raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(dirs.sum(0), 0, atol=1e-5)
    with pytest.raises(ShapeError, match="no document on concept 3"):
        centred_topic_means(means, counts, [0, 0, 1, 2], 4)


def test_probe_and_unigram():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    y = np.arange(200) % 4
    x = centres[y] + rng.normal(size=(200, 16))
    assert probe_accuracy(x[:100], y[:100], x[100:], y[100:]) == 1.0
    # Unigram with add-one smoothing over a vocabulary of 4: counts of 1..3 are (2, 1, 0) + 1.
    ppl = unigram_perplexity([[9, 1, 1, 2]], [[9, 1, 3]], vocab_size=4)
    assert ppl == pytest.approx(np.exp(-(np.log(3 / 7) + np.log(1 / 7)) / 2))


def test_document_means_read_block_outputs_and_remove_hooks(word_tok):
    from engine.models.hooks import resolve_blocks

    spec = ModelSpec("llama", d_model=32, n_layers=2, n_heads=2, seed=0, steps=1, batch_size=2, lr=1e-3, max_length=64)
    model = make_model(spec, word_tok, seed=0).eval()
    texts = ["the and the", "and the"]
    ids = torch.tensor([word_tok(texts[0])["input_ids"]])
    model(input_ids=ids, output_hidden_states=True)  # transformers attaches its own hooks on first use
    before = [len(b._forward_hooks) for b in resolve_blocks(model)]
    means, counts = document_means(model, word_tok, texts, [0, -1])
    assert [len(b._forward_hooks) for b in resolve_blocks(model)] == before
    assert sorted(means) == [-1, 0] and means[-1].shape == (2, 32)
    enc = word_tok(texts[:1], return_special_tokens_mask=True, return_tensors="pt")
    keep = ~enc["special_tokens_mask"][0].bool()
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], output_hidden_states=True).hidden_states
    # hidden_states[L + 1] is block L's output (the last one has the final norm applied).
    np.testing.assert_allclose(means[0][0], hidden[1][0][keep].mean(0).numpy(), atol=1e-5)
    assert counts[0] == int(keep.sum())
    with pytest.raises(AtlasError, match="layer 2 is out of range"):
        document_means(model, word_tok, texts, [2])


def test_training_is_deterministic_for_a_seed(word_tok, corpus):
    spec = ModelSpec("gpt2", d_model=32, n_layers=1, n_heads=2, seed=0, steps=8, batch_size=4, lr=5e-3,
                     max_length=64, warmup_steps=2)
    docs = encode_documents([t for t, _ in corpus.train[:40]], word_tok, 64)
    runs = []
    for seed in (3, 3, 4):
        model = make_model(spec, word_tok, seed)
        losses = train_model(model, docs, spec, seed=seed, pad_id=word_tok.pad_token_id, quiet=True)
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert runs[0][0][-1] < runs[0][0][0]


def test_greedy_continuations_never_choose_blocked_tokens(word_tok):
    spec = ModelSpec("gpt2", d_model=32, n_layers=1, n_heads=2, seed=0, steps=1, batch_size=2, lr=1e-3, max_length=64)
    model = make_model(spec, word_tok, seed=0)
    the = word_tok.convert_tokens_to_ids("the")
    blocked = [i for i in range(len(word_tok)) if i != the]
    out = greedy_continuations(model, word_tok, ["it was a", "the", "and the"], n_new=5, blocked=blocked)
    assert out == ["the the the the the"] * 3
    free = greedy_continuations(model, word_tok, ["it was a", "the"], n_new=7)
    assert all(len(c.split()) == 7 for c in free)  # no special token was chosen (they are skipped in decoding)
