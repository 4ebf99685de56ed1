"""What the explorer's pages read (`engine.atlas.explore`), on the server tests' real store: the best
map per subject, the default map, titles of unlabelled latents, a page of an atlas's concepts, map and
model pages, a histogram, a concept's logits through a subject's unembedding and its per-token scores."""

from __future__ import annotations

import numpy as np
import pytest

from engine.atlas.explore import (
    best_maps,
    concept_list,
    concept_title,
    default_map,
    direction_logits,
    histogram,
    map_page,
    model_page,
)
from engine.errors import BadValueError, NotFoundError
from engine.models.loading import load_model
from tests.serve_helpers import build_serve_store
from tests.steering.test_steering import save_tiny_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explore")
    folder = save_tiny_model("llama", root / "subject")
    store = build_serve_store(root, folder)
    yield store, folder
    store.close()
    torch.set_num_threads(n)


def test_best_and_default_maps(served):
    store, _ = served
    assert [m.name for m in best_maps(store, "fdn")] == ["m1"]  # m1 and m2 tie at R² 0.5: by name
    assert [m.name for m in best_maps(store, "sae")] == ["eval-sae.subj"] and best_maps(store, "other") == []
    assert default_map(store) == "m1"  # a labelled atlas before the better R² into unlabelled latents


def test_titles_and_pages_of_an_atlas(served):
    store, _ = served
    latent = store.concept(3, "sae")
    assert concept_title(latent) == "latent 3 of sae (unlabelled)" and concept_title(store.concept(2, "fdn")) == "animals"
    page = concept_list(store, "sae", limit=4)
    assert (page.total, [c["ordinal"] for c in page.concepts]) == (6, [0, 1, 2, 3])
    assert [c["ordinal"] for c in concept_list(store, "sae", offset=4, limit=4).concepts] == [4, 5]
    assert [c["label"] for c in concept_list(store, "fdn", query="LIONS").concepts] == ["animals"]  # description
    assert concept_list(store, "sae", labelled=True).total == 0 and concept_list(store, "fdn", labelled=True).total == 5
    with pytest.raises(BadValueError):
        concept_list(store, "fdn", limit=0)
    with pytest.raises(NotFoundError):
        concept_list(store, "nope")


def test_map_and_model_pages(served):
    store, _ = served
    m = map_page(store, "m1")
    assert m["map"]["name"] == "m1" and [r["name"] for r in m["runs"]] == ["r1"] and m["contexts"]["top"] == 8
    assert map_page(store, "m2")["runs"] == [] and map_page(store, "m2")["contexts"] is None
    subj = model_page(store, "subj")
    assert sorted(x["name"] for x in subj["maps"]) == ["eval-sae.subj", "m1", "m2"] and subj["atlases"] == []
    with pytest.raises(NotFoundError):
        map_page(store, "nope")


def test_histogram():
    h = histogram([0.0, 1.0, 1.0, 2.0, float("nan")], bins=2)
    assert h == {"edges": [0.0, 1.0, 2.0], "counts": [1, 3]}
    assert histogram([]) == {"edges": [], "counts": []} and sum(histogram([3.0, 3.0])["counts"]) == 2


def test_logits_read_the_direction_through_the_unembedding(served):
    from engine.align.map import load_map

    store, folder = served
    model, tok = load_model(folder)
    out = direction_logits(store, "m1", "fdn/0", model, tok, k=3)
    u = load_map(store, "m1").inverse_directions(store.atlas_vectors("fdn")[0])
    logits = model.get_output_embeddings().weight.detach().numpy() @ u
    special = set(tok.all_special_ids)
    order = [i for i in np.argsort(-logits) if i not in special]
    assert [t for t, _ in out["top"]] == [tok.decode([i]) for i in order[:3]]
    assert [t for t, _ in out["bottom"]] == [tok.decode([i]) for i in order[::-1][:3]]
    assert out["top"][0][1] == pytest.approx(float(logits[order[0]]), rel=1e-5)
    with pytest.raises(NotFoundError):
        direction_logits(store, "m1", "fdn/99", model, tok)


def test_concept_scores_per_token_match_explain(served):
    from engine.align.map import load_map
    from engine.search import concept_on_texts, explain

    store, folder = served
    model, tok = load_model(folder)
    amap = load_map(store, "m1")
    [scored, none] = concept_on_texts(store, amap, ["the red lion", "天気"], "fdn/2", model=model, tokenizer=tok)
    assert [t.token for t in scored] == ["the", "red", "lion"] and none == []
    tokens = explain(store, amap, "the red lion", k=5, model=model, tokenizer=tok)  # k = the atlas: every concept
    assert [t.score for t in scored] == pytest.approx([next(h.score for h in t.hits if h.ref == "fdn/2") for t in tokens],
                                                      abs=1e-5)


def test_corpus_density_scores_every_token_of_the_contexts_corpus(served):
    from engine.align.corpus import read_corpus
    from engine.align.map import load_map
    from engine.atlas.explore import corpus_density
    from engine.search import concept_on_texts

    store, folder = served
    model, tok = load_model(folder)
    d = corpus_density(store, "m1", "fdn/2", model, tok, max_texts=10)
    texts = read_corpus(store.context_run("fdn", "m1").corpus)[:10]
    scores = [t.score for x in concept_on_texts(store, load_map(store, "m1"), texts, "fdn/2", model=model,
                                                tokenizer=tok) for t in x]
    assert (d["n_texts"], d["n_tokens"], sum(d["histogram"]["counts"])) == (10, len(scores), len(scores))
    assert d["positive"] == pytest.approx(np.mean(np.asarray(scores) > 0))
    with pytest.raises(NotFoundError, match="no top contexts"):
        corpus_density(store, "m2", "fdn/2", model, tok)
    with pytest.raises(BadValueError):
        corpus_density(store, "m1", "fdn/2", model, tok, max_texts=0)
