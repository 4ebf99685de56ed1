"""Alignment methods: a registry of fits from sufficient statistics to an affine map.

Each method takes the training statistics (and held-out statistics, for choosing a
hyper-parameter such as ridge's λ) and returns a `LinearFit`: the forward linear part ``A``
(d_subject, d_atlas), the inverse linear part ``B`` (d_atlas, d_subject) and the two means, so that
x ↦ (x − μx)A + μy and y ↦ (y − μy)B + μx (docs/design.md §5). A new method is one function and one
``@register_method`` line; the tests parametrise over `METHODS`. A method also says which of the
settings a user gives (`MethodOptions`: ``atlas align --no-scale``, ``--lam``) become its parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from engine.align.stats import SufficientStats
from engine.errors import BadValueError
from engine.registry import Registry


@dataclass
class LinearFit:
    """An affine map fitted both ways: ``A`` (d_x, d_y) forward, ``B`` (d_y, d_x) inverse."""

    A: np.ndarray
    B: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)  # hyper-parameters as used / chosen


FitFn = Callable[..., LinearFit]


@dataclass(frozen=True)
class MethodOptions:
    """The method settings the command line offers; each method reads the ones it has (`AlignMethod.params`)."""

    scale: bool = True  # procrustes: fit the global scale (``--no-scale``: False)
    lam: float | None = None  # ridge: λ (None: chosen on held-out pairs)


def _no_params(_options: MethodOptions) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class AlignMethod:
    name: str
    fit: FitFn
    description: str
    needs_heldout: bool = False
    # the method's parameters from the user's settings (only those that differ from its defaults)
    params: Callable[[MethodOptions], dict[str, Any]] = _no_params


METHODS: Registry[AlignMethod] = Registry("alignment method")


def register_method(name: str, description: str, needs_heldout: bool = False,
                    params: Callable[[MethodOptions], dict[str, Any]] = _no_params) -> Callable[[FitFn], FitFn]:
    """Register ``fn(train, heldout, **params) -> LinearFit`` under ``name`` (once); ``params`` turns
    the user's `MethodOptions` into the method's keyword parameters."""

    def deco(fn: FitFn) -> FitFn:
        METHODS.add(name, AlignMethod(name, fn, description, needs_heldout, params))
        return fn

    return deco


def get_method(name: str) -> AlignMethod:
    return METHODS.lookup(name)


# ----------------------------------------------------------------------------- held-out error


def heldout_sse(A: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray, h: SufficientStats) -> float:
    """Σ‖(y − μy) − (x − μx)A‖² over the pairs counted in ``h``, from its statistics alone.

    With a = x̄ₕ − μx and b = ȳₕ − μy the error splits into the centred part
    tr(Cyy) − 2tr(AᵀCxy) + tr(AᵀCxxA) and the offset part nₕ‖b − aA‖².
    """
    a, b = h.mean_x - mean_x, h.mean_y - mean_y
    centred = np.trace(h.cyy) - 2.0 * np.sum(A * h.cxy) + np.sum((h.cxx @ A) * A)
    return float(centred + h.n * np.sum((b - a @ A) ** 2))


def heldout_r2(fit: LinearFit, h: SufficientStats, inverse: bool = False) -> float:
    """1 − SSE / SST on held-out pairs (SST around the held-out mean), forward or inverse."""
    if inverse:
        h = h.transposed()
        sse = heldout_sse(fit.B, fit.mean_y, fit.mean_x, h)
    else:
        sse = heldout_sse(fit.A, fit.mean_x, fit.mean_y, h)
    sst = float(np.trace(h.cyy))
    return 1.0 - sse / sst if sst > 0 else float("nan")


# ----------------------------------------------------------------------------- methods


@register_method("procrustes", "centre, SVD of XᵀY = UΣVᵀ, W = UVᵀ (semi-orthogonal), optional global scale",
                 params=lambda o: {} if o.scale else {"scale": False})
def fit_procrustes(train: SufficientStats, heldout: SufficientStats | None = None, *, scale: bool = True,
                   **_: Any) -> LinearFit:
    """Orthogonal (semi-orthogonal when dims differ) W minimising ‖Xc·W − Yc‖; inverse Wᵀ.

    With ``scale`` the forward map is s·W with the least-squares s = tr Σ / tr(XcᵀXc), and the
    inverse Wᵀ·s' with s' = tr Σ / tr(YcᵀYc).
    """
    U, S, Vt = np.linalg.svd(train.cxy, full_matrices=False)  # (d_x, k), (k,), (k, d_y)
    W = U @ Vt  # (d_x, d_y)
    s_fwd = float(S.sum() / np.trace(train.cxx)) if scale else 1.0
    s_inv = float(S.sum() / np.trace(train.cyy)) if scale else 1.0
    return LinearFit(
        A=s_fwd * W, B=s_inv * W.T, mean_x=train.mean_x.copy(), mean_y=train.mean_y.copy(),
        params={"scale": scale, "scale_forward": s_fwd, "scale_inverse": s_inv, "normalize": train.normalize},
    )


# λ grid, relative to the mean eigenvalue of XcᵀXc (scale-free across models and corpora).
RIDGE_ALPHAS: tuple[float, ...] = tuple(10.0 ** e for e in np.arange(-6.0, 3.5, 0.5))


def _ridge_one_way(train: SufficientStats, heldout: SufficientStats | None, lam: float | None,
                   alphas: tuple[float, ...]) -> tuple[np.ndarray, float, dict[str, float]]:
    evals, Q = np.linalg.eigh(train.cxx)  # Cxx = Q diag(evals) Qᵀ
    evals = np.clip(evals, 0.0, None)
    QtC = Q.T @ train.cxy  # (d_x, d_y)
    unit = float(evals.mean()) or 1.0
    if lam is None:
        if heldout is None or heldout.count == 0:
            raise BadValueError("ridge needs held-out pairs to choose λ (or pass lam=...)")
        a = heldout.mean_x - train.mean_x
        b = heldout.mean_y - train.mean_y
        G = Q.T @ (heldout.cxx + heldout.n * np.outer(a, a)) @ Q  # held-out XᵀX about the train means
        H = Q.T @ (heldout.cxy + heldout.n * np.outer(a, b))
        yy = float(np.trace(heldout.cyy) + heldout.n * b @ b)
        scores: dict[str, float] = {}
        best: tuple[float, float | None] = (np.inf, None)
        for alpha in alphas:
            M = QtC / (evals + alpha * unit)[:, None]  # W = Q M
            sse = yy - 2.0 * np.sum(M * H) + np.sum((G @ M) * M)
            scores[f"{alpha:.0e}"] = float(sse)
            if sse < best[0]:
                best = (sse, alpha)
        assert best[1] is not None, "no alpha gave a finite held-out error"
        lam = float(best[1] * unit)
    else:
        scores = {}
    W = Q @ (QtC / (evals + lam)[:, None])  # (d_x, d_y) = (XᵀX + λI)⁻¹XᵀY
    return W, float(lam), scores


@register_method("ridge", "W = (XᵀX + λI)⁻¹XᵀY, λ chosen on held-out pairs; inverse fitted the other way",
                 needs_heldout=True, params=lambda o: {} if o.lam is None else {"lam": o.lam})
def fit_ridge(train: SufficientStats, heldout: SufficientStats | None = None, *, lam: float | None = None,
              lam_inverse: float | None = None, alphas: tuple[float, ...] = RIDGE_ALPHAS, **_: Any) -> LinearFit:
    """Ridge regression both ways; each λ minimises held-out squared error over ``alphas`` × the
    mean eigenvalue of the centred XᵀX, unless given."""
    A, lam_f, _ = _ridge_one_way(train, heldout, lam, alphas)
    B, lam_b, _ = _ridge_one_way(train.transposed(), heldout.transposed() if heldout else None, lam_inverse, alphas)
    return LinearFit(A=A, B=B, mean_x=train.mean_x.copy(), mean_y=train.mean_y.copy(),
                     params={"lam": lam_f, "lam_inverse": lam_b, "normalize": train.normalize})


@register_method("correlation", "baseline: each subject unit matched to one atlas unit by |correlation|")
def fit_correlation(train: SufficientStats, heldout: SufficientStats | None = None, *,
                    matching: str = "hungarian", **_: Any) -> LinearFit:
    """Per-unit matching: unit i of x predicts its matched unit j of y by the univariate slope.

    ``hungarian``: one-to-one assignment maximising Σ|corr| (min(d_x, d_y) matches);
    ``greedy``: every unit to its best partner, each way.
    """
    sx = np.sqrt(np.clip(np.diag(train.cxx), 1e-300, None))  # (d_x,)
    sy = np.sqrt(np.clip(np.diag(train.cyy), 1e-300, None))  # (d_y,)
    C = train.cxy / np.outer(sx, sy)  # (d_x, d_y) correlations
    A = np.zeros_like(C)
    B = np.zeros_like(C.T)
    if matching == "hungarian":
        rows, cols = linear_sum_assignment(-np.abs(C))
        A[rows, cols] = C[rows, cols] * sy[cols] / sx[rows]
        B[cols, rows] = C[rows, cols] * sx[rows] / sy[cols]
    elif matching == "greedy":
        j = np.arange(C.shape[1])
        i = np.abs(C).argmax(0)  # forward: each atlas unit from its best subject unit
        A[i, j] = C[i, j] * sy[j] / sx[i]
        i2 = np.arange(C.shape[0])
        j2 = np.abs(C).argmax(1)  # inverse: each subject unit from its best atlas unit
        B[j2, i2] = C[i2, j2] * sx[i2] / sy[j2]
    else:
        raise BadValueError(f"matching must be 'hungarian' or 'greedy', got {matching!r}")
    return LinearFit(A=A, B=B, mean_x=train.mean_x.copy(), mean_y=train.mean_y.copy(),
                     params={"matching": matching, "normalize": train.normalize})
