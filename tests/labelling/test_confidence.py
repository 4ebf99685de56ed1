"""Label confidence (engine.labelling.confidence) against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import BadValueError, ShapeError
from engine.labelling.confidence import (
    SIGNALS,
    ConfidenceModel,
    expected_calibration_error,
    fit_confidence,
    label_signals,
    mutual_nearest,
    precision_at_coverage,
    precision_coverage,
    threshold_rows,
)


def test_signals_of_ranked_hits():
    scores = np.array([[0.9, 0.5, 0.1], [0.4, 0.4, 0.3], [0.7, np.nan, np.nan]])
    ids = np.array([[3, 1, 0], [2, 5, 1], [4, -1, -1]])
    csls = np.array([[0.6, 0.1, 0.0], [0.2, 0.3, 0.0], [0.5, np.nan, np.nan]])
    got = label_signals(scores, ids, csls_scores=csls, mutual=[True, False, True])
    np.testing.assert_allclose(got, [[0.9, 0.4, 0.5, 1], [0.4, 0.0, -0.1, 0], [0.7, 0.0, 0.0, 1]])
    assert got.shape[1] == len(SIGNALS)
    with pytest.raises(ShapeError):
        label_signals(scores[:, :1], ids[:, :1])


def test_mutual_nearest_from_the_best_score_per_atlas_concept():
    q = np.random.default_rng(0).normal(size=(30, 5))
    a = np.random.default_rng(1).normal(size=(12, 5))
    sims = q @ a.T
    first = sims.argmax(1)
    want = sims.argmax(0)[first] == np.arange(30)
    got = mutual_nearest(first, sims.max(1), sims.max(0))
    np.testing.assert_array_equal(got, want)
    assert not mutual_nearest(np.array([-1]), np.array([1.0]), sims.max(0))[0]


def _brute_ece(p, c, bins):
    total = 0.0
    for j in range(bins):
        lo, hi = j / bins, (j + 1) / bins
        m = [(pi >= lo and (pi < hi or (j == bins - 1 and pi <= hi))) for pi in p]
        m = np.array(m)
        if m.any():
            total += m.mean() * abs(np.mean(c[m]) - np.mean(p[m]))
    return total


def test_ece_is_the_binned_definition():
    rng = np.random.default_rng(2)
    p = np.r_[rng.random(500), 1.0, 0.0]
    c = (rng.random(502) < p ** 2).astype(float)
    for bins in (1, 5, 10, 15):
        assert expected_calibration_error(p, c, bins) == pytest.approx(_brute_ece(p, c, bins), abs=1e-12)
    assert expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])) == pytest.approx(0.0)
    with pytest.raises(BadValueError):
        expected_calibration_error(p, c, 0)


def test_precision_coverage_is_the_kept_rows_precision():
    rng = np.random.default_rng(3)
    p = np.round(rng.random(200), 2)  # ties
    c = (rng.random(200) < p).astype(float)
    cov, prec, thr = precision_coverage(p, c)
    for t, cv, pr in zip(thr, cov, prec, strict=True):
        keep = p >= t
        assert cv == pytest.approx(keep.mean())
        assert pr == pytest.approx(c[keep].mean())
    assert cov[-1] == 1.0 and np.all(np.diff(thr) < 0)
    at = precision_at_coverage(p, c, 0.5)
    j = np.nonzero(cov >= 0.5)[0][0]
    assert at == pytest.approx(prec[j])
    np.testing.assert_array_equal(threshold_rows(p, 0.5), p >= 0.5)
    with pytest.raises(BadValueError):
        threshold_rows(p, 1.5)


def test_logistic_fit_recovers_a_known_model_and_calibrates(tmp_path):
    rng = np.random.default_rng(4)
    n = 4000
    x = np.c_[rng.normal(0.5, 0.2, n), rng.exponential(0.1, n), rng.normal(0, 0.1, n), rng.random(n) < 0.3]
    z = -1 + 4 * (x[:, 0] - 0.5) / 0.2 + 2 * x[:, 3]
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    model = fit_confidence(x, y, l2=1e-6, meta={"method": "test"})
    prob = model.predict(x)
    assert expected_calibration_error(prob, y) < 0.03
    # the weight on the first standardised signal is about 4 * sd / 0.2
    assert model.coef[0] == pytest.approx(4 * np.std(x[:, 0]) / 0.2, rel=0.15)
    assert abs(model.coef[2]) < 0.15  # a signal with no effect gets about none
    # the fitted model maximises the likelihood: nudging it lowers the likelihood
    def nll(m):
        p = np.clip(m.predict(x), 1e-12, 1 - 1e-12)
        return -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    for j in range(4):
        bumped = list(model.coef)
        bumped[j] += 0.05
        assert nll(model) < nll(ConfidenceModel(tuple(bumped), model.intercept, model.mean, model.scale))
    model.save(tmp_path / "conf.json")
    back = ConfidenceModel.load(tmp_path / "conf.json")
    np.testing.assert_array_equal(back.predict(x), prob)
    assert back.meta == {"method": "test"}
