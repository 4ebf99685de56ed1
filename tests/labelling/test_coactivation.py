"""Activation-based matching (engine.labelling.coactivation) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from engine.atlas.encoder import AtlasEncoder
from engine.errors import BadValueError, ShapeError
from engine.labelling.coactivation import (
    CoactivationStats,
    ProjectionEncoder,
    WeightedMeans,
    accumulate_coactivation,
    binary_codes,
    sparse_codes,
    weighted_mean_scores,
)


def _codes(rng, n, m, k):
    """TopK-like codes: k positive entries per row."""
    a = np.zeros((n, m), np.float32)
    for i in range(n):
        a[i, rng.choice(m, k, replace=False)] = rng.random(k) + 0.1
    return a


def _pearson(ax, ay):
    ax, ay = np.asarray(ax, np.float64), np.asarray(ay, np.float64)
    out = np.zeros((ax.shape[1], ay.shape[1]))
    for i in range(ax.shape[1]):
        for j in range(ay.shape[1]):
            if ax[:, i].std() > 0 and ay[:, j].std() > 0:
                out[i, j] = np.corrcoef(ax[:, i], ay[:, j])[0, 1]
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_streamed_correlation_is_pearson_whatever_the_batches(sparse):
    rng = np.random.default_rng(0)
    ax, ay = _codes(rng, 300, 12, 3), _codes(rng, 300, 9, 2)
    ax[:, 5] = 0  # a dead latent: correlation 0
    want = _pearson(ax, ay)
    st = CoactivationStats(12, 9, sparse=sparse)
    for lo in range(0, 300, 37):
        st.update(sparse_codes(ax[lo:lo + 37]), sparse_codes(ay[lo:lo + 37]) if sparse else ay[lo:lo + 37])
    np.testing.assert_allclose(st.correlation(), want, atol=1e-10)
    assert st.n == 300
    s, ids = st.top_matches(3, block=5)
    order = np.argsort(-want, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(s, np.take_along_axis(want, order, 1), atol=1e-6)
    s2, ids2 = st.top_matches(3, lo=4, hi=9)
    np.testing.assert_array_equal(ids2, ids[4:9])


def test_merge_and_save_load_are_exact(tmp_path):
    rng = np.random.default_rng(1)
    ax, ay = _codes(rng, 200, 10, 3), _codes(rng, 200, 7, 2)
    for sparse in (False, True):
        whole = CoactivationStats(10, 7, sparse=sparse)
        whole.update(ax, ay)
        a, b = CoactivationStats(10, 7, sparse=sparse), CoactivationStats(10, 7, sparse=sparse)
        a.update(ax[:80], ay[:80])
        b.update(ax[80:], ay[80:])
        a.merge(b)
        np.testing.assert_allclose(a.correlation(), whole.correlation(), atol=1e-12)
        a.save(tmp_path / f"c{sparse}.npz")
        back = CoactivationStats.load(tmp_path / f"c{sparse}.npz")
        np.testing.assert_array_equal(back.correlation(), a.correlation())
        assert back.fingerprint() == a.fingerprint()
    with pytest.raises(ShapeError):
        whole.update(ax[:, :3], ay)


def test_weighted_means_and_their_scores():
    rng = np.random.default_rng(2)
    ax = _codes(rng, 50, 6, 2)
    ax[:, 4] = 0
    y = rng.normal(size=(50, 5))
    wm = WeightedMeans(6, 5)
    wm.update(sp.csr_matrix(ax[:20]), y[:20])
    wm.update(ax[20:], y[20:])
    m = wm.means()
    for j in range(6):
        w = ax[:, j].astype(np.float64)
        want = (w[:, None] * y).sum(0) / w.sum() if w.sum() > 0 else np.zeros(5)
        np.testing.assert_allclose(m[j], want, atol=1e-6)
    enc = AtlasEncoder(rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32), k=2)
    np.testing.assert_allclose(weighted_mean_scores(m, enc), m @ enc.W_enc + enc.b_enc, atol=1e-5)
    d = rng.normal(size=(8, 5))
    cos = weighted_mean_scores(m, directions=d, centre=y.mean(0))
    c = m - y.mean(0)
    want = (c / np.linalg.norm(c, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cos, want, atol=1e-5)
    with pytest.raises(BadValueError):
        weighted_mean_scores(m)


def test_projection_encoder_projects_on_unit_directions():
    rng = np.random.default_rng(3)
    d, x, c = rng.normal(size=(4, 6)), rng.normal(size=(3, 6)), rng.normal(size=6)
    got = ProjectionEncoder(d, c).encode(x)
    np.testing.assert_allclose(got, (x - c) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T, atol=1e-5)


def _random_topk(rng, d, n, k):
    return AtlasEncoder(rng.normal(size=(d, n)).astype(np.float32), rng.normal(size=n).astype(np.float32) * 0.1, k=k)


@pytest.mark.parametrize("sparse", [False, True])
def test_firing_correlation_is_the_phi_coefficient_of_the_contingency_table(sparse):
    """``binary`` matching correlates whether latents fire: streamed over batches, it equals the
    phi coefficient (n11 n00 - n10 n01) / sqrt(n1. n0. n.1 n.0) counted by hand."""
    rng = np.random.default_rng(11)
    ax, ay = _codes(rng, 300, 9, 3), _codes(rng, 300, 7, 2)
    st = CoactivationStats(9, 7, sparse=sparse)
    for lo in range(0, 300, 70):
        st.update(binary_codes(sp.csr_matrix(ax[lo:lo + 70])), binary_codes(ay[lo:lo + 70]))
    fx, fy = ax > 0, ay > 0
    want = np.zeros((9, 7))
    for i in range(9):
        for j in range(7):
            n11 = np.sum(fx[:, i] & fy[:, j])
            n10 = np.sum(fx[:, i] & ~fy[:, j])
            n01 = np.sum(~fx[:, i] & fy[:, j])
            n00 = np.sum(~fx[:, i] & ~fy[:, j])
            want[i, j] = (n11 * n00 - n10 * n01) / np.sqrt(float((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)))
    np.testing.assert_allclose(st.correlation(), want, atol=1e-9)
    assert sp.issparse(binary_codes(sp.csr_matrix(ax))) and set(np.unique(binary_codes(ax))) == {0.0, 1.0}


def test_runs_recorded_before_firing_matching_read_code_values():
    from engine.labelling.matching import DEFAULT_BINARY, MatchSpec

    old = MatchSpec(corpus="/c.txt", corpus_sha256="0" * 64, pairing="span")  # a run's params from before
    assert old.binary is False and old.pool is None and DEFAULT_BINARY is True


@pytest.mark.slow
@pytest.mark.parametrize("key,pairing", [("subject_a", "token"), ("subject_b", "span")])
def test_one_pass_over_a_world_is_the_brute_force_correlation(tiny_world, key, pairing):
    """Real models, real pairing (token for A, span across tokenizers for B): the streamed
    statistics equal Pearson on the paired, encoded activations collected whole."""
    from engine.align.pairing import PairingConfig, iter_pairs
    from engine.models.hooks import Site

    rng = np.random.default_rng(4)
    sub, fnd = tiny_world.model(key).load(), tiny_world.foundation.load()
    texts = [t for t, _ in tiny_world.train_docs[:24]]
    Ls, Lf = tiny_world.model(key).default_layer, tiny_world.foundation.atlas_layer
    enc_x = _random_topk(rng, sub[0].config.hidden_size, 20, 3)
    enc_y = _random_topk(rng, fnd[0].config.hidden_size, 16, 3)
    got = accumulate_coactivation(sub, fnd, texts, (Site((Ls,)), Site((Lf,))), (enc_x, enc_y),
                                  PairingConfig((pairing,), batch_size=5), quiet=True)
    chunks = list(iter_pairs(sub, fnd, texts, Site((Ls,)), Site((Lf,)), pairing=pairing, batch_size=24, desc=None))
    x = np.concatenate([c.x[Ls].float().numpy() for c in chunks])
    y = np.concatenate([c.y.float().numpy() for c in chunks])
    ax, ay = enc_x.encode(x), enc_y.encode(y)
    assert got.n_pairs == got.stats.n == len(x) > 100
    np.testing.assert_allclose(got.stats.correlation(), _pearson(ax, ay), atol=2e-5)
    w = ax.astype(np.float64)
    want_means = (w.T @ y) / np.where(w.sum(0) > 0, w.sum(0), 1)[:, None]
    np.testing.assert_allclose(got.means.means(), want_means, rtol=1e-4, atol=1e-4)


def test_atlas_side_of_the_correlation_table_is_the_column_formula():
    from engine.labelling.criteria import rerank, top_k

    rng = np.random.default_rng(5)
    ax, ay = _codes(rng, 400, 30, 4), _codes(rng, 400, 11, 3)
    st = CoactivationStats(30, 11)
    st.update(ax, ay)
    C = _pearson(ax, ay)
    stat = st.atlas_side(k=4, beta=5.0, block=7)
    np.testing.assert_allclose(stat.r_atlas, np.sort(C, 0)[-4:].mean(0), atol=1e-6)
    np.testing.assert_allclose(stat.best, C.max(0), atol=1e-6)
    np.testing.assert_allclose(stat.log_z, np.log(np.exp(5.0 * C).sum(0)), rtol=1e-9)
    # csls over the correlations, re-ranking every candidate, is the full formula
    cs, ci = top_k(C, 11)
    r_s = np.sort(C, 1)[:, -4:].mean(1)
    want = 2 * C - r_s[:, None] - stat.r_atlas[None, :]
    np.testing.assert_array_equal(rerank(cs, ci, "csls", stat, 3)[1], np.argsort(-want, 1, kind="stable")[:, :3])


def test_top_matches_over_some_columns_is_the_masked_table():
    """A labelled-only run's ranking: the correlation table's columns ``cols`` only, ids the atlas's."""
    from engine.labelling.criteria import AtlasStat

    rng = np.random.default_rng(6)
    ax, ay = _codes(rng, 300, 14, 3), _codes(rng, 300, 10, 2)
    st = CoactivationStats(14, 10)
    st.update(binary_codes(ax), binary_codes(ay))
    C = st.correlation()  # the phi coefficients (== _pearson of the indicators; ties ranked as the run does)
    np.testing.assert_allclose(C, _pearson(ax > 0, ay > 0), atol=1e-10)
    cols = np.array([1, 2, 4, 7, 8])
    masked = np.where(np.isin(np.arange(10), cols), C, -np.inf)
    want = np.argsort(-masked, axis=1, kind="stable")[:, :3]
    s, ids = st.top_matches(3, block=4, columns=cols)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(s, np.take_along_axis(C, want, 1), atol=1e-6)
    assert set(ids.ravel()) <= set(cols.tolist())
    np.testing.assert_array_equal(st.top_matches(3, lo=3, hi=9, columns=cols)[1], ids[3:9])
    # a statistic of those columns, scattered onto all ten: theirs in place, the others inert
    sub = AtlasStat(4, 5.0, np.arange(5, dtype=np.float32), np.arange(5.0), 14, np.ones(5, np.float32))
    full = sub.scattered(cols, 10)
    np.testing.assert_array_equal(full.r_atlas[cols], sub.r_atlas)
    np.testing.assert_array_equal(full.log_z[cols], sub.log_z)
    rest = np.setdiff1d(np.arange(10), cols)
    assert not full.r_atlas[rest].any() and np.isfinite(full.log_z).all() and np.isinf(full.best[rest]).all()
