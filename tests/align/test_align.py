"""Sufficient statistics, the alignment methods, and AlignmentMap (docs/design.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from engine.align.fit import CorpusTooSmallError, fit_map
from engine.align.map import AlignmentMap, MapSites
from engine.align.methods import METHODS, heldout_sse, register_method
from engine.align.stats import SufficientStats
from engine.errors import SiteMismatchError


def _stream(stats: SufficientStats, X: np.ndarray, Y: np.ndarray, step: int) -> SufficientStats:
    for i in range(0, len(X), step):
        stats.update(X[i : i + step], Y[i : i + step])
    return stats


def _rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _pairs(n=4000, dx=24, dy=24, noise=0.0, seed=0, offset=50.0):
    """X with a large common offset and unequal spreads; Y = 2·(X − x̄)R + 3 (+ noise)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx)) * rng.uniform(0.5, 3.0, size=dx) + offset
    R = _rotation(max(dx, dy), seed + 1)[:dx, :dy]
    Y = 2.0 * (X - X.mean(0)) @ R + 3.0 + noise * rng.normal(size=(n, dy))
    return X.astype(np.float32), Y.astype(np.float32), R


SITES = MapSites("subj", 2, "atl", "found", 1)


def test_streaming_statistics_match_the_batch_formulas():
    X, Y, _ = _pairs(n=3000, dx=20, dy=12)
    st = _stream(SufficientStats(20, 12, chunk_rows=700), X, Y, step=333)  # chunks straddle the buffer
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
    assert st.count == 3000
    np.testing.assert_allclose(st.mean_x, X64.mean(0), rtol=0, atol=1e-6)  # float32 data: spread ~1, offset 50
    for got, ref in ((st.cxx, Xc.T @ Xc), (st.cxy, Xc.T @ Yc), (st.cyy, Yc.T @ Yc)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(st.mean_norm_x, np.linalg.norm(X64, axis=1).mean(), rtol=1e-6)
    # merging two halves is the same as one pass
    a = _stream(SufficientStats(20, 12), X[:1234], Y[:1234], 500)
    a.merge(_stream(SufficientStats(20, 12), X[1234:], Y[1234:], 500))
    np.testing.assert_allclose(a.cxy, st.cxy, rtol=0, atol=1e-6 * np.abs(st.cxy).max())


def test_a_huge_mean_costs_no_digits_even_when_the_first_rows_are_few():
    # the rows are shifted by the first rows' mean (here one row, far from the mean at the spread's
    # scale) and the float32 products see only the spread, never the offset of 1e4
    X, Y, _ = _pairs(n=3000, dx=20, dy=12, offset=1e4)
    st = SufficientStats(20, 12, chunk_rows=512)
    st.update(X[:1], Y[:1])
    _stream(st, X[1:], Y[1:], step=700)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
    for got, ref in ((st.cxx, Xc.T @ Xc), (st.cxy, Xc.T @ Yc), (st.cyy, Yc.T @ Yc)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(st.mean_x, X64.mean(0), rtol=1e-9)
    # merged into an empty accumulator, and the other way round: the same statistics
    empty = SufficientStats(20, 12)
    empty.merge(st)
    np.testing.assert_allclose(empty.cxy, st.cxy, rtol=0, atol=1e-9 * np.abs(st.cxy).max())
    np.testing.assert_allclose(empty.mean_y, st.mean_y, rtol=1e-12)


def test_float64_gemm_is_exact_to_double_precision():
    X, Y, _ = _pairs(n=2000, dx=16, dy=16)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    st = _stream(SufficientStats(16, 16, gemm_dtype=torch.float64), X64, Y64, 300)
    Xc, Yc = X64 - X64.mean(0), Y64 - Y64.mean(0)
    np.testing.assert_allclose(st.cxy, Xc.T @ Yc, rtol=0, atol=1e-11 * np.abs(Xc.T @ Yc).max())


def test_procrustes_recovers_a_known_rotation_and_matches_scipy():
    X, Y, R = _pairs(n=5000, dx=32, dy=32)
    st = _stream(SufficientStats(32, 32), X, Y, 1000)
    amap = fit_map(st, "procrustes", sites=SITES)
    W = amap.weight / amap.params["scale_forward"]
    assert np.abs(W - R).max() < 1e-6
    assert amap.params["scale_forward"] == pytest.approx(2.0, rel=1e-6)
    X64 = X.astype(np.float64)
    ref, _ = scipy.linalg.orthogonal_procrustes(X64 - X64.mean(0), Y - Y.astype(np.float64).mean(0))
    assert np.abs(W - ref).max() < 1e-6
    np.testing.assert_allclose(amap.inverse_weight, W.T / 2.0, atol=1e-6)


@pytest.mark.parametrize("dx,dy", [(40, 24), (24, 40)])
def test_procrustes_is_semi_orthogonal_when_widths_differ(dx, dy):
    X, Y, R = _pairs(n=3000, dx=dx, dy=dy, noise=0.01)
    amap = fit_map(_stream(SufficientStats(dx, dy), X, Y, 1000), "procrustes", scale=False)
    W = amap.weight
    k = min(dx, dy)
    gram = W.T @ W if dx > dy else W @ W.T
    np.testing.assert_allclose(gram, np.eye(k), atol=1e-6)
    assert (amap.d_subject, amap.d_atlas) == (dx, dy)


def _perm_pairs(n, d, seed, noise=0.05):
    """A signed permutation with a scale: the map every registered method can represent."""
    rng = np.random.default_rng(seed)
    P = np.zeros((d, d))
    P[np.arange(d), rng.permutation(d)] = rng.choice([-1.0, 1.0], size=d)
    X = rng.normal(size=(n, d)) * 2.0 + 5.0
    Y = 1.5 * X @ P - 1.0 + noise * rng.normal(size=(n, d))
    return X, Y, P


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_recovers_a_signed_permutation(method):
    X, Y, P = _perm_pairs(6000, 16, seed=3)
    train = _stream(SufficientStats(16, 16, sample_size=2000), X[:5000], Y[:5000], 1000)
    held = _stream(SufficientStats(16, 16, sample_size=500), X[5000:], Y[5000:], 1000)
    # self-learning also reads the two feature dictionaries: here the units and their partners
    extra = {"self_learning": {"subject_vectors": np.eye(16), "atlas_vectors": P}}.get(method, {})
    amap = fit_map(train, method, heldout=held, sites=SITES, pairing="token", corpus_fingerprint="abc", **extra)
    assert amap.metrics["heldout_r2"] > 0.99
    assert amap.metrics["heldout_r2_inverse"] > 0.99
    assert amap.metrics["heldout_cosine"] > 0.99
    assert amap.metrics["n_cosine_sample"] == 500
    assert amap.metrics["subject_resid_norm"] == pytest.approx(np.linalg.norm(X[:5000], axis=1).mean(), rel=1e-5)
    # each subject unit direction maps onto its (signed) partner unit, and back
    u = amap.map_directions(np.eye(16))
    np.testing.assert_allclose(u, P, atol=0.02)
    np.testing.assert_allclose(amap.inverse_directions(np.eye(16)), P.T, atol=0.02)
    assert (amap.subject_model, amap.atlas, amap.n_pairs, amap.pairing) == ("subj", "atl", 5000, "token")


def test_heldout_error_from_statistics_equals_the_direct_sum():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(500, 8)) + 2, rng.normal(size=(500, 6)) - 1
    h = _stream(SufficientStats(8, 6), X, Y, 100)
    A, mx, my = rng.normal(size=(8, 6)), rng.normal(size=8), rng.normal(size=6)
    direct = np.sum(((Y - my) - (X - mx) @ A) ** 2)
    assert heldout_sse(A, mx, my, h) == pytest.approx(direct, rel=1e-5)


def test_ridge_chooses_lambda_on_heldout_pairs():
    rng = np.random.default_rng(1)
    d, n = 40, 300  # few, noisy pairs: some shrinkage must help
    W = rng.normal(size=(d, d)) / np.sqrt(d)
    X = rng.normal(size=(n + 300, d))
    Y = X @ W + 2.0 * rng.normal(size=(n + 300, d))
    train = _stream(SufficientStats(d, d), X[:n], Y[:n], 100)
    held = _stream(SufficientStats(d, d), X[n:], Y[n:], 100)
    chosen = fit_map(train, "ridge", heldout=held)
    assert chosen.params["lam"] > 0
    for lam in (1e-8, 1e6):
        fixed = fit_map(train, "ridge", heldout=held, lam=lam, lam_inverse=lam)
        assert chosen.metrics["heldout_r2"] >= fixed.metrics["heldout_r2"] - 1e-9
    with pytest.raises(ValueError, match="held-out"):
        fit_map(train, "ridge")


def test_too_few_pairs_for_the_dimension_is_a_clear_error():
    X, Y, _ = _pairs(n=20, dx=24, dy=24)
    with pytest.raises(CorpusTooSmallError, match="at least as many pairs"):
        fit_map(_stream(SufficientStats(24, 24), X, Y, 10), "procrustes")


def test_the_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_method("procrustes", "again")(lambda *a, **k: None)
    X, Y, _ = _pairs(n=100, dx=4, dy=4)
    with pytest.raises(ValueError, match="unknown alignment method"):
        fit_map(_stream(SufficientStats(4, 4), X, Y, 50), "nope")


@pytest.fixture
def amap() -> AlignmentMap:
    X, Y, _ = _pairs(n=3000, dx=24, dy=16, noise=0.01)
    held = _stream(SufficientStats(24, 16, sample_size=100), X[:500] + 0.001, Y[:500], 250)
    return fit_map(_stream(SufficientStats(24, 16), X, Y, 1000), "procrustes", heldout=held, sites=SITES)


def test_map_application_numpy_and_torch_agree_and_round_trip(amap):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(7, 24)) + 50).astype(np.float32)
    y_np = amap.map_activations(x)
    y_t = amap.map_activations(torch.from_numpy(x))
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch.float32
    np.testing.assert_allclose(y_np, y_t.numpy(), rtol=1e-4, atol=1e-3)
    # Procrustes's inverse is Wᵀ with its own least-squares scale; unscaled, forward ∘ inverse = id
    s, s_inv = amap.params["scale_forward"], amap.params["scale_inverse"]
    np.testing.assert_allclose(amap.inverse_weight @ amap.weight, s * s_inv * np.eye(16), atol=1e-6)
    d = amap.map_directions(torch.randn(3, 24, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(d, dim=-1), torch.ones(3, dtype=torch.float64))
    u = amap.inverse_directions(rng.normal(size=(2, 16)))
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-6)
    assert np.all(amap.map_directions(np.zeros((1, 24))) == 0)


def test_a_map_refuses_another_site(amap):
    amap.check_site("subj", 2, 24)
    with pytest.raises(SiteMismatchError, match="layer 3"):
        amap.check_site("subj", 3, 24)
    with pytest.raises(SiteMismatchError, match="other-model"):
        amap.check_site("other-model", 2, 24)
    with pytest.raises(SiteMismatchError, match="width 32"):
        amap.check_site("subj", 2, 32)
    with pytest.raises(SiteMismatchError, match="width 32"):
        amap.map_activations(np.zeros((2, 32)))
    with pytest.raises(SiteMismatchError):
        amap.inverse_directions(np.zeros((2, 24)))
    with pytest.raises(SiteMismatchError):
        amap.check_atlas("another-atlas")


def test_bytes_round_trip_keeps_tensors_and_provenance(amap):
    back = AlignmentMap.from_bytes(amap.to_bytes())
    np.testing.assert_allclose(back.weight, amap.weight, rtol=1e-6, atol=1e-7)
    assert back.provenance().keys() == amap.provenance().keys()
    assert (back.subject_model, back.subject_layer, back.atlas_layer, back.method) == ("subj", 2, 1, "procrustes")
    assert back.metrics["heldout_r2"] == pytest.approx(amap.metrics["heldout_r2"])


def test_normalised_fit_maps_unit_rows_to_the_atlas_scale():
    X, Y, _ = _pairs(n=3000, dx=16, dy=16, offset=0.0)
    st = _stream(SufficientStats(16, 16, normalize=True), X, Y, 1000)
    amap = fit_map(st, "procrustes")
    assert amap.normalize
    out = amap.map_activations(X[:200])
    # scale of the output is the atlas's typical norm (not the subject's)
    assert np.linalg.norm(out, axis=1).mean() == pytest.approx(np.linalg.norm(Y, axis=1).mean(), rel=0.2)


def test_the_method_registry_builds_each_methods_parameters_from_the_users_settings():
    from engine.align.methods import MethodOptions
    from engine.align.request import AlignRequest
    from engine.errors import BadValueError

    def params(method: str, **kw) -> dict:
        return AlignRequest("s", "a", ["t"], method=method, options=MethodOptions(**kw)).method_params()

    assert params("procrustes") == {} and params("procrustes", scale=False) == {"scale": False}
    assert params("procrustes", lam=0.5) == {}  # λ is ridge's
    assert params("ridge") == {} and params("ridge", lam=0.5, scale=False) == {"lam": 0.5}
    assert params("correlation", scale=False, lam=0.5) == {}
    explicit = AlignRequest("s", "a", ["t"], method="ridge", options=MethodOptions(lam=0.5), params={"lam": 2.0})
    assert explicit.method_params() == {"lam": 2.0}  # parameters in the method's own terms win
    with pytest.raises(BadValueError, match="unknown alignment method 'nope'"):
        AlignRequest("s", "a", ["t"], method="nope").method_params()
