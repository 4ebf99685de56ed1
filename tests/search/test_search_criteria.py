"""Criteria (nn, csls, isf) in search and explain (issue 25): real store, real FAISS, a real model,
each checked against the brute-force formula (`engine.labelling.criteria.criterion_scores`) over
the population the module docstring of `engine.search` names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.errors import BadValueError
from engine.labelling.criteria import AtlasSideStats, AtlasStat, criterion_scores, top_k
from engine.search import Scoring, explain, project, search, search_arrays, token_stat
from engine.util import unit_rows
from tests.search.test_search import N_CONCEPTS, make_mapped_store, tiny_subject  # noqa: F401 - a fixture

CORPUS = ["the cat sat on the mat", "rain falls on the cat", "the mat sat on the rain", "cat cat mat"]


def brute_stat(q: np.ndarray, atlas: np.ndarray, k: int = 10, beta: float = 30.0) -> AtlasStat:
    """The atlas-side statistic of unit queries ``q`` from the full similarity matrix."""
    cos = unit_rows(q).astype(np.float64) @ unit_rows(atlas).T.astype(np.float64)
    top = -np.sort(-cos, axis=0)[:k]
    z = beta * cos
    m = z.max(0)
    return AtlasStat(k, beta, top.mean(0).astype(np.float32), m + np.log(np.exp(z - m).sum(0)), len(q))


@pytest.mark.parametrize("criterion", ["nn", "csls", "isf"])
def test_search_directions_rank_by_the_formula_over_the_queries_given(store, criterion):
    atlas, amap = make_mapped_store(store)
    v = np.random.default_rng(3).normal(size=(150, amap.d_subject)).astype(np.float32)
    q = project(amap, v)
    k = 100  # candidate_k(100, 400) is every concept: the re-rank is the full ranking
    scores, ids = search_arrays(store, amap, v, k, scoring=Scoring(criterion), batch_size=64)
    want = criterion_scores(q, atlas, criterion, None if criterion == "nn" else brute_stat(q, atlas))
    ws, wi = top_k(want, k)
    np.testing.assert_allclose(scores, ws, atol=2e-4)
    assert (ids[:, 0] == wi[:, 0]).mean() > 0.99
    if criterion != "nn":
        assert (ids[:, 0] != top_k(criterion_scores(q, atlas, "nn"), 1)[1][:, 0]).any()  # it does re-rank
    hits = search(store, amap, v, k, scoring=Scoring(criterion))[:3]  # the same population: the same hits
    assert [[h.ordinal for h in row] for row in hits] == ids[:3].tolist()


def _token_queries(folder, amap, texts):
    """The mapped, centred residuals of ``texts`` at the map's subject site, read with a forward hook."""
    import torch

    from engine.models.loading import load_model

    model, tok = load_model(folder)
    out: list[np.ndarray] = []
    h = model.model.layers[amap.subject_layer].register_forward_hook(
        lambda m, a, o: out.append((o[0] if isinstance(o, tuple) else o)[0].numpy()))
    for t in texts:
        with torch.no_grad():
            model(**tok(t, return_tensors="pt"))
    h.remove()
    return project(amap, np.concatenate(out), "activations")


@pytest.mark.parametrize("criterion", ["csls", "isf"])
def test_explain_ranks_by_the_formula_over_the_maps_cached_token_statistic(store, tiny_subject, criterion,  # noqa: F811
                                                                           monkeypatch):
    atlas, amap = make_mapped_store(store, subject_layer=1, subject_source=str(tiny_subject))
    with pytest.raises(BadValueError, match="--stat-corpus"):  # nothing cached yet: says how to make it
        explain(store, amap, "the cat", 3, scoring=Scoring(criterion))
    text = "rain falls on the mat"
    token_stat(store, amap, CORPUS)
    tokens = explain(store, amap, text, 100, scoring=Scoring(criterion))
    stat = brute_stat(_token_queries(tiny_subject, amap, CORPUS), atlas)
    cached = token_stat(store, amap).plain
    np.testing.assert_allclose(cached.r_atlas, stat.r_atlas, atol=1e-5)
    np.testing.assert_allclose(cached.log_z, stat.log_z, atol=1e-5)  # float32 residuals (batched vs one by one)
    assert cached.n_queries == len(_token_queries(tiny_subject, amap, CORPUS))
    want_s, want_i = top_k(criterion_scores(_token_queries(tiny_subject, amap, [text]), atlas, criterion, stat), 100)
    np.testing.assert_allclose([[h.score for h in t.hits] for t in tokens], want_s, atol=2e-3 if criterion == "isf" else 2e-4)
    assert [t.hits[0].ordinal for t in tokens] == want_i[:, 0].tolist()

    def no_recompute(*a, **kw):
        raise AssertionError("the map's statistic is cached: explain must not compute it again")

    monkeypatch.setattr(AtlasSideStats, "update", no_recompute)
    again = explain(store, amap, text, 100, scoring=Scoring(criterion))
    assert [[h.ordinal for h in t.hits] for t in again] == [[h.ordinal for h in t.hits] for t in tokens]
    # search over activations reads the same cached statistic
    s, i = search_arrays(store, amap, np.zeros((2, amap.d_subject), np.float32) + 1, 5, kind="activations",
                         scoring=Scoring(criterion))
    assert s.shape == (2, 5) and (i >= 0).all()


def test_criterion_values_are_checked_with_one_line_errors(store, tiny_subject):  # noqa: F811
    _, amap = make_mapped_store(store, subject_layer=1, subject_source=str(tiny_subject))
    v = np.ones((2, amap.d_subject), np.float32)
    with pytest.raises(BadValueError, match="criterion must be one of nn, csls, isf, got 'bogus'"):
        Scoring("bogus")
    with pytest.raises(BadValueError, match="csls k must be"):
        Scoring("csls", csls_k=0)
    with pytest.raises(BadValueError, match="--stat-corpus"):
        search_arrays(store, amap, v, 3, kind="activations", scoring=Scoring("csls"))
    with pytest.raises(BadValueError, match="whitening applies to activations"):
        search_arrays(store, amap, v, 3, scoring=Scoring(whiten=True))
    st = ["--store", str(store.path)]
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--criterion", "bogus", *st])
    assert r.exit_code == 2 and "bogus" in r.output
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--criterion", "csls", *st])
    assert r.exit_code != 0 and "--stat-corpus" in r.output and "Traceback" not in r.output
    corpus = store.path.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--stat-corpus", str(corpus), *st])
    assert r.exit_code == 2 and "--stat-corpus is for --criterion csls or isf, or --whiten" in r.output
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--criterion", "csls", "--stat-corpus", str(corpus),
                                 "--json", *st])
    assert r.exit_code == 0, r.output
    assert [t["token"] for t in json.loads(r.stdout)] == ["the", "cat"]
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--criterion", "isf", "--json", *st])  # cached now
    assert r.exit_code == 0, r.output
    vec = store.path.parent / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=(20, amap.d_subject)).astype(np.float32))
    r = CliRunner().invoke(cli, ["search", "m", "--vectors", str(vec), "--criterion", "csls", "--json", *st])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 20 * 10
    r = CliRunner().invoke(cli, ["search", "m", "--vectors", str(vec), "--criterion", "mnn", *st])
    assert r.exit_code == 2 and "mnn" in r.output
    assert N_CONCEPTS == 400


def test_whitening_is_the_zca_of_the_maps_token_population(store, tiny_subject):  # noqa: F811
    atlas, amap = make_mapped_store(store, subject_layer=1, subject_source=str(tiny_subject))
    with pytest.raises(BadValueError, match="no token statistic"):
        explain(store, amap, "the cat", 3, scoring=Scoring(whiten=True))
    text = "rain falls on the mat"
    token_stat(store, amap, CORPUS)
    tokens = explain(store, amap, text, 5, scoring=Scoring(whiten=True))
    # brute force: the population's mapped residuals, their covariance's ZCA with the ridge
    import torch

    from engine.models.loading import load_model
    from engine.search import WHITEN_RIDGE

    model, tok = load_model(tiny_subject)
    res: list[np.ndarray] = []
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: res.append((o[0] if isinstance(o, tuple) else o)[0].numpy()))
    for t in [*CORPUS, text]:
        with torch.no_grad():
            model(**tok(t, return_tensors="pt"))
    h.remove()
    y = amap.map_activations(np.concatenate(res[:-1])).astype(np.float64)
    mu = y.mean(0)
    ev, v = np.linalg.eigh(np.cov((y - mu).T))
    zca = v @ np.diag((np.clip(ev, 0, None) + WHITEN_RIDGE * np.clip(ev, 0, None).mean()) ** -0.5) @ v.T
    q = unit_rows((amap.map_activations(res[-1]) - mu) @ zca)
    ws, wi = top_k(q @ unit_rows(atlas).T, 5)
    np.testing.assert_allclose([[h.score for h in t.hits] for t in tokens], ws, atol=1e-3)
    assert [t.hits[0].ordinal for t in tokens] == wi[:, 0].tolist()
    cached = token_stat(store, amap)
    np.testing.assert_allclose(cached.mean, mu, atol=1e-4)
    # whitening with csls: the whitened population's statistic
    wst = brute_stat(unit_rows((y - mu) @ zca), atlas)
    np.testing.assert_allclose(cached.whitened.r_atlas, wst.r_atlas, atol=1e-3)
    both = explain(store, amap, text, 100, scoring=Scoring("csls", whiten=True))
    want = top_k(criterion_scores(q, atlas, "csls", wst), 100)[1]
    assert [t.hits[0].ordinal for t in both] == want[:, 0].tolist()
    with pytest.raises(BadValueError, match="exclude"):
        explain(store, amap, text, 3, scoring=Scoring(whiten=True), centre=False)
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--whiten", "--raw", "--store", str(store.path)])
    assert r.exit_code == 2 and "--whiten replaces the centring" in r.output
    r = CliRunner().invoke(cli, ["explain", "m", "the cat", "--whiten", "--json", "--store", str(store.path)])
    assert r.exit_code == 0, r.output
