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
    # training pairs the statistics must keep as a reservoir sample (`SufficientStats.sample`); 0: none
    train_sample: int = 0
    # keyword parameters the caller must supply (the two feature dictionaries, for self_learning)
    needs: tuple[str, ...] = ()

    def missing(self, params: dict[str, Any]) -> list[str]:
        """The parameters of `needs` that ``params`` lacks (None counts as absent)."""
        return [n for n in self.needs if params.get(n) is None]


METHODS: Registry[AlignMethod] = Registry("alignment method")


def register_method(name: str, description: str, needs_heldout: bool = False,
                    params: Callable[[MethodOptions], dict[str, Any]] = _no_params, *, train_sample: int = 0,
                    needs: tuple[str, ...] = ()) -> Callable[[FitFn], FitFn]:
    """Register ``fn(train, heldout, **params) -> LinearFit`` under ``name`` (once); ``params`` turns
    the user's `MethodOptions` into the method's keyword parameters; ``train_sample``: the training
    pairs the statistics keep for it; ``needs``: parameters only the caller can give."""

    def deco(fn: FitFn) -> FitFn:
        METHODS.add(name, AlignMethod(name, fn, description, needs_heldout, params, train_sample, needs))
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
        from scipy.optimize import linear_sum_assignment

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


# ----------------------------------------------------------------------------- methods from lexicon induction
# (issue 25: whitening and re-weighting, a map trained for retrieval, self-learning; each measured
# against Procrustes in the SAE labelling evaluation before it can become a default)


def _inv_sqrt_and_sqrt(C: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(C + εI)^{-1/2}`` and ``(C + εI)^{1/2}`` of a symmetric PSD matrix, ``ε`` relative to its
    mean eigenvalue (keeps directions the pairs barely vary in from blowing up)."""
    evals, Q = np.linalg.eigh(C)
    evals = np.clip(evals, 0.0, None)
    evals = evals + eps * (float(evals.mean()) or 1.0)
    return (Q / np.sqrt(evals)) @ Q.T, (Q * np.sqrt(evals)) @ Q.T


WHITEN_REWEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)


@register_method("whiten", "VecMap-style: whiten both sides, orthogonal map between them, re-weight by the "
                 "singular values^p, de-whiten into the atlas space; p chosen on held-out pairs", needs_heldout=True)
def fit_whiten(train: SufficientStats, heldout: SufficientStats | None = None, *, reweight: float | None = None,
               eps: float = 1e-3, reweights: tuple[float, ...] = WHITEN_REWEIGHTS, **_: Any) -> LinearFit:
    """Artetxe et al. 2018's whitening, orthogonal mapping, re-weighting and de-whitening, as one
    linear map from the subject space into the (raw) atlas space.

    With ``Wx = Cxx^{-1/2}``, ``Wy = Cyy^{-1/2}`` and ``Wxᵀ Cxy Wy = U S Vᵀ``, the map is
    ``A = Wx U diag(s^p) Vᵀ Cyy^{1/2} · c`` (``s`` the singular values over their largest, ``c``
    the least-squares scale): ``p = 0`` is Procrustes between the whitened spaces, de-whitened;
    ``p = 1`` the canonical-correlation map. ``p`` minimises held-out squared error over
    ``reweights`` unless given. The inverse is built the same way the other way round.
    """
    Wx, Sx = _inv_sqrt_and_sqrt(train.cxx, eps)
    Wy, Sy = _inv_sqrt_and_sqrt(train.cyy, eps)
    U, S, Vt = np.linalg.svd(Wx @ train.cxy @ Wy, full_matrices=False)
    s = S / max(float(S[0]), 1e-300)

    def forward(p: float) -> np.ndarray:
        A = Wx @ (U * s ** p) @ Vt @ Sy
        # least-squares scale of the whole map: argmin_c ‖Yc − c·XcA‖²
        num = float(np.sum(A * train.cxy))
        den = float(np.sum((train.cxx @ A) * A))
        return A * (num / den if den > 0 else 1.0)

    scores: dict[str, float] = {}
    if reweight is None:
        if heldout is None or heldout.count == 0:
            raise BadValueError("whiten needs held-out pairs to choose the re-weighting power (or pass reweight=...)")
        for p in reweights:
            scores[str(p)] = heldout_sse(forward(p), train.mean_x, train.mean_y, heldout)
        reweight = float(min(reweights, key=lambda p: scores[str(p)]))
    A = forward(reweight)
    B = Wy @ (Vt.T * s ** reweight) @ U.T @ Sx
    num, den = float(np.sum(B * train.cxy.T)), float(np.sum((train.cyy @ B) * B))
    B = B * (num / den if den > 0 else 1.0)
    return LinearFit(A=A, B=B, mean_x=train.mean_x.copy(), mean_y=train.mean_y.copy(),
                     params={"reweight": reweight, "eps": eps, "heldout_sse": scores, "normalize": train.normalize})


RCSLS_SAMPLE = 20000  # training pairs the statistics keep for rcsls (a uniform reservoir sample)


@register_method("rcsls", "a map trained for retrieval (Joulin et al. 2018): the RCSLS loss on a sample of "
                 "training pairs, from Procrustes, spectral norm kept <= 1 (needs the training sample)",
                 train_sample=RCSLS_SAMPLE)
def fit_rcsls(train: SufficientStats, heldout: SufficientStats | None = None, *, k: int = 10, steps: int = 100,
              lr: float = 1.0, batch: int = 1024, seed: int = 0, **_: Any) -> LinearFit:
    """Minimise RCSLS over ``W`` on unit, centred sample pairs ``(x_i, y_i)``::

        −2 cos(x_i W, y_i) + mean_k-nearest_y cos(x_i W, y) + mean_k-nearest_x cos(x W, y_i)

    (neighbours among the ``batch`` pairs of each step), by full-batch gradient steps from the
    orthogonal Procrustes solution, projecting ``W``'s singular values onto [0, 1] after each step
    (Joulin et al.'s constraint). The sample is ``train.sample()`` (statistics accumulated with
    ``sample_size``); the result is scaled like Procrustes, and the inverse is ``Wᵀ`` scaled.
    """
    import torch

    from engine.models.activations import torch_threads

    X, Y = train.sample()
    if len(X) < max(2 * k, 16):
        raise BadValueError("rcsls needs a sample of training pairs: accumulate the statistics with sample_size "
                            f"(got {len(X)} pairs)")
    U, S, Vt = np.linalg.svd(train.cxy, full_matrices=False)
    W0 = U @ Vt
    gen = torch.Generator().manual_seed(seed)
    xs = torch.from_numpy(np.asarray(X, np.float64) - train.mean_x).float()
    ys = torch.from_numpy(np.asarray(Y, np.float64) - train.mean_y).float()
    xs = torch.nn.functional.normalize(xs, dim=1)
    ys = torch.nn.functional.normalize(ys, dim=1)
    W = torch.from_numpy(W0).float().requires_grad_(True)
    kk = min(k, batch - 1)
    losses: list[float] = []
    with torch_threads(1):  # small matrices: one thread is fastest, and steady on a busy machine
        _rcsls_steps(W, xs, ys, kk, steps, batch, lr, gen, losses)
    Wn = W.detach().double().numpy()
    num, den = float(np.sum(Wn * train.cxy)), float(np.sum((train.cxx @ Wn) * Wn))
    s_fwd = num / den if den > 0 else 1.0
    num_b, den_b = float(np.sum(Wn.T * train.cxy.T)), float(np.sum((train.cyy @ Wn.T) * Wn.T))
    return LinearFit(A=s_fwd * Wn, B=(num_b / den_b if den_b > 0 else 1.0) * Wn.T, mean_x=train.mean_x.copy(),
                     mean_y=train.mean_y.copy(),
                     params={"k": k, "steps": steps, "lr": lr, "batch": batch, "seed": seed,
                             "loss_first": losses[0], "loss_last": losses[-1], "normalize": train.normalize})


def _rcsls_steps(W: Any, xs: Any, ys: Any, kk: int, steps: int, batch: int, lr: float, gen: Any,
                 losses: list[float]) -> None:
    """Gradient steps of the RCSLS loss on ``W`` (in place), singular values clipped to [0, 1]."""
    import torch

    for _step in range(steps):
        idx = torch.randperm(len(xs), generator=gen)[: min(batch, len(xs))]
        x, y = xs[idx], ys[idx]
        xw = x @ W
        sims = xw @ y.T  # (b, b)
        loss = (-2 * sims.diagonal().mean() + sims.topk(kk, dim=1).values.mean()
                + sims.topk(kk, dim=0).values.mean())
        W.grad = None
        loss.backward()
        with torch.no_grad():
            W -= lr * W.grad
            u, s, vt = torch.linalg.svd(W, full_matrices=False)
            W.copy_(u @ torch.diag(s.clamp(0.0, 1.0)) @ vt)
        losses.append(float(loss.item()))


def mutual_nn_pairs(P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i, j)`` of the mutual nearest neighbours by cosine between rows of ``P`` and ``Q``."""
    p = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
    sims = p @ q.T
    fwd = sims.argmax(1)
    back = sims.argmax(0)
    i = np.nonzero(back[fwd] == np.arange(len(P)))[0]
    return i, fwd[i]


@register_method("self_learning", "Procrustes refined on mutual-nearest-neighbour pairs between the subject's "
                 "and the atlas's feature directions (needs subject_vectors and atlas_vectors), iterated",
                 needs=("subject_vectors", "atlas_vectors"))
def fit_self_learning(train: SufficientStats, heldout: SufficientStats | None = None, *,
                      subject_vectors: np.ndarray | None = None, atlas_vectors: np.ndarray | None = None,
                      iterations: int = 5, weight: float = 0.5, **_: Any) -> LinearFit:
    """Self-learning (VecMap, Artetxe et al. 2018): start from Procrustes on the activation pairs;
    each iteration maps the subject's feature directions, takes the mutual nearest neighbours
    among the atlas's directions as a dictionary ``D = Σ x_iᵀ y_j`` (unit rows), and refits the
    orthogonal map on ``(1 − weight)·Cxy/‖Cxy‖ + weight·D/‖D‖`` (``weight = 1``: the dictionary
    alone). Scaled like Procrustes; the inverse is ``Wᵀ`` scaled.
    """
    if subject_vectors is None or atlas_vectors is None:
        raise BadValueError("self_learning needs subject_vectors and atlas_vectors (the two feature dictionaries)")
    Xv = np.asarray(subject_vectors, np.float64)
    Yv = np.asarray(atlas_vectors, np.float64)
    Xv = Xv / np.maximum(np.linalg.norm(Xv, axis=1, keepdims=True), 1e-12)
    Yv = Yv / np.maximum(np.linalg.norm(Yv, axis=1, keepdims=True), 1e-12)
    C = train.cxy / max(float(np.linalg.norm(train.cxy)), 1e-300)
    U, _sv, Vt = np.linalg.svd(C, full_matrices=False)
    W = U @ Vt
    n_pairs: list[int] = []
    for _it in range(iterations):
        i, j = mutual_nn_pairs(Xv @ W, Yv)
        n_pairs.append(len(i))
        if not len(i):
            break
        D = Xv[i].T @ Yv[j]
        M = (1 - weight) * C + weight * D / max(float(np.linalg.norm(D)), 1e-300)
        U, _sv, Vt = np.linalg.svd(M, full_matrices=False)
        W = U @ Vt
    S = np.linalg.svd(train.cxy, compute_uv=False)
    s_fwd = float(np.sum(W * train.cxy) / np.trace(train.cxx))
    s_inv = float(np.sum(W * train.cxy) / np.trace(train.cyy))
    return LinearFit(A=s_fwd * W, B=s_inv * W.T, mean_x=train.mean_x.copy(), mean_y=train.mean_y.copy(),
                     params={"iterations": iterations, "weight": weight, "mutual_pairs": n_pairs,
                             "procrustes_trace": float(S.sum()), "normalize": train.normalize})
