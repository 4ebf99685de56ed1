"""A calibrated confidence for every label, and how to measure calibration (issue 25).

A label row has a first hit; how far to believe it is read from four numbers of that row
(`label_signals`):

- ``score``: the first hit's score (a cosine, a correlation, ...);
- ``margin``: the first hit's score minus the second's;
- ``csls_gap``: the same margin under CSLS (hub-corrected), 0 where no CSLS scores are given;
- ``mutual``: 1 when the first hit's best query is this feature (mutual nearest neighbour).

`fit_confidence` fits a logistic regression (L2-regularised, Newton's method: deterministic, no
dependency) of "the first hit is right" on the standardised signals, from labelled latents of a
world held out from the evaluation; the fitted `ConfidenceModel` is a few numbers, stored as JSON,
and `ConfidenceModel.predict` gives each row its probability. `expected_calibration_error` and
`precision_coverage` measure the result: ECE over equal-width probability bins, and the precision
of the rows kept at each confidence threshold against the share kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BadValueError, ShapeError

SIGNALS: tuple[str, ...] = ("score", "margin", "csls_gap", "mutual")
NO_MATCH = "no match"  # what a row shows when its confidence is below --min-confidence


def label_signals(scores: np.ndarray, ids: np.ndarray, *, csls_scores: np.ndarray | None = None,
                  mutual: np.ndarray | None = None) -> np.ndarray:
    """The signals of each row, ``(n, 4)`` float64 in `SIGNALS` order, from its ranked hits:
    ``scores`` / ``ids`` (n, k ≥ 2) descending (id -1: no hit; its score counts as the first's,
    margin 0), ``csls_scores`` (n, k ≥ 2) the CSLS scores of the CSLS ranking's hits (descending),
    ``mutual`` (n,) booleans."""
    s = np.asarray(scores, dtype=np.float64)
    i = np.asarray(ids)
    if s.ndim != 2 or s.shape[1] < 2 or s.shape != i.shape:
        raise ShapeError(f"signals need (n, k >= 2) scores and ids of one shape, got {s.shape} and {i.shape}")
    n = len(s)
    first = np.where(i[:, 0] >= 0, s[:, 0], 0.0)
    second = np.where(i[:, 1] >= 0, s[:, 1], first)
    out = np.zeros((n, len(SIGNALS)))
    out[:, 0] = first
    out[:, 1] = first - second
    if csls_scores is not None:
        c = np.asarray(csls_scores, dtype=np.float64)
        if c.shape[0] != n or c.shape[1] < 2:
            raise ShapeError(f"csls_scores must be (n={n}, k >= 2), got {c.shape}")
        out[:, 2] = np.nan_to_num(c[:, 0] - c[:, 1], nan=0.0)
    if mutual is not None:
        out[:, 3] = np.asarray(mutual, dtype=np.float64).reshape(n)
    return out


def mutual_nearest(first_ids: np.ndarray, first_scores: np.ndarray, best_per_atlas: np.ndarray,
                   tol: float = 1e-6) -> np.ndarray:
    """Whether each row's first hit has this row as its own best query: its score reaches the
    best score any query got for that atlas concept (``best_per_atlas``, e.g. the first column of
    `engine.labelling.criteria.AtlasSideStats.top`)."""
    ids = np.asarray(first_ids)
    ok = ids >= 0
    best = np.asarray(best_per_atlas, dtype=np.float64)[np.where(ok, ids, 0)]
    return ok & (np.asarray(first_scores, dtype=np.float64) >= best - tol)


@dataclasses.dataclass(frozen=True)
class ConfidenceModel:
    """``p = σ(b + Σ w_j (s_j − μ_j) / σ_j)`` over the signals `SIGNALS`."""

    coef: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    signals: tuple[str, ...] = SIGNALS
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # what it was fitted on (method, criterion, world)

    def predict(self, signals: np.ndarray) -> np.ndarray:
        """Probabilities (n,) that each row's first hit is right."""
        x = np.asarray(signals, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.signals):
            raise ShapeError(f"confidence needs (n, {len(self.signals)}) signals, got {x.shape}")
        z = self.intercept + ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef)
        return _sigmoid(z)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConfidenceModel:
        d = json.loads(text)
        return cls(tuple(d["coef"]), float(d["intercept"]), tuple(d["mean"]), tuple(d["scale"]),
                   tuple(d["signals"]), d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ConfidenceModel:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def fit_confidence(signals: np.ndarray, correct: np.ndarray, *, l2: float = 1.0, iterations: int = 50,
                   meta: dict[str, Any] | None = None) -> ConfidenceModel:
    """Logistic regression of ``correct`` (n,) on ``signals`` (n, 4), standardised, with an L2
    penalty ``l2`` on the weights (not the intercept); Newton's method to convergence."""
    x = np.asarray(signals, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ShapeError(f"fit needs (n, d) signals and (n,) outcomes, got {x.shape} and {y.shape}")
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[0] = 0.0
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return ConfidenceModel(tuple(float(v) for v in w[1:]), float(w[0]), tuple(float(v) for v in mu),
                           tuple(float(v) for v in sd), SIGNALS[: x.shape[1]] if x.shape[1] <= len(SIGNALS)
                           else tuple(f"s{j}" for j in range(x.shape[1])), dict(meta or {}))


def expected_calibration_error(prob: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE: Σ_bins (n_b / n) · |mean(correct) − mean(prob)| over ``n_bins`` equal-width bins of
    [0, 1] (a probability of exactly 1 falls in the last bin)."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(p) != len(c):
        raise ShapeError(f"prob and correct differ in length: {len(p)} and {len(c)}")
    if not len(p):
        return 0.0
    if n_bins < 1:
        raise BadValueError(f"n_bins must be >= 1, got {n_bins}")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for j in range(n_bins):
        m = b == j
        if m.any():
            total += m.sum() / len(p) * abs(c[m].mean() - p[m].mean())
    return float(total)


def precision_coverage(prob: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeping the rows of confidence ≥ t, for each distinct t (descending): ``(coverage,
    precision, thresholds)``, coverage the share of rows kept and precision the share of kept rows
    that are right."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    order = np.argsort(-p, kind="stable")
    ps, cs = p[order], c[order]
    last = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1]  # the last row of each run of equal confidences
    kept = last + 1
    return kept / len(p), np.cumsum(cs)[last] / kept, ps[last]


def precision_at_coverage(prob: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Precision of the most confident rows that make up at least ``coverage`` of all rows."""
    cov, prec, _ = precision_coverage(prob, correct)
    if not len(cov):
        return float("nan")
    j = int(np.searchsorted(cov, coverage - 1e-12, side="left"))
    return float(prec[min(j, len(prec) - 1)])


def threshold_rows(prob: np.ndarray, min_confidence: float) -> np.ndarray:
    """Which rows pass ``--min-confidence`` (the others show `NO_MATCH`)."""
    if not 0.0 <= min_confidence <= 1.0:
        raise BadValueError(f"--min-confidence must lie in [0, 1], got {min_confidence}")
    return np.asarray(prob) >= min_confidence
