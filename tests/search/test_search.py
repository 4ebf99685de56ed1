"""Search through a map on a real store and real FAISS, checked against brute-force cosine."""

from __future__ import annotations

import numpy as np
import pytest

from engine.align.map import AlignmentMap, load_map, save_map
from engine.errors import SiteMismatchError
from engine.search import atlas_centre, project, search, search_arrays
from engine.store.store import AtlasSource, IndexPlacement
from engine.util import unit_rows
from indexes.policy import ANN_SPEC, FLAT_MAX_CONCEPTS, choose_index_spec
from tests.conftest import clustered_directions

D_SUBJECT, D_ATLAS, N_CONCEPTS = 32, 48, 400


def make_mapped_store(store, n=N_CONCEPTS, d_s=D_SUBJECT, d_a=D_ATLAS, seed=0, map_name="m", subject_layer=2,
                      subject_source="/nonexistent/subj", labels=None):
    """An atlas ``at`` (clustered directions), a subject model ``subj`` and an affine map ``m`` between them.

    The map's linear part is a random (d_s, d_a) matrix, its means are non-zero: every term of the
    affine map matters in the checks. ``labels``: the concepts' labels (None: unlabelled; default
    "concept i" each). Returns (atlas vectors, map).
    """
    rng = np.random.default_rng(seed)
    x = clustered_directions(n, d_a, seed=seed)
    store.add_atlas("at", x, [f"concept {i}" for i in range(n)] if labels is None else labels,
                    source=AtlasSource(model="found", layer=3))
    store.add_model("subj", d_model=d_s, source=subject_source)
    w = rng.normal(size=(d_s, d_a)) / np.sqrt(d_s)
    amap = AlignmentMap(w, np.linalg.pinv(w), rng.normal(size=d_s), rng.normal(size=d_a), "procrustes",
                        subject_model="subj", subject_layer=subject_layer, atlas="at", atlas_model="found", atlas_layer=3)
    save_map(store, amap, map_name)
    return x, load_map(store, map_name)


def brute_force(queries: np.ndarray, atlas: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = unit_rows(queries).astype(np.float64) @ unit_rows(atlas).T.astype(np.float64)  # (n, N)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def assert_same_topk(scores, ids, exact_scores, queries_sims, atol=1e-5):
    """FAISS and brute force agree on the scores; ids may differ only between tied scores."""
    np.testing.assert_allclose(scores, exact_scores, atol=atol)
    for row_ids, row_scores, sims in zip(ids, scores, queries_sims):
        np.testing.assert_allclose(sims[row_ids], row_scores, atol=atol)


@pytest.fixture
def mapped(store):
    x, amap = make_mapped_store(store)
    return store, x, amap


def test_project_directions_is_the_renormalised_linear_part(mapped):
    _, _, amap = mapped
    v = np.random.default_rng(1).normal(size=(5, D_SUBJECT)).astype(np.float32)
    y = project(amap, v * 7.0)  # the scale of a direction does not matter
    np.testing.assert_allclose(y, unit_rows(v @ amap.weight), atol=1e-5)
    assert y.dtype == np.float32 and y.shape == (5, D_ATLAS)


def test_project_activations_centres_unless_raw(mapped):
    _, _, amap = mapped
    x = np.random.default_rng(2).normal(size=(4, D_SUBJECT)).astype(np.float32)
    affine = (x - amap.subject_mean) @ amap.weight + amap.atlas_mean
    np.testing.assert_allclose(project(amap, x, "activations", centre=False), unit_rows(affine), atol=1e-5)
    np.testing.assert_allclose(project(amap, x, "activations"), unit_rows(affine - amap.atlas_mean), atol=1e-5)
    np.testing.assert_allclose(atlas_centre(amap), amap.atlas_mean, atol=1e-6)


@pytest.mark.parametrize("kind", ["directions", "activations"])
def test_search_arrays_matches_brute_force(mapped, kind):
    store, atlas, amap = mapped
    v = np.random.default_rng(3).normal(size=(50, D_SUBJECT)).astype(np.float32)
    scores, ids = search_arrays(store, amap, v, k=7, kind=kind)
    q = project(amap, v, kind)
    exact, _ = brute_force(q, atlas, 7)
    assert_same_topk(scores, ids, exact, unit_rows(q) @ unit_rows(atlas).T)


def test_batching_does_not_change_results(mapped):
    store, _, amap = mapped
    v = np.random.default_rng(4).normal(size=(53, D_SUBJECT)).astype(np.float32)
    one = search_arrays(store, amap, v, k=5)
    small = search_arrays(store, amap, v, k=5, batch_size=8)
    np.testing.assert_array_equal(one[1], small[1])
    np.testing.assert_allclose(one[0], small[0], atol=1e-6)


def test_search_joins_labels_and_ranks(mapped):
    store, atlas, amap = mapped
    # subject directions that map exactly onto concepts 10 and 20 (w has full column rank... not
    # needed: least squares gives v with v @ w closest to the concept direction)
    target = unit_rows(atlas[[10, 20]])
    v = np.linalg.lstsq(amap.weight.T, target.T, rcond=None)[0].T
    hits = search(store, amap, v, k=3)
    assert [len(h) for h in hits] == [3, 3]
    assert [h.rank for h in hits[0]] == [1, 2, 3]
    for row in hits:
        assert all(a.score >= b.score for a, b in zip(row, row[1:]))
        for h in row:
            assert h.label == f"concept {h.ordinal}" and h.ref == f"at/{h.ordinal}" and h.atlas == "at"


def test_k_larger_than_the_atlas_pads_with_minus_one(store):
    _, amap = make_mapped_store(store, n=6)
    scores, ids = search_arrays(store, amap, np.ones((2, D_SUBJECT), np.float32), k=10)
    assert (ids[:, :6] >= 0).all() and (ids[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert [len(h) for h in search(store, amap, np.ones((1, D_SUBJECT)), k=10)] == [6]


def test_wrong_width_is_a_site_mismatch(mapped):
    store, _, amap = mapped
    with pytest.raises(SiteMismatchError):
        search(store, amap, np.ones((3, D_SUBJECT + 1)), k=2)


def test_choose_index_spec_by_size():
    assert choose_index_spec(1000, 768) == "Flat"
    assert choose_index_spec(FLAT_MAX_CONCEPTS, 768) == "Flat"
    assert choose_index_spec(1_000_000, 768) == ANN_SPEC


def test_the_ann_spec_finds_the_exact_neighbours_on_structured_data():
    import indexes

    x = unit_rows(clustered_directions(3000, 32, n_base=40, seed=3))
    index = indexes.create_index(32, ANN_SPEC)
    index.add(x, np.arange(len(x)))
    noise = np.random.default_rng(4).normal(size=(200, 32)).astype(np.float32)
    q = unit_rows(x[:200] + 0.1 * noise)  # held out: perturbed directions, not the indexed vectors
    _, ids = index.search(q, 10)
    _, exact = brute_force(q, x, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)])
    assert recall >= 0.95


def test_auto_index_spec_in_the_store(store):
    info = store.add_atlas(
        "small", clustered_directions(50, 8), source=AtlasSource(model="m", layer=0),
        index=IndexPlacement(spec="auto"),
    )
    assert info.index_spec == "Flat"
    assert store.rebuild_index("small", "auto").spec == "Flat"


# ---------------------------------------------------------------------- explain


@pytest.fixture
def tiny_subject(tmp_path):
    """A randomly initialised 2-layer Llama (d=32) with a word-level tokenizer, saved to a folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<s>", "the", "cat", "sat", "on", "mat", "rain", "falls"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=D_SUBJECT, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    folder = tmp_path / "subject-model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_explain_gives_each_token_the_top_concepts_of_its_mapped_residual(store, tiny_subject):
    import torch

    from engine.models.loading import load_model
    from engine.search import explain

    atlas, amap = make_mapped_store(store, subject_layer=1, subject_source=str(tiny_subject))
    text = "the cat sat on the mat"
    tokens = explain(store, amap, text, k=3)
    assert [t.token for t in tokens] == text.split()
    assert [(t.start, t.end) for t in tokens[:2]] == [(0, 3), (4, 7)]

    model, tok = load_model(tiny_subject)
    seen = {}
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(**tok(text, return_tensors="pt"))
    handle.remove()
    acts = seen["h"][0].numpy()  # (n_tokens, d) — this tokenizer adds no special tokens
    q = project(amap, acts, "activations")
    exact, _ = brute_force(q, atlas, 3)
    sims = unit_rows(q) @ unit_rows(atlas).T
    got = np.array([[h.score for h in t.hits] for t in tokens])
    np.testing.assert_allclose(got, exact, atol=1e-4)
    for t, row in zip(tokens, sims):
        np.testing.assert_allclose([row[h.ordinal] for h in t.hits], [h.score for h in t.hits], atol=1e-4)


def test_explain_cli_table_and_json(store, tiny_subject):
    import json

    from click.testing import CliRunner

    from engine.cli import cli

    make_mapped_store(store, subject_layer=1, subject_source=str(tiny_subject))
    args = ["explain", "m", "rain falls on the cat", "-k", "2", "--store", str(store.path)]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # stdout only: transformers reports loading on stderr
    assert [t["token"] for t in out] == ["rain", "falls", "on", "the", "cat"]
    assert all(len(t["hits"]) == 2 and t["hits"][0]["label"].startswith("concept ") for t in out)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "rain" in r.output and "#2" in r.output
