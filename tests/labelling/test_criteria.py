"""Retrieval criteria (engine.labelling.criteria) against brute-force formulas on small matrices."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import BadValueError
from engine.labelling.criteria import (
    AtlasSideStats,
    AtlasStat,
    atlas_side_stats,
    candidate_k,
    criterion_scores,
    label_topk,
    merge_topk,
    rerank,
    top_k,
    unit_rows,
)


def _data(seed=0, n=57, m=23, d=8):
    rng = np.random.default_rng(seed)
    return unit_rows(rng.normal(size=(n, d))), unit_rows(rng.normal(size=(m, d)))


def _brute(q, a, k, beta):
    cos = q.astype(np.float64) @ a.T.astype(np.float64)  # (n, m)
    r_s = np.array([np.mean(sorted(row, reverse=True)[:k]) for row in cos])
    r_t = np.array([np.mean(sorted(col, reverse=True)[:k]) for col in cos.T])
    csls = 2 * cos - r_s[:, None] - r_t[None, :]
    isf = np.exp(beta * cos) / np.exp(beta * cos).sum(0, keepdims=True)
    return cos, r_t, csls, isf


@pytest.mark.parametrize("batch", [1, 7, 57, 1000])
def test_streamed_atlas_side_statistic_is_the_formula_whatever_the_batches(batch):
    q, a = _data()
    k, beta = 5, 12.0
    _, r_t, _, _ = _brute(q, a, k, beta)
    stat = atlas_side_stats((q[i:i + batch] for i in range(0, len(q), batch)), a, k=k, beta=beta)
    np.testing.assert_allclose(stat.r_atlas, r_t, atol=1e-5)
    cos = q.astype(np.float64) @ a.T
    np.testing.assert_allclose(stat.log_z, np.log(np.exp(beta * cos).sum(0)), rtol=1e-6)
    assert stat.n_queries == len(q)


@pytest.mark.parametrize("batch,block", [(500, 16384), (97, 7), (1, 64)])
def test_one_pass_gives_the_statistic_and_each_querys_candidates(batch, block):
    """Enough queries that an atlas block's column-wise top-k goes past its dense seed
    (`SEED_ROWS`) onto the threshold merge; the candidates are the exact cosine top-k'."""
    q, a = _data(9, n=500, m=40, d=6)
    k, beta, kc = 7, 8.0, 12
    cos, r_t, _, _ = _brute(q, a, k, beta)
    acc = AtlasSideStats(a, k=k, beta=beta)
    got = [acc.update(q[i:i + batch], kc, block=block) for i in range(0, len(q), batch)]
    cs, ci = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    ws, wi = top_k(cos, kc)
    np.testing.assert_allclose(cs, ws, atol=1e-5)
    assert (ci == wi).mean() > 0.999  # float ties aside
    np.testing.assert_allclose(acc.r_atlas, r_t, atol=1e-5)
    np.testing.assert_allclose(acc.top, -np.sort(-cos, axis=0)[:k].T, atol=1e-5)
    np.testing.assert_array_equal(acc.top_ids[:, 0], cos.argmax(0))  # which query is each concept's best
    np.testing.assert_allclose(acc.log_z, np.log(np.exp(beta * cos).sum(0)), rtol=1e-6)
    assert acc.n_queries == len(q)
    with pytest.raises(BadValueError, match="candidates"):
        acc.update(q[:2], 0)


def test_atlas_blocks_and_merge_give_the_same_statistic():
    q, a = _data(1)
    one = AtlasSideStats(a, k=4)
    one.update(q, block=5)  # atlas in blocks of 5 rows
    x, y = AtlasSideStats(a, k=4), AtlasSideStats(a, k=4)
    x.update(q[:20])
    y.update(q[20:])
    x.merge(y)
    np.testing.assert_allclose(one.r_atlas, x.r_atlas, atol=1e-6)
    np.testing.assert_allclose(one.log_z, x.log_z, rtol=1e-9)


def test_fewer_queries_than_k_average_over_those_seen():
    q, a = _data(2, n=3)
    stat = AtlasSideStats(a, k=10)
    stat.update(q)
    np.testing.assert_allclose(stat.r_atlas, (q @ a.T).mean(0), atol=1e-6)


@pytest.mark.parametrize("criterion", ["nn", "csls", "isf"])
def test_full_scores_rank_as_the_formula(criterion):
    q, a = _data(3)
    k, beta = 5, 10.0
    cos, _, csls, isf = _brute(q, a, k, beta)
    stat = atlas_side_stats([q], a, k=k, beta=beta)
    got = criterion_scores(q, a, criterion, stat)
    want = {"nn": cos, "csls": csls, "isf": np.log(isf)}[criterion]
    if criterion == "isf":  # log isf = β cos − log Z: the same numbers
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(got, 1), np.argmax(want, 1))


@pytest.mark.parametrize("criterion", ["nn", "csls", "isf"])
def test_reranking_all_candidates_is_the_full_ranking(criterion):
    q, a = _data(4)
    stat = atlas_side_stats([q], a, k=5, beta=10.0)
    full = criterion_scores(q, a, criterion, stat)
    cs, ci = top_k(q @ a.T, a.shape[0])  # every atlas row a candidate
    s, ids = rerank(cs, ci, criterion, stat, 3)
    ws, wi = top_k(full, 3)
    np.testing.assert_array_equal(ids, wi)
    np.testing.assert_allclose(s, ws, atol=1e-5)


def test_label_topk_with_default_candidates_mostly_agrees_with_the_full_ranking():
    rng = np.random.default_rng(5)
    a = unit_rows(rng.normal(size=(400, 16)))
    hub = a[:3].mean(0)
    q = unit_rows(rng.normal(size=(300, 16)) + 2.0 * hub)  # queries crowd around three hubs
    _, ids, stat = label_topk(q, a, 5, "csls", csls_k=10)
    want = np.argmax(criterion_scores(q, a, "csls", stat), 1)
    assert (ids[:, 0] == want).mean() > 0.95
    _, nn_ids, _ = label_topk(q, a, 5, "nn")
    assert (ids[:, 0] != nn_ids[:, 0]).any()  # csls does change hub-crowded rankings
    assert candidate_k(5, 400) == 32 and candidate_k(20, 400) == 80 and candidate_k(5, 10) == 10


def test_recorded_statistic_round_trips_exactly(tmp_path):
    q, a = _data(6)
    acc = AtlasSideStats(a, k=5)
    acc.update(q)
    rec = AtlasStat.of(acc)
    again = AtlasStat.from_record(acc.record())
    np.testing.assert_array_equal(rec.r_atlas, again.r_atlas)
    rec.save(tmp_path / "stat.npz")
    back = AtlasStat.load(tmp_path / "stat.npz")
    np.testing.assert_array_equal(back.log_z, rec.log_z)
    cs, ci = top_k(q @ a.T, 20)
    np.testing.assert_array_equal(rerank(cs, ci, "csls", rec, 5)[1], rerank(cs, ci, "csls", back, 5)[1])


def test_missing_candidates_and_bad_input():
    q, a = _data(7)
    stat = atlas_side_stats([q], a, k=3)
    cs, ci = top_k(q @ a.T, 6)
    ci[:, 4:] = -1  # an ANN index returned fewer
    s, ids = rerank(cs, ci, "csls", stat, 6)
    assert (ids[:, 4:] == -1).all() and np.isnan(s[:, 4:]).all()
    with pytest.raises(BadValueError, match="criterion must be one of"):
        rerank(cs, ci, "bogus", stat, 3)
    with pytest.raises(BadValueError, match="needs the atlas-side statistic"):
        rerank(cs, ci, "isf", None, 3)
    csls_only = atlas_side_stats([q], a, k=3, log_partition=False)
    np.testing.assert_array_equal(csls_only.r_atlas, stat.r_atlas)
    np.testing.assert_array_equal(rerank(cs, ci, "csls", csls_only, 3)[1], rerank(cs, ci, "csls", stat, 3)[1])
    with pytest.raises(BadValueError, match="log-partition"):
        rerank(cs, ci, "isf", csls_only, 3)
    np.testing.assert_array_equal(merge_topk(np.full((1, 3), -np.inf, np.float32), np.array([[1.0, 3.0]]), 3),
                                  [[3.0, 1.0, -np.inf]])


def test_recorded_best_scores_give_mutual_nearest_neighbours():
    from engine.labelling.confidence import mutual_nearest

    q, a = _data(8)
    stat = atlas_side_stats([q[:30], q[30:]], a, k=3)
    cos = q @ a.T
    np.testing.assert_allclose(stat.best, cos.max(0), atol=1e-6)
    s, ids, _ = label_topk(q, a, 2, "nn")
    want = cos.argmax(0)[ids[:, 0]] == np.arange(len(q))
    np.testing.assert_array_equal(mutual_nearest(ids[:, 0], s[:, 0], stat.best), want)
