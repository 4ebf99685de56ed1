"""Streaming sufficient statistics of paired activations (docs/design.md §5).

Why sufficient statistics: every method we fit (Procrustes, ridge both ways, per-unit
correlation) and every fit metric we report (held-out R²) is a function of the count, the two
means and the three co-moment matrices ``XᵀX``, ``XᵀY``, ``YᵀY`` of the centred pairs. They take
O(d²) memory however long the corpus is, are accumulated in one pass, and merge exactly, so
pairs never have to sit in memory together (and shards of a corpus could be fitted apart).

Why the numerics are what they are: each chunk is centred on its own mean and its co-moments
are one float32 GEMM each (the physical cost of the fit, at the machine's matmul rate); chunks
are merged into float64 accumulators with Chan et al.'s pairwise update
``C += C_b + n_a·n_b/n · δδᵀ``, which never subtracts two large raw sums (the ``Σxxᵀ − n·μμᵀ``
identity loses every digit when the mean dominates the spread, as it does in residual streams
with a few massive dimensions). Rows are gathered into a fixed buffer of ``chunk_rows`` so the
GEMMs stay large and the O(d²) merge stays rare.

Why numpy around the GEMM: the per-row work (norms, centring) and the O(d²) merges are memory-bound
and run single-threaded in numpy at a steady rate; torch's multi-threaded elementwise kernels
were 10× slower than that on this shared 2-core machine whenever other processes kept the cores
busy. Only the GEMMs go to torch (MKL, all threads), on zero-copy views of the numpy buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.errors import ShapeError

DEFAULT_CHUNK_ROWS = 8192  # rows per GEMM: large enough for the matmul's full rate, 25 MB at d=768

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _as_array(a: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype not in _NP_DTYPES:  # bfloat16 / float16 have no numpy twin here
            a = a.float()
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def _gemm_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``aᵀ·b`` through torch's BLAS on zero-copy views: (c, m), (c, n) → (m, n)."""
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return (ta.T @ tb).numpy()


class SufficientStats:
    """Count, means and centred co-moments of pairs ``(x, y)``, accumulated chunk by chunk.

    ``normalize=True`` scales every row to unit L2 norm before it is counted (Procrustes's
    optional row normalisation). ``sample_size`` keeps a uniform reservoir sample of that many
    pairs (used on held-out pairs for the mean-cosine metric). The mean raw L2 norms of ``x``
    and ``y`` are always tracked: they are the "typical residual norm" of each site.
    ``gemm_dtype=torch.float64`` trades half the speed for ~1e-15 instead of ~1e-7 relative
    error in the co-moments.
    """

    def __init__(
        self,
        d_x: int,
        d_y: int,
        *,
        normalize: bool = False,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        sample_size: int = 0,
        seed: int = 0,
        gemm_dtype: torch.dtype = torch.float32,
    ) -> None:
        if d_x < 1 or d_y < 1:
            raise ShapeError(f"dimensions must be positive, got d_x={d_x}, d_y={d_y}")
        if gemm_dtype not in _NP_DTYPES:
            raise ValueError(f"gemm_dtype must be torch.float32 or torch.float64, got {gemm_dtype}")
        self.d_x, self.d_y, self.normalize, self.chunk_rows = d_x, d_y, normalize, max(1, chunk_rows)
        self.gemm_dtype = gemm_dtype
        self._dt = _NP_DTYPES[gemm_dtype]
        self._n = 0
        self._mx = np.zeros(d_x)  # (d_x,) float64
        self._my = np.zeros(d_y)  # (d_y,)
        self._cxx = np.zeros((d_x, d_x))  # Σ (x−μx)ᵀ(x−μx)
        self._cxy = np.zeros((d_x, d_y))  # Σ (x−μx)ᵀ(y−μy)
        self._cyy = np.zeros((d_y, d_y))  # Σ (y−μy)ᵀ(y−μy)
        self.sum_norm_x = 0.0  # Σ ‖x‖ of raw rows
        self.sum_norm_y = 0.0
        self._in: tuple[np.ndarray, np.ndarray] | None = None  # gathering buffers (chunk_rows, d)
        self._work: tuple[np.ndarray, np.ndarray] | None = None  # centring buffers (chunk_rows, d)
        self._buffered = 0
        self.sample_size = sample_size
        self._sample_x = np.zeros((0, d_x), dtype=np.float32)
        self._sample_y = np.zeros((0, d_y), dtype=np.float32)
        self._seen = 0  # rows offered to the reservoir
        self._rng = np.random.default_rng(seed)

    # -------------------------------------------------------------- accumulation

    def update(self, X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor) -> None:
        """Add pairs: ``X`` (n, d_x) and ``Y`` (n, d_y), row i of each from the same content."""
        X, Y = _as_array(X, self._dt), _as_array(Y, self._dt)
        if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != self.d_x or Y.shape[1] != self.d_y:
            raise ShapeError(
                f"update needs X (n, {self.d_x}) and Y (n, {self.d_y}), got {tuple(X.shape)} and {tuple(Y.shape)}"
            )
        if X.shape[0] != Y.shape[0]:
            raise ShapeError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
        c, i = X.shape[0], 0
        while c - i >= self.chunk_rows and not self._buffered:  # whole chunks skip the gathering copy
            self._accumulate(X[i : i + self.chunk_rows], Y[i : i + self.chunk_rows])
            i += self.chunk_rows
        while i < c:
            if self._in is None:
                self._in = (np.empty((self.chunk_rows, self.d_x), self._dt),
                            np.empty((self.chunk_rows, self.d_y), self._dt))
            take = min(c - i, self.chunk_rows - self._buffered)
            b = self._buffered
            self._in[0][b : b + take] = X[i : i + take]
            self._in[1][b : b + take] = Y[i : i + take]
            self._buffered += take
            i += take
            if self._buffered == self.chunk_rows:
                self.flush()

    def flush(self) -> None:
        """Fold gathered rows into the accumulators (every reader calls this)."""
        if not self._buffered:
            return
        k, self._buffered = self._buffered, 0
        assert self._in is not None  # rows are buffered only into the gathering buffers
        self._accumulate(self._in[0][:k], self._in[1][:k])

    def _accumulate(self, X: np.ndarray, Y: np.ndarray) -> None:
        nx = np.sqrt(np.einsum("ij,ij->i", X, X))  # (c,) row norms
        ny = np.sqrt(np.einsum("ij,ij->i", Y, Y))
        snx, sny = float(nx.sum(dtype=np.float64)), float(ny.sum(dtype=np.float64))
        if not (np.isfinite(snx) and np.isfinite(sny)):  # a NaN / inf anywhere in a row shows in its norm
            raise ShapeError("paired activations contain NaN or infinite values")
        self.sum_norm_x += snx
        self.sum_norm_y += sny
        if self.normalize:
            X = X / np.maximum(nx, 1e-12)[:, None]
            Y = Y / np.maximum(ny, 1e-12)[:, None]
        if self.sample_size:
            self._offer_sample(X, Y)
        c = X.shape[0]
        if self._work is None:
            self._work = (np.empty((self.chunk_rows, self.d_x), self._dt),
                          np.empty((self.chunk_rows, self.d_y), self._dt))
        m0x, m0y = X.mean(0), Y.mean(0)  # chunk means m̃ as computed in the GEMM dtype
        Xc = np.subtract(X, m0x, out=self._work[0][:c])  # (c, d_x)
        Yc = np.subtract(Y, m0y, out=self._work[1][:c])  # (c, d_y)
        # What is left of the mean after centring is small, so its rounding error is relative to the
        # spread, not to the (possibly huge) mean: m = m̃ + r to float64 accuracy.
        rx = Xc.sum(0).astype(np.float64) / c  # (d_x,)
        ry = Yc.sum(0).astype(np.float64) / c
        cxx = _gemm_t(Xc, Xc)  # (d_x, d_x) one GEMM each: the cost of the fit
        cxy = _gemm_t(Xc, Yc)  # (d_x, d_y)
        cyy = _gemm_t(Yc, Yc)  # (d_y, d_y)
        # Σ(x−m)(y−m_y)ᵀ = Σ(x−m̃)(y−m̃_y)ᵀ − c·r_x·r_yᵀ
        self._merge(c, m0x + rx, m0y + ry, cxx, cxy, cyy, rx, ry)

    def _merge(self, c: int, mx: np.ndarray, my: np.ndarray, cxx: np.ndarray, cxy: np.ndarray,
               cyy: np.ndarray, rx: np.ndarray | None = None, ry: np.ndarray | None = None) -> None:
        """Chan et al.: C += C_b + n_a·n_b/n·δδᵀ (− c·r·rᵀ for the chunk's centring offset)."""
        n = self._n + c
        dx, dy = mx - self._mx, my - self._my  # (d,) float64
        w = self._n * c / n
        if rx is None:
            rx, ry = np.zeros_like(dx), np.zeros_like(dy)
        # both rank-1 terms as one rank-2 product: [√w·δ, √c·r] · [√w·δ, −√c·r]ᵀ
        ux = np.stack([np.sqrt(w) * dx, np.sqrt(c) * rx], 1)  # (d_x, 2)
        uy = np.stack([np.sqrt(w) * dy, np.sqrt(c) * ry], 1)  # (d_y, 2)
        sgn = np.array([1.0, -1.0])
        for acc, part, a, b in ((self._cxx, cxx, ux, ux), (self._cxy, cxy, ux, uy), (self._cyy, cyy, uy, uy)):
            np.add(acc, part, out=acc)  # float32 GEMM result into float64
            acc += (a * sgn) @ b.T
        self._mx += dx * (c / n)
        self._my += dy * (c / n)
        self._n = n

    def _offer_sample(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Reservoir sampling (algorithm R, vectorised: later rows win a slot, as in sequence)."""
        k, c = self.sample_size, X.shape[0]
        fill = max(0, min(k - self._sample_x.shape[0], c))
        if fill:
            self._sample_x = np.concatenate([self._sample_x, X[:fill].astype(np.float32)])
            self._sample_y = np.concatenate([self._sample_y, Y[:fill].astype(np.float32)])
        t = self._seen + np.arange(fill, c) + 1  # 1-based index of each remaining row
        slot = (self._rng.random(len(t)) * t).astype(np.int64)
        take = np.nonzero(slot < k)[0]
        self._sample_x[slot[take]] = X[fill + take]
        self._sample_y[slot[take]] = Y[fill + take]
        self._seen += c

    def merge(self, other: SufficientStats) -> None:
        """Fold another accumulator over the same spaces into this one (exact)."""
        if (other.d_x, other.d_y, other.normalize) != (self.d_x, self.d_y, self.normalize):
            raise ShapeError("cannot merge statistics of different dimensions or normalisation")
        self.flush()
        other.flush()
        if other._n:
            self._merge(other._n, other._mx, other._my, other._cxx, other._cxy, other._cyy)
            self.sum_norm_x += other.sum_norm_x
            self.sum_norm_y += other.sum_norm_y

    # -------------------------------------------------------------- reading

    @property
    def cxx(self) -> np.ndarray:
        """Centred co-moment Σ(x−μx)ᵀ(x−μx), (d_x, d_x) float64."""
        self.flush()
        return self._cxx

    @property
    def cxy(self) -> np.ndarray:
        """Centred cross co-moment Σ(x−μx)ᵀ(y−μy), (d_x, d_y) float64."""
        self.flush()
        return self._cxy

    @property
    def cyy(self) -> np.ndarray:
        """Centred co-moment Σ(y−μy)ᵀ(y−μy), (d_y, d_y) float64."""
        self.flush()
        return self._cyy

    @property
    def count(self) -> int:
        """Number of pairs counted."""
        self.flush()
        return self._n

    n = count

    @property
    def mean_x(self) -> np.ndarray:
        """Mean of x, (d_x,) float64."""
        self.flush()
        return self._mx

    @property
    def mean_y(self) -> np.ndarray:
        self.flush()
        return self._my

    @property
    def mean_norm_x(self) -> float:
        """Mean raw L2 norm of x (the subject site's typical residual norm)."""
        self.flush()
        return self.sum_norm_x / self._n if self._n else float("nan")

    @property
    def mean_norm_y(self) -> float:
        self.flush()
        return self.sum_norm_y / self._n if self._n else float("nan")

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The reservoir sample ``(X (k, d_x), Y (k, d_y))`` (normalised rows if ``normalize``)."""
        self.flush()
        return self._sample_x, self._sample_y

    def transposed(self) -> SufficientStats:
        """The same statistics with x and y swapped (for fitting the inverse direction); a
        read-only view sharing this object's arrays."""
        self.flush()
        t = SufficientStats(self.d_y, self.d_x, normalize=self.normalize, chunk_rows=self.chunk_rows,
                            gemm_dtype=self.gemm_dtype)
        t._n, t._mx, t._my = self._n, self._my, self._mx
        t._cxx, t._cxy, t._cyy = self._cyy, self._cxy.T, self._cxx
        t.sum_norm_x, t.sum_norm_y = self.sum_norm_y, self.sum_norm_x
        t._sample_x, t._sample_y = self._sample_y, self._sample_x
        return t
