"""Atlases: the ``atlases`` and ``concepts`` rows, the vector files and the indexes, and search.

Why writes are ordered the way they are: the vector file is the source of truth and the index is
derived from it, so an atlas is written files-first (each file to a temporary name, fsync'd,
then renamed) and committed to the database last, in one transaction. A crash at any point leaves
either no atlas (stray files are overwritten by the next import of that name) or a complete one.
The database holds the checksum and count of every file, so a stale or corrupt index is detected
when it is opened, and `Store.rebuild_index` restores it from the vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

import indexes
from engine.errors import BadValueError, DuplicateError, IndexIntegrityError, NotFoundError, ShapeError
from engine.store import layout
from engine.store.base import StoreBase
from engine.store.models import get_or_create_model
from engine.store.schema import AtlasRow, ConceptRow, ModelRow
from engine.util import check_k, check_name, sha256_bytes, unit_rows, write_atomic
from indexes.policy import resolve_index_spec


@dataclasses.dataclass(frozen=True)
class AtlasInfo:
    name: str
    model: str
    layer: int
    hook: str
    dim: int
    n_concepts: int
    n_labelled: int
    metric: str
    source_kind: str
    source_ref: str | None
    index_spec: str
    raw_residuals: bool
    revision: str | None = None
    has_encoder: bool = False
    vector_sha256: str = ""  # checksum of the vector file: what a run or a plan pins

    @property
    def site(self) -> str:
        return f"{self.model}@{self.layer}/{self.hook}"


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


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    atlas: str
    ok: bool
    problem: str | None
    spec: str
    expected_count: int
    index_count: int | None


class AtlasesMixin(StoreBase):
    """Store methods over atlases, their concepts, vector files and indexes."""

    def add_atlas(
        self,
        name: str,
        vectors: np.ndarray,
        labels: Sequence[str | None] | None = None,
        descriptions: Sequence[str | None] | None = None,
        *,
        model: str,
        layer: int,
        hook: str = "resid_post",
        source_kind: str = "matrix",
        source_ref: str | None = None,
        revision: str | None = None,
        raw_residuals: bool = True,
        index_spec: str = "Flat",
        encoder: dict[str, np.ndarray] | None = None,
        densities: Sequence[float | None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AtlasInfo:
        """Create an atlas from ``vectors`` (n, d), one label per row (``None`` = unlabelled).

        Unlabelled concepts keep their ordinal as label and are marked ``labelled=False``.
        """
        check_name(name, "atlas")
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ShapeError(f"atlas vectors must be a non-empty 2-D matrix (n_concepts, d), got {x.shape}")
        if not np.isfinite(x).all():
            raise ShapeError("atlas vectors contain NaN or infinite values")
        n, d = x.shape
        index_spec = resolve_index_spec(index_spec, n, d)
        labels = list(labels) if labels is not None else [None] * n
        descriptions = list(descriptions) if descriptions is not None else [None] * n
        for what, seq in (("labels", labels), ("descriptions", descriptions), ("densities", densities)):
            if seq is not None and len(seq) != n:
                raise ShapeError(f"{len(seq)} {what} for {n} vectors: one per concept (row) is needed")
        with self.session() as s:
            if s.scalar(select(AtlasRow.id).where(AtlasRow.name == name)) is not None:
                raise DuplicateError(f"an atlas named {name!r} exists; pick another --name or remove it first")

        tensors = {layout.DIRECTIONS_KEY: np.ascontiguousarray(x, dtype=np.float32)}
        for key, value in (encoder or {}).items():
            if value is not None:
                tensors[key] = np.ascontiguousarray(value, dtype=np.float32)
        vec_bytes = st_save(tensors, metadata={"atlas": name, "model": model, "layer": str(layer), "hook": hook})
        written = [self.path / layout.vector_file(name), self.path / layout.index_file(name)]
        try:
            write_atomic(written[0], vec_bytes)
            index = _new_index(d, index_spec)
            index.add(unit_rows(x), np.arange(n, dtype=np.int64))
            idx_bytes = index.save(written[1])
            with self.session() as s:
                model_row = get_or_create_model(s, model)
                if model_row.d_model is None:
                    model_row.d_model = d
                atlas = AtlasRow(
                    name=name, model_id=model_row.id, layer=layer, hook=hook, dim=d, n_concepts=n,
                    metric="cosine", raw_residuals=raw_residuals, source_kind=source_kind,
                    source_ref=source_ref, vector_file=layout.vector_file(name),
                    vector_sha256=sha256_bytes(vec_bytes), index_file=layout.index_file(name),
                    index_spec=index_spec, index_sha256=sha256_bytes(idx_bytes), index_count=index.count(),
                    extra={**(extra or {}), "revision": revision, "has_encoder": len(tensors) > 1},
                )
                s.add(atlas)
                s.flush()
                rows = []
                for i in range(n):
                    label = labels[i]
                    rows.append(
                        dict(
                            atlas_id=atlas.id, ordinal=i,
                            label=str(label) if label not in (None, "") else str(i),
                            description=descriptions[i], labelled=label not in (None, ""),
                            source_kind=source_kind, source_ref=source_ref,
                            density=None if densities is None else densities[i], extra={},
                        )
                    )
                s.execute(insert(ConceptRow), rows)
                self._indexes[(name, atlas.index_sha256 or "")] = index
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return self.atlas(name)

    def atlases(self) -> list[AtlasInfo]:
        with self.session() as s:
            return [self._atlas_info(s, r) for r in s.scalars(select(AtlasRow).order_by(AtlasRow.name))]

    def atlas(self, name: str | None = None) -> AtlasInfo:
        """The named atlas; with ``None``, the only atlas of the store."""
        with self.session() as s:
            return self._atlas_info(s, self._atlas_row(s, name))

    def _atlas_row(self, s: Session, name: str | None) -> AtlasRow:
        if name is None:
            rows = list(s.scalars(select(AtlasRow).limit(2)))
            if len(rows) == 1:
                return rows[0]
            if not rows:
                raise NotFoundError("the store has no atlas yet; `atlas import-sae` adds one")
            raise NotFoundError("the store has several atlases; name one (`atlas atlases` lists them)")
        row = s.scalar(select(AtlasRow).where(AtlasRow.name == name))
        if row is None:
            raise NotFoundError(f"no atlas named {name!r}; `atlas atlases` lists them")
        return row

    def _atlas_info(self, s: Session, row: AtlasRow) -> AtlasInfo:
        n_labelled = s.scalar(
            select(func.count()).select_from(ConceptRow).where(ConceptRow.atlas_id == row.id, ConceptRow.labelled)
        )
        model = s.get(ModelRow, row.model_id)
        extra = row.extra or {}
        return AtlasInfo(
            name=row.name, model=model.name if model else "?", layer=row.layer, hook=row.hook, dim=row.dim,
            n_concepts=row.n_concepts, n_labelled=int(n_labelled or 0), metric=row.metric,
            source_kind=row.source_kind, source_ref=row.source_ref, index_spec=row.index_spec,
            raw_residuals=row.raw_residuals, revision=extra.get("revision"),
            has_encoder=bool(extra.get("has_encoder")), vector_sha256=row.vector_sha256,
        )

    def remove_atlas(self, name: str) -> None:
        """Delete an atlas, its concepts and its files (maps and runs on it go too)."""
        with self.session() as s:
            row = self._atlas_row(s, name)
            files = [row.vector_file, row.index_file, layout.label_index_file(name)]
            s.delete(row)
        for f in files:
            (self.path / f).unlink(missing_ok=True)
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}

    # ------------------------------------------------------------------ vectors and index

    def atlas_tensors(self, name: str) -> dict[str, np.ndarray]:
        """All tensors of the atlas vector file, checked against the stored checksum."""
        with self.session() as s:
            row = self._atlas_row(s, name)
            path, sha = self.path / row.vector_file, row.vector_sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IndexIntegrityError(
                f"the vector file of atlas {name!r} is missing ({path}); it is the source of truth "
                "and cannot be rebuilt: re-import the atlas"
            ) from None
        if sha256_bytes(data) != sha:
            raise IndexIntegrityError(
                f"the vector file of atlas {name!r} ({path}) does not match its checksum; re-import the atlas"
            )
        return st_load(data)

    def atlas_vectors(self, name: str, normalized: bool = False) -> np.ndarray:
        """The atlas directions (n_concepts, d) as imported, or unit-norm with ``normalized``."""
        x = self.atlas_tensors(name)[layout.DIRECTIONS_KEY]
        return unit_rows(x) if normalized else x

    def index(self, name: str | None = None) -> indexes.VectorIndex:
        """The atlas's vector index, verified against its checksum and count before use."""
        with self.session() as s:
            row = self._atlas_row(s, name)
            key = (row.name, row.index_sha256 or "")
            if key in self._indexes:
                return self._indexes[key]
            path, spec, expected = self.path / row.index_file, row.index_spec, row.n_concepts
            atlas_name = row.name
        fix = f"`atlas index rebuild {atlas_name}` restores it from the vectors"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IndexIntegrityError(f"the index of atlas {atlas_name!r} is missing ({path}); {fix}") from None
        if sha256_bytes(data) != key[1]:
            raise IndexIntegrityError(
                f"the index of atlas {atlas_name!r} ({path}) is corrupt or stale (checksum mismatch); {fix}"
            )
        try:
            index = indexes.load_index(data, spec)
        except indexes.IndexCorruptError as e:
            raise IndexIntegrityError(f"the index of atlas {atlas_name!r} cannot be read ({e}); {fix}") from None
        if index.count() != expected:
            raise IndexIntegrityError(
                f"the index of atlas {atlas_name!r} holds {index.count()} vectors, the atlas has {expected}; {fix}"
            )
        self._indexes[key] = index
        return index

    def verify_index(self, name: str) -> IndexStatus:
        """Check an atlas's vector file and index without raising; says what is wrong."""
        info = self.atlas(name)
        count = None
        try:
            self.atlas_tensors(name)
            self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
            count = self.index(name).count()
        except IndexIntegrityError as e:
            return IndexStatus(name, False, str(e), info.index_spec, info.n_concepts, count)
        return IndexStatus(name, True, None, info.index_spec, info.n_concepts, count)

    def rebuild_index(self, name: str, spec: str | None = None) -> IndexStatus:
        """Rebuild the index from the vector file (optionally with another spec), atomically."""
        info = self.atlas(name)
        spec = resolve_index_spec(spec or info.index_spec, info.n_concepts, info.dim)
        x = unit_rows(self.atlas_vectors(name))
        index = _new_index(info.dim, spec)
        index.add(x, np.arange(x.shape[0], dtype=np.int64))
        data = index.save(self.path / layout.index_file(name))
        with self.session() as s:
            row = self._atlas_row(s, name)
            row.index_spec, row.index_sha256, row.index_count = spec, sha256_bytes(data), index.count()
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
        self._indexes[(name, sha256_bytes(data))] = index
        return self.verify_index(name)

    # ------------------------------------------------------------------ concepts and search

    def concept(self, ref: str | int, atlas: str | None = None) -> Concept:
        """A concept by ``"<atlas>/<ordinal>"``, or by ordinal within ``atlas`` (or the only atlas)."""
        atlas_name, ordinal = parse_concept_ref(ref, atlas)
        with self.session() as s:
            arow = self._atlas_row(s, atlas_name)
            row = s.scalar(select(ConceptRow).where(ConceptRow.atlas_id == arow.id, ConceptRow.ordinal == ordinal))
            if row is None:
                raise NotFoundError(
                    f"atlas {arow.name!r} has no concept {ordinal} (ordinals run 0..{arow.n_concepts - 1})"
                )
            return _concept(arow.name, row)

    def concepts(self, atlas: str | None = None, ordinals: Sequence[int] | None = None) -> list[Concept]:
        """Concepts of an atlas, all or those at ``ordinals`` (in that order)."""
        with self.session() as s:
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
        with self.session() as s:
            arow = self._atlas_row(s, atlas)
            q = select(ConceptRow.label).where(ConceptRow.atlas_id == arow.id).order_by(ConceptRow.ordinal)
            return list(s.scalars(q))

    def search_vectors(self, atlas: str | None, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Nearest atlas concepts (cosine) of each vector (n, d) already in atlas coordinates."""
        check_k(k)
        info = self.atlas(atlas)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != info.dim:
            raise ShapeError(
                f"query vectors have shape {tuple(np.shape(vectors))}; atlas {info.name!r} needs (n, {info.dim})"
            )
        scores, ids = self.index(info.name).search(unit_rows(q), k)
        return self.hits(info.name, scores, ids)

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
        vec = self.atlas_vectors(c.atlas)[c.ordinal]
        hits = self.search_vectors(c.atlas, vec, k + 1)[0]
        hits = [h for h in hits if h.ordinal != c.ordinal][:k]
        return [dataclasses.replace(h, rank=r) for r, h in enumerate(hits, start=1)]


def parse_concept_ref(ref: str | int, atlas: str | None = None) -> tuple[str | None, int]:
    """``"atlas/12"`` → ("atlas", 12); ``"12"`` or ``12`` → (atlas, 12)."""
    text = str(ref).strip()
    head, sep, ordinal = text.rpartition("/")
    name = head if sep else atlas
    if not ordinal.lstrip("-").isdigit():
        raise NotFoundError(f"bad concept id {text!r}; use <atlas>/<ordinal>, e.g. my-atlas/12")
    return (name or atlas), int(ordinal)


def _concept(atlas: str, row: ConceptRow) -> Concept:
    return Concept(
        atlas, row.ordinal, row.label, row.description, row.labelled, row.source_kind, row.source_ref,
        row.density, row.extra or {},
    )


def _new_index(dim: int, spec: str) -> indexes.VectorIndex:
    """An empty index of ``spec``; a spec the backend does not understand is the user's `BadValueError`."""
    try:
        return indexes.create_index(dim, spec)
    except indexes.IndexSpecError as e:
        raise BadValueError(f"{e}; use a FAISS factory string such as Flat, HNSW32 or IVF1024,Flat (search "
                            "parameters after '|', e.g. HNSW32|efSearch=128), or auto") from None
