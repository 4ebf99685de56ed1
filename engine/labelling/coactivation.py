"""Activation-based matching: label subject SAE latents by how they fire on the same text (issue 25).

Lan et al. 2024 ("Sparse autoencoders reveal universal feature spaces across LLMs") match the
latents of two SAEs by the correlation of their activations on the same tokens. Here the two
sides are the subject SAE's latents on the subject's residuals and the atlas's features on the
foundation's residuals of the same content, paired as the alignment maps pair them
(`engine.align.pairing`: ``token`` pairing for one tokenizer, ``span`` pairing across tokenizers:
each word or punctuation mark, every piece encoded and the codes pooled over it, by default the
last piece's). The correlation reads the codes' values, or (``binary``, an activation run's
default) whether each latent fires: the phi coefficient. The atlas side's activations are its encoder's
(`engine.atlas.encoder.AtlasEncoder`), or, for an atlas without an encoder, the projections of
the residual on the atlas directions (`ProjectionEncoder`).

Two statistics are streamed in one pass over paired activations:

- `CoactivationStats`: the sufficient statistics of the Pearson correlation of every (subject
  latent, atlas feature) pair: the count, both sides' sums and sums of squares, and the
  cross-products ``Σ a_x a_yᵀ``; O(n_subject × n_atlas) dense, or O(co-firing pairs) with
  ``sparse=True`` (SAE codes are sparse, so two latents that never fire together have a zero
  cross-product and a correlation ≤ 0: the positive matches are all among the stored pairs);
- `WeightedMeans`: each subject latent's activation-weighted mean foundation residual,
  ``Σ_t a_tj y_t / Σ_t a_tj`` (O(n_subject × d_atlas)), which the atlas encoder then reads
  (`weighted_mean_scores`): the issue's second variant.

Both are sums, so they merge exactly (shards of a corpus, Ray tasks) and are independent of the
batch boundaries but for float rounding; a labelling run saves them (`save`) and a resumed run
reloads the same file, so its rows are those of an uninterrupted run. Ranking then goes through
the subject latents in blocks (`top_matches`): O(block × n_atlas) memory.

For 1M × 1M latents the dense table (8 TB) is out; the plan: ``sparse=True`` (only co-firing
pairs; with TopK k=64 on both sides at most 4096 cross-products per token, and far fewer distinct
pairs), the subject latents split in blocks that Ray tasks own, each task streaming the same
cached activation shards and keeping only its block's rows (a top-k merge per row, as
`engine.labelling.criteria.merge_topk`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import scipy.sparse as sp
import torch

from engine.align.pairing import PairingConfig
from engine.errors import BadValueError, ShapeError
from engine.models.hooks import Site

if TYPE_CHECKING:
    from engine.labelling.criteria import AtlasStat

SPAN_CODE_POOL = "last"  # how span pairing pools a word's codes over its pieces (engine.align.pairing.SPAN_POOLS)
Activations: TypeAlias = Any  # (rows, latents): a numpy array or a scipy sparse matrix


class Encoder(Protocol):
    def encode(self, x: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ProjectionEncoder:
    """The activations of an atlas without an encoder: projections on its (unit) directions,
    ``(x − centre) · d`` (``centre`` the foundation's mean residual, when given)."""

    directions: np.ndarray  # (n_atlas, d)
    centre: np.ndarray | None = None  # (d,)

    def encode(self, x: np.ndarray) -> np.ndarray:
        d = np.asarray(self.directions, dtype=np.float32)
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        x = np.asarray(x, dtype=np.float32)
        if self.centre is not None:
            x = x - np.asarray(self.centre, dtype=np.float32)
        return x @ d.T


def _csr(a: Activations) -> sp.csr_matrix:
    return sp.csr_matrix(a, dtype=np.float64) if sp.issparse(a) else sp.csr_matrix(np.asarray(a, dtype=np.float64))


class CoactivationStats:
    """Streaming Pearson-correlation statistics between ``n_x`` subject latents and ``n_y`` atlas
    features, over rows (tokens / words) on which both were measured."""

    def __init__(self, n_x: int, n_y: int, *, sparse: bool = False) -> None:
        if n_x < 1 or n_y < 1:
            raise ShapeError(f"latent counts must be positive, got {n_x} and {n_y}")
        self.n_x, self.n_y, self.sparse = n_x, n_y, sparse
        self.n = 0
        self.sum_x = np.zeros(n_x)
        self.sum_y = np.zeros(n_y)
        self.sq_x = np.zeros(n_x)
        self.sq_y = np.zeros(n_y)
        self.cross: np.ndarray | sp.csr_matrix = sp.csr_matrix((n_x, n_y)) if sparse else np.zeros((n_x, n_y))

    def update(self, ax: Activations, ay: Activations) -> None:
        """Add rows: ``ax`` (b, n_x) and ``ay`` (b, n_y), dense or scipy-sparse, row i of each
        from the same token or word."""
        if ax.shape[0] != ay.shape[0] or ax.shape[1] != self.n_x or ay.shape[1] != self.n_y:
            raise ShapeError(f"update needs (b, {self.n_x}) and (b, {self.n_y}) activations, got "
                             f"{tuple(ax.shape)} and {tuple(ay.shape)}")
        if ax.shape[0] == 0:
            return
        self.n += int(ax.shape[0])
        for a, s, q in ((ax, self.sum_x, self.sq_x), (ay, self.sum_y, self.sq_y)):
            if sp.issparse(a):
                c = _csr(a)
                s += np.asarray(c.sum(0)).ravel()
                q += np.asarray(c.multiply(c).sum(0)).ravel()
            else:
                d = np.asarray(a, dtype=np.float64)
                s += d.sum(0)
                q += np.einsum("ij,ij->j", d, d)
        if self.sparse:
            self.cross = self.cross + (_csr(ax).T @ _csr(ay)).tocsr()
        elif sp.issparse(ax) or sp.issparse(ay):
            self.cross += np.asarray((_csr(ax).T @ _csr(ay)).todense())
        else:
            self.cross += np.asarray(ax, dtype=np.float64).T @ np.asarray(ay, dtype=np.float64)

    def merge(self, other: CoactivationStats) -> None:
        if (other.n_x, other.n_y) != (self.n_x, self.n_y):
            raise ShapeError("cannot merge co-activation statistics of different sizes")
        self.n += other.n
        for mine, theirs in ((self.sum_x, other.sum_x), (self.sum_y, other.sum_y), (self.sq_x, other.sq_x),
                             (self.sq_y, other.sq_y)):
            mine += theirs
        if self.sparse:
            self.cross = (self.cross + sp.csr_matrix(other.cross)).tocsr()
        else:
            theirs = other.cross
            self.cross += theirs.toarray() if sp.issparse(theirs) else theirs  # type: ignore[union-attr]

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mx, my = self.sum_x / n, self.sum_y / n
        sx = np.sqrt(np.clip(self.sq_x / n - mx ** 2, 0, None))
        sy = np.sqrt(np.clip(self.sq_y / n - my ** 2, 0, None))
        return mx, my, sx, sy

    def correlation(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Pearson correlations of subject latents ``[lo, hi)`` with every atlas feature,
        ``(hi − lo, n_y)`` float64; 0 where either side never varied (a dead latent)."""
        hi = self.n_x if hi is None else hi
        mx, my, sx, sy = self._moments()
        c = self.cross[lo:hi]
        c = c.toarray() if sp.issparse(c) else c  # type: ignore[union-attr]
        cov = c / max(self.n, 1) - np.outer(mx[lo:hi], my)
        den = np.outer(sx[lo:hi], sy)
        return np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)

    def top_matches(self, k: int, lo: int = 0, hi: int | None = None, block: int = 1024,
                    columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` atlas features best correlated with each subject latent of ``[lo, hi)``:
        ``(scores (m, k) float32, ids (m, k) int64)``, descending, ties by lower id; computed in
        blocks of ``block`` latents. ``columns`` (ascending atlas ordinals): rank those only (a
        ``labelled_only`` run's labelled concepts); ids stay atlas ordinals."""
        hi = self.n_x if hi is None else hi
        cols = None if columns is None else np.asarray(columns, dtype=np.int64)
        out_s, out_i = [], []
        for a in range(lo, hi, block):
            corr = self.correlation(a, min(hi, a + block))
            if cols is not None:
                corr = corr[:, cols]
            ids = np.argsort(-corr, axis=1, kind="stable")[:, :k]
            out_s.append(np.take_along_axis(corr, ids, 1).astype(np.float32))
            out_i.append((ids if cols is None else cols[ids]).astype(np.int64))
        if not out_s:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(out_s), np.concatenate(out_i)

    def atlas_side(self, k: int = 10, beta: float = 30.0, block: int = 1024) -> AtlasStat:
        """The atlas-side statistic of the correlation table, as for mapped directions
        (`engine.labelling.criteria.AtlasStat`: each atlas feature's mean of its ``k`` best
        correlations, its log-partition over subject latents at ``beta``, its best correlation),
        in one blocked pass over the subject latents; lets ``csls`` / ``isf`` re-rank
        correlations and gives the mutual-nearest-neighbour signal of a label's confidence."""
        from engine.labelling.criteria import AtlasStat, merge_topk

        top = np.full((self.n_y, k), -np.inf, dtype=np.float32)
        log_z = np.full(self.n_y, -np.inf)
        for a in range(0, self.n_x, block):
            c = self.correlation(a, min(self.n_x, a + block))  # (b, n_y)
            top = merge_topk(top, c.T.astype(np.float32), k)
            z = beta * c.T
            m = np.maximum(log_z, z.max(1))
            log_z = m + np.log(np.exp(log_z - m) + np.exp(z - m[:, None]).sum(1))
        finite = np.isfinite(top)
        r = (np.where(finite, top, 0).sum(1) / np.maximum(finite.sum(1), 1)).astype(np.float32)
        return AtlasStat(k, beta, r, log_z, self.n_x, top[:, 0].copy())


    def save(self, path: str | Path) -> None:
        cross = self.cross
        parts: dict[str, Any] = {}
        if self.sparse:
            c = sp.csr_matrix(cross)
            parts = {"cross_data": c.data, "cross_indices": c.indices, "cross_indptr": c.indptr}
        else:
            parts = {"cross": cross}
        np.savez(path, n=self.n, n_x=self.n_x, n_y=self.n_y, sparse=self.sparse, sum_x=self.sum_x,
                 sum_y=self.sum_y, sq_x=self.sq_x, sq_y=self.sq_y, **parts)

    @classmethod
    def load(cls, path: str | Path) -> CoactivationStats:
        with np.load(path) as z:
            out = cls(int(z["n_x"]), int(z["n_y"]), sparse=bool(z["sparse"]))
            out.n = int(z["n"])
            out.sum_x, out.sum_y, out.sq_x, out.sq_y = (z[k].copy() for k in ("sum_x", "sum_y", "sq_x", "sq_y"))
            if out.sparse:
                out.cross = sp.csr_matrix((z["cross_data"], z["cross_indices"], z["cross_indptr"]),
                                          shape=(out.n_x, out.n_y))
            else:
                out.cross = z["cross"].copy()
        return out

    def fingerprint(self) -> str:
        """sha256 of the statistics (what a run records to check a resume reads the same file)."""
        h = hashlib.sha256(f"{self.n}:{self.n_x}x{self.n_y}:{self.sparse}".encode())
        for a in (self.sum_x, self.sum_y, self.sq_x, self.sq_y):
            h.update(np.ascontiguousarray(a).data)
        c = sp.csr_matrix(self.cross) if self.sparse else None
        for a in ((c.data, c.indices, c.indptr) if c is not None else (self.cross,)):
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()


class WeightedMeans:
    """Each subject latent's activation-weighted mean of the paired foundation residuals."""

    def __init__(self, n_x: int, d_y: int) -> None:
        self.sums = np.zeros((n_x, d_y))
        self.weights = np.zeros(n_x)

    def update(self, ax: Activations, y: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        if sp.issparse(ax):
            c = _csr(ax)
            self.sums += np.asarray(c.T @ y)
            self.weights += np.asarray(c.sum(0)).ravel()
        else:
            a = np.asarray(ax, dtype=np.float64)
            self.sums += a.T @ y
            self.weights += a.sum(0)

    def merge(self, other: WeightedMeans) -> None:
        self.sums += other.sums
        self.weights += other.weights

    def means(self) -> np.ndarray:
        """(n_x, d_y) weighted means; zero rows for latents that never fired."""
        return self.sums / np.where(self.weights > 0, self.weights, 1.0)[:, None]


def weighted_mean_scores(means: np.ndarray, atlas_encoder: Any = None, directions: np.ndarray | None = None,
                         centre: np.ndarray | None = None) -> np.ndarray:
    """Score atlas features for each subject latent from its weighted-mean residual: the atlas
    encoder's pre-activations ``m @ W_enc + b_enc`` (TopK / JumpReLU would zero all but a few,
    so the ranking reads the pre-activation), or without an encoder the cosine of ``m − centre``
    with each atlas direction. (n_x, n_atlas) float32."""
    m = np.asarray(means, dtype=np.float32)
    if atlas_encoder is not None:
        return (m @ atlas_encoder.W_enc + atlas_encoder.b_enc).astype(np.float32)
    if directions is None:
        raise BadValueError("weighted-mean scores need the atlas encoder or its directions")
    if centre is not None:
        m = m - np.asarray(centre, dtype=np.float32)
    d = np.asarray(directions, dtype=np.float32)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return m @ d.T


def sparse_codes(acts: np.ndarray) -> sp.csr_matrix:
    """Dense SAE activations (mostly zeros) as a CSR matrix."""
    return sp.csr_matrix(np.asarray(acts, dtype=np.float32))


def binary_codes(acts: Activations) -> Activations:
    """Whether each code fires (> 0), as 0/1 of the same kind (CSR stays CSR)."""
    if sp.issparse(acts):
        return (sp.csr_matrix(acts) > 0).astype(np.float32)
    return (np.asarray(acts) > 0).astype(np.float32)


@dataclasses.dataclass
class CoactivationPass:
    """What one pass over paired text accumulated (per subject layer)."""

    stats: CoactivationStats
    means: WeightedMeans | None
    n_pairs: int = 0


def _encoding(encoder: Encoder) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda a: torch.from_numpy(np.asarray(encoder.encode(a.float().numpy()), dtype=np.float32))


def accumulate_coactivation(subject: tuple[torch.nn.Module, Any], foundation: tuple[torch.nn.Module, Any],
                            texts: Sequence[str], sites: tuple[Site, Site], encoders: tuple[Encoder, Encoder],
                            config: PairingConfig | None = None, *, sparse: bool = False,
                            weighted_means: bool = True, binary: bool = False, quiet: bool = False) -> CoactivationPass:
    """One pass of both models over ``texts``: pair their residuals at ``sites`` (subject site of
    one layer, foundation site) as ``config`` says (its first pairing, ``token`` or ``span``;
    ``max_pairs`` in corpus order, ``batch_size``), encode each side (``encoders``: the subject
    SAE's, the atlas's or a `ProjectionEncoder`) and accumulate the correlation statistics and
    (``weighted_means``) the subject latents' weighted-mean foundation residuals. Deterministic
    for the same inputs.

    Span pairing encodes every piece of a word and pools the *codes* over the word's pieces
    (``config.pools["span"]``, default `SPAN_CODE_POOL`; ``last``: the last piece's codes, as
    encoding the last piece's residual), each side reading up to its own model's length; the
    weighted means pair the pooled subject codes with the foundation's word residual pooled the
    same way.

    ``binary``: correlate whether each latent fires (code > 0) rather than how strongly, on the
    sides that are SAE codes (not a `ProjectionEncoder`'s projections, which are dense): the
    Pearson correlation of two indicators, the phi coefficient (`binary_codes`). The weighted
    means always read the codes' values."""
    from engine.align.pairing import check_pairing, iter_batch_pairs, pair_batches, pass_lengths

    config = config or PairingConfig()
    pairing = config.pairings[0]
    if pairing not in ("token", "span"):
        raise BadValueError(f"co-activation pairs tokens or words: pairing must be token or span, got {pairing!r}")
    pool = config.pools.get(pairing) or (SPAN_CODE_POOL if pairing == "span" else None)
    check_pairing(pairing, subject[1], foundation[1])
    s_site, f_site = sites[0].resolved(subject[0]), sites[1].resolved(foundation[0])
    L = s_site.layers[0]
    enc_x, enc_y = _encoding(encoders[0]), _encoding(encoders[1])
    stats: CoactivationStats | None = None
    means: WeightedMeans | None = None
    n = 0
    for sb, fb in iter_batch_pairs(subject, foundation, texts, s_site, f_site, batch_size=config.batch_size,
                                   lengths=pass_lengths((pairing,)), desc=None if quiet else "co-activation"):
        codes = pair_batches(sb, fb, texts, pairing, [L], f_site.layer, pool, (enc_x, enc_y))
        take = codes.n if config.max_pairs is None else min(codes.n, config.max_pairs - n)
        ax = sparse_codes(codes.x[L][:take].numpy())
        ay_dense = codes.y[:take].numpy()
        ay = sparse_codes(ay_dense) if sparse else ay_dense
        if binary and not isinstance(encoders[1], ProjectionEncoder):
            ay = binary_codes(ay)
        if stats is None:
            stats = CoactivationStats(ax.shape[1], ay.shape[1], sparse=sparse)
            means = WeightedMeans(ax.shape[1], fb.acts[f_site.layer].shape[1]) if weighted_means else None
        stats.update(binary_codes(ax) if binary else ax, ay)
        if means is not None:
            y = pair_batches(sb, fb, texts, pairing, [L], f_site.layer, pool, (enc_x, None)).y[:take]
            means.update(ax, y.float().numpy())
        n += take
        if config.max_pairs is not None and n >= config.max_pairs:
            break
    if stats is None:
        raise BadValueError("no paired activations: the texts gave no pairs")
    return CoactivationPass(stats, means, n)
