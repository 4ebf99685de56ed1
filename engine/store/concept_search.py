"""Concepts of an atlas and nearest-concept search over its index (`ConceptsMixin`).

A concept is a row of its atlas (``<atlas>/<ordinal>``). `ConceptsMixin.search_arrays` is the one
search of an atlas's index: vectors in atlas coordinates scaled to unit norm (or subject vectors
turned into them batch by batch: `engine.search` projects them through a map), ``batch_size`` a
call; `search_vectors` and `engine.search.search` join its results with the concepts' labels into
`Hit` lists (`hits`). Text queries of the labels are `engine.atlas.lookup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from engine.errors import IndexIntegrityError, NotFoundError, ShapeError
from engine.store.atlases import AtlasesMixin
from engine.store.schema import ConceptRow
from engine.util import check_k, unit_rows

MAX_ORDINAL = 2**63 - 1  # concept ordinals are SQLite INTEGERs
SEARCH_BATCH = 8192  # queries per index call: large enough to run at GEMM speed, ~25 MB at d=768


@dataclasses.dataclass(frozen=True)
class Concept:
    atlas: str
    ordinal: int
    label: str
    description: str | None
    labelled: bool
    source_kind: str | None = None
    source_ref: str | None = None
    density: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The concept's id on the command line: ``<atlas>/<ordinal>``."""
        return f"{self.atlas}/{self.ordinal}"


@dataclasses.dataclass(frozen=True)
class Hit:
    """A search result: a concept, its cosine score and its 1-based rank."""

    ref: str
    atlas: str
    ordinal: int
    label: str
    score: float
    rank: int
    labelled: bool = True


class ConceptsMixin(AtlasesMixin):
    """Store methods over concepts and the search of an atlas's index."""

    def concept(self, ref: str | int, atlas: str | None = None) -> Concept:
        """A concept by ``"<atlas>/<ordinal>"``, or by ordinal within ``atlas`` (or the only atlas)."""
        atlas_name, ordinal = parse_concept_ref(ref, atlas)
        with self.read_session() as s:
            arow = self._atlas_row(s, atlas_name)
            row = s.scalar(select(ConceptRow).where(ConceptRow.atlas_id == arow.id, ConceptRow.ordinal == ordinal))
            if row is None:
                raise NotFoundError(
                    f"atlas {arow.name!r} has no concept {ordinal} (ordinals run 0..{arow.n_concepts - 1})"
                )
            return _concept(arow.name, row)

    def concepts(self, atlas: str | None = None, ordinals: Sequence[int] | None = None) -> list[Concept]:
        """Concepts of an atlas, all or those at ``ordinals`` (in that order)."""
        with self.read_session() as s:
            arow = self._atlas_row(s, atlas)
            q = select(ConceptRow).where(ConceptRow.atlas_id == arow.id)
            if ordinals is None:
                return [_concept(arow.name, r) for r in s.scalars(q.order_by(ConceptRow.ordinal))]
            wanted = [int(o) for o in ordinals]
            by_ord: dict[int, ConceptRow] = {}
            for chunk in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
                part = wanted[chunk : chunk + 900]
                by_ord.update((r.ordinal, r) for r in s.scalars(q.where(ConceptRow.ordinal.in_(part))))
            missing = [o for o in wanted if o not in by_ord]
            if missing:
                raise NotFoundError(f"atlas {arow.name!r} has no concepts {missing[:5]}")
            return [_concept(arow.name, by_ord[o]) for o in wanted]

    def labels(self, atlas: str | None = None) -> list[str]:
        """Labels of all concepts in ordinal order (cheap: no full rows)."""
        with self.read_session() as s:
            arow = self._atlas_row(s, atlas)
            q = select(ConceptRow.label).where(ConceptRow.atlas_id == arow.id).order_by(ConceptRow.ordinal)
            return list(s.scalars(q))

    def search_vectors(self, atlas: str | None, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Nearest atlas concepts (cosine) of each vector (n, d) already in atlas coordinates."""
        info = self.atlas(atlas)
        scores, ids = self.search_arrays(info.name, vectors, k)
        return self.hits(info.name, scores, ids)

    def search_arrays(
        self, atlas: str | None, vectors: np.ndarray, k: int = 10, *, batch_size: int = SEARCH_BATCH,
        to_atlas: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The search of an atlas's index: the top ``k`` concepts of each vector, ``batch_size`` vectors
        a call, as (scores (n, k') float32, ordinals (n, k') int64), ``-1`` (score ``-inf``) where the
        index returns fewer; ``k'`` is ``k`` or the atlas's size where that is smaller.

        ``vectors`` (n, d) are in atlas coordinates (scaled to unit norm here), or, with ``to_atlas``,
        whatever it turns a batch of into unit atlas-space queries (a map's projection: `engine.search`).
        """
        check_k(k)
        info = self.atlas(atlas)
        x = np.asarray(vectors) if to_atlas is not None else np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if to_atlas is None and (x.ndim != 2 or x.shape[1] != info.dim):
            raise ShapeError(
                f"query vectors have shape {tuple(np.shape(vectors))}; atlas {info.name!r} needs (n, {info.dim})"
            )
        index = self.index(info.name)
        n, k = x.shape[0], min(k, max(info.n_concepts, 1))  # never more columns than the atlas has rows
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            q = unit_rows(x[lo:hi]) if to_atlas is None else to_atlas(x[lo:hi])
            s, i = index.search(q, k)
            check_scores(info.name, s, i)
            scores[lo:hi, : s.shape[1]], ids[lo:hi, : i.shape[1]] = s, i
        return scores, ids

    def hits(self, atlas: str, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Join index results (scores, ids) with concept labels into `Hit` lists."""
        flat = sorted({int(i) for i in np.asarray(ids).ravel() if i >= 0})
        by_ord = {c.ordinal: c for c in self.concepts(atlas, flat)} if flat else {}
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for rank, (sc, i) in enumerate(((float(a), int(b)) for a, b in zip(srow, irow) if b >= 0), start=1):
                c = by_ord[i]
                hits.append(Hit(c.ref, atlas, i, c.label, sc, rank, c.labelled))
            out.append(hits)
        return out

    def neighbors(self, ref: str | int, k: int = 10, atlas: str | None = None) -> list[Hit]:
        """The ``k`` concepts nearest to a concept's direction (itself excluded)."""
        check_k(k)
        c = self.concept(ref, atlas)
        vec = self.atlas_rows(c.atlas, [c.ordinal])[0]  # only its block of the vector file is checked
        hits = self.search_vectors(c.atlas, vec, k + 1)[0]
        hits = [h for h in hits if h.ordinal != c.ordinal][:k]
        return [dataclasses.replace(h, rank=r) for r, h in enumerate(hits, start=1)]


# The largest |score| a hit can have: queries and atlas vectors are unit rows, so cosines lie in [-1, 1];
# a quantised index (PQ, SQ8) approximates them, never by this much. A hit beyond it (or NaN) was read
# from damaged bytes (a flipped exponent bit gives 1e35): the answer is refused, not shown.
MAX_SCORE = 2.0


def check_scores(atlas: str, scores: np.ndarray, ids: np.ndarray) -> None:
    """Refuse, as `IndexIntegrityError`, a search whose hits have scores no unit vectors can give."""
    bad = (np.asarray(ids) >= 0) & ~(np.abs(np.asarray(scores, dtype=np.float64)) <= MAX_SCORE)  # NaN: bad
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise IndexIntegrityError(
            f"the index of atlas {atlas!r} gave concept {int(ids[row, col])} the score {float(scores[row, col]):.3g}, "
            f"impossible for unit vectors: its index or vector file is damaged; `atlas index verify {atlas}` "
            f"checks them, `atlas index rebuild {atlas}` restores the index from the vectors")


def parse_concept_ref(ref: str | int, atlas: str | None = None) -> tuple[str | None, int]:
    """``"atlas/12"`` → ("atlas", 12); ``"12"`` or ``12`` → (atlas, 12)."""
    text = str(ref).strip()
    head, sep, ordinal = text.rpartition("/")
    name = head if sep else atlas
    if not ordinal.isascii() or not ordinal.lstrip("-").isdigit():
        raise NotFoundError(f"bad concept id {text[:80]!r}; use <atlas>/<ordinal>, e.g. my-atlas/12")
    value = int(ordinal)
    if not 0 <= value <= MAX_ORDINAL:
        raise NotFoundError(f"bad concept id {text[:80]!r}: an ordinal is a row number from 0 "
                            "(`atlas atlases` shows each atlas's size)")
    return (name or atlas), value


def _concept(atlas: str, row: ConceptRow) -> Concept:
    return Concept(
        atlas, row.ordinal, row.label, row.description, row.labelled, row.source_kind, row.source_ref,
        row.density, row.extra or {},
    )
