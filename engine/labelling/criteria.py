"""Retrieval criteria for labelling: nearest neighbour, CSLS and the inverted softmax (issue 25).

A labelling run maps subject features into the atlas and ranks atlas concepts for each one. Plain
nearest neighbour (``nn``) ranks by cosine. In high dimensions some atlas concepts ("hubs") are the
nearest neighbour of very many queries; the two standard corrections from bilingual lexicon
induction re-weight each atlas concept by how close it sits to the queries as a whole:

- ``csls`` (Conneau et al. 2018, MUSE)::

      csls(x, y) = 2 cos(x, y) − r_S(x) − r_T(y)

  ``r_S(x)``: mean cosine of query ``x`` to its ``k`` nearest atlas concepts; ``r_T(y)``: mean
  cosine of atlas concept ``y`` to its ``k`` nearest mapped subject features.
- ``isf``, the inverted softmax (Smith et al. 2017)::

      isf(x, y) = exp(β cos(x, y)) / Σ_x' exp(β cos(x', y))

  normalised over the *queries* for each atlas concept; ranked in log space,
  ``β cos(x, y) − log Σ_x' exp(β cos(x', y))``.

Both need one statistic per atlas concept over *all* queries (``r_T``, or the log-partition
``log Z``), so a run computes it first in a streaming pass over the feature batches
(`AtlasSideStats`: a threshold top-k merge per atlas concept and a running log-sum-exp, O(n_atlas ·
k) memory) and records it; a resumed run reads the recorded vector, so its rows are those of an
uninterrupted run. The same pass keeps each query's ``k'`` > ``k`` nearest concepts by cosine
(`candidate_k`), read off the same matrix products (one exact search, the statistic folded in
per score tile), and a run records them too (`CANDIDATE_FILE`, O(n_features · k') memory); the
criterion then re-ranks them (`rerank`) with no second search. ``r_S(x)`` is read off the same
candidates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from engine.errors import BadValueError, ShapeError
from engine.util import unit_rows
from indexes.exact import BASE_BLOCK, topk_inner_product
from indexes.exact import merge_topk as exact_merge_topk

CRITERIA: tuple[str, ...] = ("nn", "csls", "isf")
DEFAULT_CRITERION = "nn"
DEFAULT_CSLS_K = 10  # MUSE's k
DEFAULT_ISF_BETA = 30.0  # Smith et al.'s inverse temperature range (10-30) for unit vectors
STAT_FILE = "stat"  # the kind of a run's atlas-side statistic file (`Store.save_run_file`)
CANDIDATE_FACTOR = 4  # k' = max(CANDIDATE_FACTOR * k, k + csls_k, MIN_CANDIDATES)
MIN_CANDIDATES = 32
SEED_ROWS = 64  # an atlas block's column-wise top-k starts from this many queries densely, then by threshold
CANDIDATE_FILE = "cand"  # the kind of a run's candidates file: each feature's `candidate_k` cosine neighbours


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise BadValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    return criterion


def candidate_k(k: int, n_atlas: int, csls_k: int = DEFAULT_CSLS_K) -> int:
    """How many cosine neighbours to fetch so a criterion can re-rank them into the top ``k``."""
    return int(min(n_atlas, max(CANDIDATE_FACTOR * k, k + csls_k, MIN_CANDIDATES)))


# ----------------------------------------------------------------------------- the atlas-side statistic


@dataclasses.dataclass
class AtlasSideStats:
    """Per atlas concept, over all queries seen so far: the ``k`` largest cosines (for ``r_T``)
    and the log-partition ``log Σ_x exp(β cos(x, y))`` (for ``isf``). Streamed batch by batch.

    ``update(queries, candidates)`` takes unit query rows (mapped subject features) against the
    unit atlas rows given at construction and returns each query's ``candidates`` nearest atlas
    concepts by cosine, from the *same* matrix products (`indexes.exact.topk_inner_product` with a
    tile hook): a run's pre-pass is one exact search, not a search and a statistic. The statistic
    is exact whatever the batch boundaries (top-k merges and a log-sum-exp both merge exactly;
    float rounding aside). The column-wise top-k costs one comparison a score after an atlas
    block's first `SEED_ROWS` queries, as the row-wise one does in `indexes.exact`.
    """

    atlas: np.ndarray  # (n_atlas, d) unit rows
    k: int = DEFAULT_CSLS_K
    beta: float = DEFAULT_ISF_BETA
    log_partition: bool = True  # also the isf log-partition (a float64 exp per similarity: most of the pass's time)
    top: np.ndarray = dataclasses.field(init=False)  # (n_atlas, k) descending; -inf where fewer seen
    top_ids: np.ndarray = dataclasses.field(init=False)  # (n_atlas, k) the queries' ordinals; -1 where fewer seen
    log_z: np.ndarray = dataclasses.field(init=False)  # (n_atlas,) float64
    n_queries: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise BadValueError(f"csls k must be >= 1, got {self.k}")
        self.atlas = unit_rows(self.atlas)
        self.top = np.full((self.atlas.shape[0], self.k), -np.inf, dtype=np.float32)
        self.top_ids = np.full((self.atlas.shape[0], self.k), -1, dtype=np.int64)
        self.log_z = np.full(self.atlas.shape[0], -np.inf, dtype=np.float64)

    def update(self, queries: np.ndarray, candidates: int = 1, block: int = BASE_BLOCK
               ) -> tuple[np.ndarray, np.ndarray]:
        """Fold a batch of unit query rows (b, d) in; returns their top ``candidates`` atlas
        concepts by cosine ``(scores (b, c) float32, ids (b, c) int64)``, descending (-inf / -1
        past the atlas's size). ``block``: atlas rows per score tile."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.atlas.shape[1]:
            raise ShapeError(f"queries must be (n, {self.atlas.shape[1]}), got {q.shape}")
        if candidates < 1:
            raise BadValueError(f"candidates must be >= 1, got {candidates}")
        first = self.n_queries
        out = topk_inner_product(q, self.atlas, candidates, base_block=block,
                                 on_tile=lambda s, qlo, blo: self._fold(s, first + qlo, blo))
        self.n_queries += len(q)
        return out

    def _fold(self, s: np.ndarray, q0: int, a0: int) -> None:
        """One score tile ``s`` (m queries from ordinal ``q0``, b atlas rows from ``a0``) into the
        column-wise top-k and log-partition of those atlas rows."""
        m, b = s.shape
        top_s, top_i = self.top[a0:a0 + b], self.top_ids[a0:a0 + b]  # views: written in place
        start = 0
        if not np.isfinite(top_s[:, -1]).all():  # some concept has seen fewer than k queries: seed densely
            start = min(m, max(SEED_ROWS, self.k))
            ids = np.broadcast_to(np.arange(q0, q0 + start, dtype=np.int64), (b, start))
            top_s[:], top_i[:] = _dense_merge(top_s, top_i, s[:start].T, ids)
        while start < m:  # row chunks no taller than the queries seen so far: ~k survivors a concept each
            rest = s[start:start + max(q0 + start, SEED_ROWS)]
            flat = np.flatnonzero(rest > top_s[:, -1][None, :])  # beats the concept's k-th best
            if len(flat):
                rows, cols = np.divmod(flat, b)
                touched, where = np.unique(cols, return_inverse=True)
                sub_s, sub_i = top_s[touched], top_i[touched]
                exact_merge_topk(sub_s, sub_i, where, rest[rows, cols], rows.astype(np.int64) + (q0 + start))
                top_s[touched], top_i[touched] = sub_s, sub_i
            start += len(rest)
        if self.log_partition:
            z = self.beta * s.astype(np.float64)
            lz = self.log_z[a0:a0 + b]
            mx = np.maximum(lz, z.max(0))
            self.log_z[a0:a0 + b] = mx + np.log(np.exp(lz - mx) + np.exp(z - mx[None, :]).sum(0))

    def merge(self, other: AtlasSideStats) -> None:
        """Fold the statistics of another set of queries over the same atlas in (its queries
        numbered after this one's)."""
        if other.atlas.shape != self.atlas.shape or other.k != self.k or other.beta != self.beta:
            raise ShapeError("cannot merge atlas-side statistics of different atlases, k or beta")
        shifted = np.where(other.top_ids >= 0, other.top_ids + self.n_queries, -1)
        self.top, self.top_ids = _dense_merge(self.top, self.top_ids, other.top, shifted)
        self.log_z = np.logaddexp(self.log_z, other.log_z)
        self.n_queries += other.n_queries

    @property
    def r_atlas(self) -> np.ndarray:
        """``r_T``: each atlas concept's mean cosine to its ``k`` nearest queries (n_atlas,) float32
        (over fewer when fewer than ``k`` queries were seen)."""
        finite = np.isfinite(self.top)
        s = np.where(finite, self.top, 0.0).sum(1)
        return (s / np.maximum(finite.sum(1), 1)).astype(np.float32)

    def record(self) -> dict[str, Any]:
        """What a run records: plain JSON-able data (`from_record` gives back the same ranking)."""
        return {"k": self.k, "beta": self.beta, "n_queries": self.n_queries,
                "r_atlas": self.r_atlas.tolist(), "log_z": self.log_z.tolist(), "best": self.top[:, 0].tolist()}


def _dense_merge(top_s: np.ndarray, top_i: np.ndarray, new_s: np.ndarray, new_i: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise the ``k`` best of ``[top | new]`` (k = top's width) with their ids, descending,
    ties by lower id."""
    k = top_s.shape[1]
    both_s = np.concatenate([top_s, np.asarray(new_s, dtype=top_s.dtype)], axis=1)
    both_i = np.concatenate([top_i, np.asarray(new_i, dtype=top_i.dtype)], axis=1)
    if both_s.shape[1] > k:
        part = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        both_s, both_i = np.take_along_axis(both_s, part, 1), np.take_along_axis(both_i, part, 1)
    order = np.lexsort((both_i, -both_s), axis=1)
    return np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)


@dataclasses.dataclass(frozen=True)
class AtlasStat:
    """The recorded atlas-side statistic a criterion ranks with (see `AtlasSideStats.record`)."""

    k: int
    beta: float
    r_atlas: np.ndarray  # (n_atlas,) float32
    log_z: np.ndarray  # (n_atlas,) float64
    n_queries: int = 0
    best: np.ndarray | None = None  # (n_atlas,) float32: each concept's best query score (mutual nearest neighbours)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> AtlasStat:
        best = rec.get("best")
        return cls(int(rec["k"]), float(rec["beta"]), np.asarray(rec["r_atlas"], dtype=np.float32),
                   np.asarray(rec["log_z"], dtype=np.float64), int(rec.get("n_queries", 0)),
                   None if best is None else np.asarray(best, dtype=np.float32))

    def scattered(self, columns: np.ndarray, n_atlas: int) -> AtlasStat:
        """This statistic of the atlas rows ``columns`` (ascending ordinals) as one over all
        ``n_atlas`` rows: the others (never ranked: a ``labelled_only`` run's unlabelled concepts)
        get ``r_T`` 0, ``log Z`` 0 and a best score of +inf (never a mutual nearest neighbour)."""
        cols = np.asarray(columns, dtype=np.int64)
        r = np.zeros(n_atlas, dtype=np.float32)
        r[cols] = self.r_atlas
        log_z = np.zeros(n_atlas, dtype=np.float64)
        log_z[cols] = self.log_z
        best = None
        if self.best is not None:
            best = np.full(n_atlas, np.inf, dtype=np.float32)
            best[cols] = self.best
        return AtlasStat(self.k, self.beta, r, log_z, self.n_queries, best)

    @classmethod
    def of(cls, stats: AtlasSideStats) -> AtlasStat:
        return cls.from_record(json.loads(json.dumps(stats.record())))  # exactly what a record holds

    def save(self, path: Any) -> None:
        arrays: dict[str, Any] = {"k": self.k, "beta": self.beta, "r_atlas": self.r_atlas, "log_z": self.log_z,
                                  "n_queries": self.n_queries}
        if self.best is not None:
            arrays["best"] = self.best
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Any) -> AtlasStat:
        with np.load(path) as z:
            return cls(int(z["k"]), float(z["beta"]), z["r_atlas"].astype(np.float32), z["log_z"].astype(np.float64),
                       int(z["n_queries"]), z["best"].astype(np.float32) if "best" in z.files else None)


def merge_topk(top: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """Row-wise the ``k`` largest of ``[top | new]``, descending (``-inf`` pads rows with fewer)."""
    both = np.concatenate([top, np.asarray(new, dtype=top.dtype)], axis=1)
    if both.shape[1] > k:
        both = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
    elif both.shape[1] < k:
        both = np.concatenate([both, np.full((both.shape[0], k - both.shape[1]), -np.inf, dtype=both.dtype)], 1)
    return -np.sort(-both, axis=1)


def atlas_side_stats(queries: Iterable[np.ndarray], atlas: np.ndarray, k: int = DEFAULT_CSLS_K,
                     beta: float = DEFAULT_ISF_BETA, log_partition: bool = True) -> AtlasStat:
    """The streaming pass: fold every batch of unit query rows in and return the recorded statistic
    (``log_partition=False``: no isf log-partition, ``log_z`` stays -inf; enough for csls and nn)."""
    acc = AtlasSideStats(atlas, k=k, beta=beta, log_partition=log_partition)
    for q in queries:
        acc.update(q)  # its top-1 candidates are not kept
    return AtlasStat.of(acc)


# ----------------------------------------------------------------------------- ranking


def rerank(cand_scores: np.ndarray, cand_ids: np.ndarray, criterion: str, stat: AtlasStat | None, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank cosine candidates ``(b, k')`` (from an index search, descending, id -1 for none)
    by ``criterion`` and keep the top ``k``: returns ``(scores (b, k), ids (b, k))``.

    ``nn``: the first ``k`` as they are (scores are cosines). ``csls``: ``2cos − r_S − r_T``
    with ``r_S`` the mean of each row's first ``stat.k`` cosines. ``isf``: ``β cos − log Z``.
    Ties keep the cosine order (a stable sort).
    """
    check_criterion(criterion)
    s = np.asarray(cand_scores, dtype=np.float32)
    ids = np.asarray(cand_ids, dtype=np.int64)
    if criterion == "nn":
        return s[:, :k], ids[:, :k]
    if stat is None:
        raise BadValueError(f"criterion {criterion!r} needs the atlas-side statistic of the run")
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    if criterion == "csls":
        kk = min(stat.k, s.shape[1])
        r_s = np.where(valid[:, :kk], s[:, :kk], 0).sum(1) / np.maximum(valid[:, :kk].sum(1), 1)
        new = 2 * s - r_s[:, None] - stat.r_atlas[safe]
    else:
        if not np.isfinite(stat.log_z).all():
            raise BadValueError("criterion 'isf' needs the log-partition: compute the statistic with log_partition=True")
        new = (stat.beta * s.astype(np.float64) - stat.log_z[safe]).astype(np.float32)
    new = np.where(valid, new, -np.inf).astype(np.float32)
    order = np.argsort(-new, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_s = np.take_along_axis(new, order, 1)
    return np.where(out_ids >= 0, out_s, np.float32(np.nan)), out_ids


def criterion_scores(queries: np.ndarray, atlas: np.ndarray, criterion: str, stat: AtlasStat | None = None,
                     csls_k: int = DEFAULT_CSLS_K) -> np.ndarray:
    """Full score matrix (n, n_atlas) of unit ``queries`` against unit ``atlas`` rows under a
    criterion (brute force; for small sizes and tests). ``r_S`` uses ``csls_k`` (``stat.k`` if given)."""
    check_criterion(criterion)
    cos = unit_rows(queries) @ unit_rows(atlas).T
    if criterion == "nn":
        return cos
    if stat is None:
        raise BadValueError(f"criterion {criterion!r} needs the atlas-side statistic")
    if criterion == "csls":
        kk = min(stat.k, cos.shape[1])
        r_s = -np.sort(-cos, axis=1)[:, :kk].mean(1)
        return 2 * cos - r_s[:, None] - stat.r_atlas[None, :]
    return (stat.beta * cos.astype(np.float64) - stat.log_z[None, :]).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top ``k`` of a score matrix, descending, ties by lower id: ``(scores, ids)``."""
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def label_topk(queries: np.ndarray, atlas: np.ndarray, k: int, criterion: str = "nn",
               csls_k: int = DEFAULT_CSLS_K, beta: float = DEFAULT_ISF_BETA, batch: int = 4096,
               stat: AtlasStat | None = None) -> tuple[np.ndarray, np.ndarray, AtlasStat | None]:
    """In-memory labelling under a criterion, the way a run does it: one streaming pass over
    query batches gives the atlas-side statistic (unless given) and each query's cosine
    candidates, which are then re-ranked. Returns ``(scores (n, k), ids (n, k), stat)``."""
    check_criterion(criterion)
    q, a = unit_rows(queries), unit_rows(atlas)
    kc = k if criterion == "nn" else candidate_k(k, len(a), csls_k)
    batches = [q[i:i + batch] for i in range(0, len(q), batch)]
    if criterion != "nn" and stat is None:
        acc = AtlasSideStats(a, k=csls_k, beta=beta, log_partition=criterion == "isf")
        cands = [acc.update(b, kc) for b in batches]
        stat = AtlasStat.of(acc)
    else:
        cands = [top_k(b @ a.T, kc) for b in batches]
    ranked = [rerank(cs, ci, criterion, stat, k) for cs, ci in cands]
    return np.concatenate([r[0] for r in ranked]), np.concatenate([r[1] for r in ranked]), stat
