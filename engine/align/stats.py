"""Streaming sufficient statistics of paired activations (docs/design.md §5).

Why sufficient statistics: every method we fit (Procrustes, ridge both ways, per-unit
correlation) and every fit metric we report (held-out R²) is a function of the count, the two
means and the three co-moment matrices ``XᵀX``, ``XᵀY``, ``YᵀY`` of the centred pairs. They take
O(d²) memory however long the corpus is, are accumulated in one pass, and merge exactly, so
pairs never have to sit in memory together (and shards of a corpus could be fitted apart).

Why the numerics are what they are: rows are shifted by a fixed reference ``K`` (the mean of the
first rows seen) as they are written into one work buffer ``Z = [x − Kx, y − Ky, 1]`` of
``chunk_rows`` rows; a full buffer costs one product ``ZᵀZ`` (BLAS ``syrk``, in float32), whose
blocks are at once Σ(x−K)(x−K)ᵀ, Σ(x−K)(y−K)ᵀ, Σ(y−K)(y−K)ᵀ and, from the column of
ones, the shifted sums; it is added into a float64 accumulator. The centred co-moments are
``S − n·r·rᵀ`` with ``r`` the mean shifted row, formed only when read. Shifting by a value close
to the mean is what keeps float32 accurate: the rounding error is relative to the spread, not to
the (possibly huge) mean, which the ``Σxxᵀ − n·μμᵀ`` identity on raw rows would lose every digit
to in residual streams with a few massive dimensions. One ``syrk`` over both sides does the work
of the three GEMMs in as many flops (the two diagonal blocks at half a GEMM's cost), and per row there is one pass for the raw norms and
one shifted copy into the buffer; nothing else is O(rows).

The per-row work is numpy (single-threaded, steady on a busy machine: torch's multi-threaded
elementwise kernels were 10× slower whenever other processes kept the cores busy); the product is
numpy's BLAS (all threads) on the buffer itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import ShapeError

if TYPE_CHECKING:  # torch is imported only where tensors arrive (the method registry stays light to import)
    import torch

DEFAULT_CHUNK_ROWS = 8192  # rows per syrk: large enough for the BLAS's full rate, 50 MB at d_x = d_y = 768

_NP_DTYPES = {"float32": np.float32, "float64": np.float64}


def _dtype_name(dtype: Any) -> str:
    """``torch.float32`` / ``"float32"`` / ``np.float32`` -> ``"float32"``."""
    return str(np.dtype(dtype)) if isinstance(dtype, type) else str(dtype).removeprefix("torch.")


def _as_array(a: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if not isinstance(a, np.ndarray) and hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu()
        if _dtype_name(a.dtype) not in _NP_DTYPES:  # bfloat16 / float16 have no numpy twin here
            a = a.float()
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def _gram(z: np.ndarray) -> np.ndarray:
    """``zᵀ·z`` (c, D) → (D, D), symmetric. numpy's matmul sees one buffer times its own transpose
    and calls BLAS ``syrk`` (half the flops of a GEMM), then mirrors the triangle."""
    return np.matmul(z.T, z)


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
        gemm_dtype: torch.dtype | str = "float32",
    ) -> None:
        if d_x < 1 or d_y < 1:
            raise ShapeError(f"dimensions must be positive, got d_x={d_x}, d_y={d_y}")
        if _dtype_name(gemm_dtype) not in _NP_DTYPES:
            raise ValueError(f"gemm_dtype must be torch.float32 or torch.float64, got {gemm_dtype}")
        self.d_x, self.d_y, self.normalize, self.chunk_rows = d_x, d_y, normalize, max(1, chunk_rows)
        self.gemm_dtype = gemm_dtype
        self._dt = _NP_DTYPES[_dtype_name(gemm_dtype)]
        D = d_x + d_y + 1
        self._n = 0
        self._shift: np.ndarray | None = None  # (d_x + d_y,) K in the buffer's dtype, fixed at the first rows
        self._S = np.zeros((D, D))  # float64: Σ zᵀz of the rows z = [x − Kx, y − Ky, 1]
        self._z: np.ndarray | None = None  # the work buffer (chunk_rows, D), last column ones
        self._buffered = 0
        # centred results, formed from _S when read (valid while not _dirty)
        self._dirty = False
        self._mx = np.zeros(d_x)  # (d_x,) float64
        self._my = np.zeros(d_y)  # (d_y,)
        self._cxx = np.zeros((d_x, d_x))  # Σ (x−μx)ᵀ(x−μx)
        self._cxy = np.zeros((d_x, d_y))  # Σ (x−μx)ᵀ(y−μy)
        self._cyy = np.zeros((d_y, d_y))  # Σ (y−μy)ᵀ(y−μy)
        self.sum_norm_x = 0.0  # Σ ‖x‖ of raw rows
        self.sum_norm_y = 0.0
        self.sample_size = sample_size
        self._sample_x = np.zeros((0, d_x), dtype=np.float32)
        self._sample_y = np.zeros((0, d_y), dtype=np.float32)
        self._seen = 0  # rows offered to the reservoir
        self._rng = np.random.default_rng(seed)

    # -------------------------------------------------------------- accumulation

    def update(self, X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor) -> None:
        """Add pairs: ``X`` (n, d_x) and ``Y`` (n, d_y), row i of each from the same content."""
        X, Y = _as_array(X, self._dt), _as_array(Y, self._dt)
        self._add(X, Y)

    def _add(self, X: np.ndarray, Y: np.ndarray) -> None:
        if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != self.d_x or Y.shape[1] != self.d_y:
            raise ShapeError(
                f"update needs X (n, {self.d_x}) and Y (n, {self.d_y}), got {tuple(X.shape)} and {tuple(Y.shape)}"
            )
        if X.shape[0] != Y.shape[0]:
            raise ShapeError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
        c = X.shape[0]
        if c == 0:
            return
        nx = np.sqrt(np.einsum("ij,ij->i", X, X))  # (c,) raw row norms: the one pass besides the copy
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
        if self._shift is None:  # K: the first rows' mean, kept for good
            self._shift = np.concatenate([X.mean(0, dtype=np.float64), Y.mean(0, dtype=np.float64)]).astype(self._dt)
        if self._z is None:
            self._z = np.empty((self.chunk_rows, self.d_x + self.d_y + 1), self._dt)
            self._z[:, -1] = 1.0
        dx, dxy = self.d_x, self.d_x + self.d_y
        kx, ky = self._shift[:dx], self._shift[dx:]
        i = 0
        while i < c:
            take = min(c - i, self.chunk_rows - self._buffered)
            b = self._buffered
            np.subtract(X[i : i + take], kx, out=self._z[b : b + take, :dx])
            np.subtract(Y[i : i + take], ky, out=self._z[b : b + take, dx:dxy])
            self._buffered += take
            i += take
            if self._buffered == self.chunk_rows:
                self.flush()
        self._dirty = True

    def flush(self) -> None:
        """Fold buffered rows into the accumulator."""
        if self._buffered:
            k, self._buffered = self._buffered, 0
            assert self._z is not None  # rows are buffered only into the work buffer
            np.add(self._S, _gram(self._z[:k]), out=self._S)  # (D, D): the cost of the fit
            self._n += k
            self._dirty = True

    def _read(self) -> None:
        """Flush, and form the centred results if anything was added since they were last formed."""
        self.flush()
        if self._dirty:
            self._finalise()

    def _finalise(self) -> None:
        """Centred co-moments and means from the shifted sums: C = S − n·r·rᵀ, μ = K + r."""
        self._dirty = False
        n = self._n
        if not n or self._shift is None:
            return
        dx, dxy = self.d_x, self.d_x + self.d_y
        S = self._S
        r = S[:dxy, -1] / n  # mean shifted row (x then y), float64
        k = self._shift.astype(np.float64)
        rx, ry = r[:dx], r[dx:]
        self._cxx = S[:dx, :dx] - n * np.outer(rx, rx)
        self._cxy = S[:dx, dx:dxy] - n * np.outer(rx, ry)
        self._cyy = S[dx:dxy, dx:dxy] - n * np.outer(ry, ry)
        self._mx = k[:dx] + rx
        self._my = k[dx:] + ry

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
        """Fold another accumulator over the same spaces into this one (exact: its centred
        co-moments are re-expressed about this one's shift, Σ(z−K)(z−K)ᵀ = C + n·(μ−K)(μ−K)ᵀ)."""
        if (other.d_x, other.d_y, other.normalize) != (self.d_x, self.d_y, self.normalize):
            raise ShapeError("cannot merge statistics of different dimensions or normalisation")
        self._read()
        other._read()
        m = other._n
        if not m:
            return
        dx, dxy = self.d_x, self.d_x + self.d_y
        mu = np.concatenate([other._mx, other._my])  # (d_x + d_y,) float64
        if self._shift is None:
            self._shift = mu.astype(self._dt)
        u = mu - self._shift.astype(np.float64)  # other's mean, shifted
        block = np.empty((dxy, dxy))
        block[:dx, :dx], block[:dx, dx:] = other._cxx, other._cxy
        block[dx:, :dx], block[dx:, dx:] = other._cxy.T, other._cyy
        block += m * np.outer(u, u)
        self._S[:dxy, :dxy] += block
        self._S[:dxy, -1] += m * u
        self._S[-1, :dxy] += m * u
        self._S[-1, -1] += m
        self._n += m
        self.sum_norm_x += other.sum_norm_x
        self.sum_norm_y += other.sum_norm_y
        self._dirty = True

    def __getstate__(self) -> dict:
        """Pickled (sent from a Ray worker): buffered rows folded in, the work buffer left behind."""
        self.flush()
        state = self.__dict__.copy()
        state["_z"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        """Unpickled: arrays made writable (Ray hands numpy arrays over read-only, zero-copy)."""
        self.__dict__.update({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})

    # -------------------------------------------------------------- reading

    @property
    def cxx(self) -> np.ndarray:
        """Centred co-moment Σ(x−μx)ᵀ(x−μx), (d_x, d_x) float64."""
        self._read()
        return self._cxx

    @property
    def cxy(self) -> np.ndarray:
        """Centred cross co-moment Σ(x−μx)ᵀ(y−μy), (d_x, d_y) float64."""
        self._read()
        return self._cxy

    @property
    def cyy(self) -> np.ndarray:
        """Centred co-moment Σ(y−μy)ᵀ(y−μy), (d_y, d_y) float64."""
        self._read()
        return self._cyy

    @property
    def count(self) -> int:
        """Number of pairs counted."""
        self._read()
        return self._n

    n = count

    @property
    def mean_x(self) -> np.ndarray:
        """Mean of x, (d_x,) float64."""
        self._read()
        return self._mx

    @property
    def mean_y(self) -> np.ndarray:
        self._read()
        return self._my

    @property
    def mean_norm_x(self) -> float:
        """Mean raw L2 norm of x (the subject site's typical residual norm)."""
        self._read()
        return self.sum_norm_x / self._n if self._n else float("nan")

    @property
    def mean_norm_y(self) -> float:
        self._read()
        return self.sum_norm_y / self._n if self._n else float("nan")

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The reservoir sample ``(X (k, d_x), Y (k, d_y))`` (normalised rows if ``normalize``)."""
        self._read()
        return self._sample_x, self._sample_y

    def transposed(self) -> SufficientStats:
        """The same statistics with x and y swapped (for fitting the inverse direction); a
        read-only view sharing this object's centred arrays."""
        self._read()
        t = SufficientStats(self.d_y, self.d_x, normalize=self.normalize, chunk_rows=self.chunk_rows,
                            gemm_dtype=self.gemm_dtype)
        t._n, t._mx, t._my = self._n, self._my, self._mx
        t._cxx, t._cxy, t._cyy = self._cyy, self._cxy.T, self._cxx
        t.sum_norm_x, t.sum_norm_y = self.sum_norm_y, self.sum_norm_x
        t._sample_x, t._sample_y = self._sample_y, self._sample_x
        return t
