"""Atlases: the ``atlases`` and ``concepts`` rows, the vector files and the indexes, and search.

Why writes are ordered the way they are: the vector file is the source of truth and the index is
derived from it, so an atlas is validated and its index built in memory first, then written
files-first (each file to a temporary name, fsync'd, then renamed) under file names this write
owns (`engine.store.layout`), and committed to the database last, in one short transaction that
claims the files. A crash at any point leaves either no atlas (and unclaimed files, which
`Store.gc` removes) or a complete one; a failed write removes only the files it wrote. The
database holds the checksum and count of every file, so a stale or corrupt index is detected when
it is opened, and `Store.rebuild_index` restores it from the vectors (a new file, the row switched
to it, then the old file removed). Removal is refused while maps or runs depend on an atlas, unless
asked to cascade; it deletes rows with one set-based statement per table.

An atlas's index is a FAISS file or a Milvus collection (`engine.store.index_location`): the same
order holds for both. A collection is created under an owned name (`layout.collection_name`) and
filled before the commit and dropped on failure; a crash leaves at most an unclaimed collection,
which `Store.verify` reports and `Store.gc` drops. A Milvus index has no checksum: opening it
checks its count, and `verify_index` also compares a few stored vectors with the vector file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import indexes
from engine.errors import (
    BadValueError,
    DuplicateError,
    IndexIntegrityError,
    IndexUnavailableError,
    InUseError,
    NotFoundError,
    ShapeError,
)
from engine.store import layout, postgres
from engine.store.base import StoreBase
from engine.store.index_location import FAISS, IndexLocation, parse_index_uri
from engine.store.models import get_or_create_model
from engine.store.schema import AlignmentMapRow, AtlasRow, ConceptRow, FeatureLabelRow, LabelRunRow, ModelRow
from engine.store.vectorfiles import open_tensors, row_chunks, write_tensor_file
from engine.util import (
    FileStamp,
    check_k,
    check_name,
    failpoint,
    file_stamp,
    sha256_file,
    unit_rows,
    utcnow,
    write_store_file_with,
)
from indexes.faiss_backend import faiss_reason
from indexes.milvus import MilvusIndex, MilvusUnavailableError, drop_collection
from indexes.policy import resolve_index_spec

MAX_ORDINAL = 2**63 - 1  # concept ordinals are SQLite INTEGERs
ANALYZE_MIN_ROWS = 1000  # PostgreSQL: an import of this many concepts refreshes the planner's statistics
CONCEPT_BATCH = 50_000  # concept rows per INSERT on import: ~50 MB of row dicts at a time
TRAIN_SAMPLE = 200_000  # rows an index that needs training (IVF, PQ, SQ) is trained on: an even
#                         spread of the atlas (k-means uses at most 256 a list, so IVF4096 and below
#                         see what they would see of all rows); 600 MB at d=768


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
    index_backend: str = FAISS  # "faiss" (a file in the store) or "milvus" (a collection at index_uri)
    index_uri: str | None = None

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
    backend: str = FAISS


@dataclasses.dataclass(frozen=True)
class Dependents:
    """What depends on an atlas or a map: maps, labelling runs, their label rows, and the map files."""

    maps: list[str]
    runs: list[str]
    n_labels: int
    files: list[str]

    def describe(self) -> str:
        parts = []
        if self.maps:
            parts.append(f"{len(self.maps)} map(s) ({_names(self.maps)})")
        if self.runs:
            parts.append(f"{len(self.runs)} labelling run(s) ({_names(self.runs)}) with {self.n_labels} label rows")
        return " and ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class Removal:
    """What a removal deleted."""

    atlases: list[str]
    maps: list[str]
    runs: list[str]
    n_labels: int
    files: list[str]


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def _dependents(s: Session, maps_where: Any) -> Dependents:
    maps = s.execute(select(AlignmentMapRow.id, AlignmentMapRow.name, AlignmentMapRow.file)
                     .where(maps_where).order_by(AlignmentMapRow.name)).all()
    map_ids = [m[0] for m in maps]
    runs = list(s.scalars(select(LabelRunRow.name).where(LabelRunRow.map_id.in_(map_ids)).order_by(LabelRunRow.name)))
    n_labels = s.scalar(select(func.count()).select_from(FeatureLabelRow).join(
        LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id).where(LabelRunRow.map_id.in_(map_ids))) if runs else 0
    return Dependents([m[1] for m in maps], runs, int(n_labels or 0), [m[2] for m in maps])


def _label_index_files(name: str, extra: dict[str, Any] | None, legacy: bool = True) -> list[str]:
    """The label-embedding index file an atlas row claims (and the name older stores used)."""
    meta = (extra or {}).get("label_index") or {}
    out = [meta["file"]] if meta.get("file") else []
    if legacy and meta and not meta.get("file"):
        out.append(layout.legacy_label_index_file(name))
    return out


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
        index_uri: str | None = None,
    ) -> AtlasInfo:
        """Create an atlas from ``vectors`` (n, d), one label per row (``None`` = unlabelled).

        Unlabelled concepts keep their ordinal as label and are marked ``labelled=False``.
        ``index_uri`` says where its index lives (`engine.store.index_location`; default a FAISS file).
        """
        self.check_writable()
        check_name(name, "atlas")
        x = check_matrix(vectors)  # not read yet: a memory-mapped source stays on disk
        n, d = x.shape
        index_spec = resolve_index_spec(index_spec, n, d)
        labels = list(labels) if labels is not None else [None] * n
        descriptions = list(descriptions) if descriptions is not None else [None] * n
        for what, seq in (("labels", labels), ("descriptions", descriptions), ("densities", densities)):
            if seq is not None and len(seq) != n:
                raise ShapeError(f"{len(seq)} {what} for {n} vectors: one per concept (row) is needed")
        enc = check_encoder(encoder, n, d)
        loc = IndexLocation(FAISS) if index_uri is None else parse_index_uri(index_uri, self.path)
        with self.read_session() as s:  # early, friendly; checked again under the write lock
            if s.scalar(select(AtlasRow.id).where(AtlasRow.name == name)) is not None:
                raise DuplicateError(f"an atlas named {name!r} exists; pick another --name or remove it first")
        if loc.backend == FAISS:
            _new_index(d, index_spec)  # a spec the backend does not understand writes no file
        token = layout.new_token()
        vec_rel, idx_ref = layout.vector_file(name, token), None
        written: list[Path] = []  # only this write's own files: a failure removes them and nothing else
        try:
            written.append(self.path / vec_rel)
            vec_sha = write_vectors(self.path / vec_rel, x, enc,
                                    {"atlas": name, "model": model, "layer": str(layer), "hook": hook})
            failpoint("add_atlas.vectors_written")
            vec_stamp = file_stamp(self.path / vec_rel)
            # built from the file just written, a chunk at a time: a FAISS file, or this write's own
            # Milvus collection (dropped on a failure in it, or in the block below)
            index, idx_ref = self._build_placed_index(open_tensors(self.path / vec_rel)[layout.DIRECTIONS_KEY],
                                                      index_spec, loc, name, token)
            if loc.backend == FAISS:
                written.append(self.path / idx_ref)
                write_index(index, self.path / idx_ref)
            failpoint("add_atlas.index_written")
            idx_sha, idx_stamp = None, None
            if loc.backend == FAISS:
                idx_sha, idx_stamp = sha256_file(self.path / idx_ref), file_stamp(self.path / idx_ref)
            try:
                with self.session() as s:  # the write lock is held from here to the commit only
                    if s.scalar(select(AtlasRow.id).where(AtlasRow.name == name)) is not None:
                        raise DuplicateError(f"an atlas named {name!r} exists (written while this import ran); "
                                             "pick another --name or remove it first")
                    model_row = ensure_model(s, model)
                    if model_row.d_model is None:
                        model_row.d_model = d
                    atlas = AtlasRow(
                        name=name, model_id=model_row.id, layer=layer, hook=hook, dim=d, n_concepts=n,
                        metric="cosine", raw_residuals=raw_residuals, source_kind=source_kind,
                        source_ref=source_ref, vector_file=vec_rel, vector_sha256=vec_sha,
                        index_file=idx_ref, index_spec=index_spec, index_backend=loc.backend, index_uri=loc.uri,
                        index_sha256=idx_sha, index_count=index.count(), **_stamp_columns("vector", vec_stamp),
                        **_stamp_columns("index", idx_stamp),
                        extra={**(extra or {}), "revision": revision, "has_encoder": bool(enc)},
                    )
                    s.add(atlas)
                    s.flush()
                    for lo in range(0, n, CONCEPT_BATCH):  # batches: 1M row dicts at once would cost GBs
                        s.execute(insert(ConceptRow), [
                            dict(
                                atlas_id=atlas.id, ordinal=i,
                                label=str(labels[i]) if labels[i] not in (None, "") else str(i),
                                description=descriptions[i], labelled=labels[i] not in (None, ""),
                                source_kind=source_kind, source_ref=source_ref,
                                density=None if densities is None else densities[i], extra={},
                            )
                            for i in range(lo, min(n, lo + CONCEPT_BATCH))
                        ])
                    failpoint("add_atlas.before_commit")
            except IntegrityError:  # another database than SQLite: the unique name decides
                raise DuplicateError(f"an atlas named {name!r} exists (written while this import ran); "
                                     "pick another --name or remove it first") from None
            self._attach_raw(name, index)
            self._indexes[_cache_key(name, loc.backend, idx_ref, idx_sha)] = index
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            if idx_ref is not None and loc.backend != FAISS:
                self._discard_index(loc, idx_ref)
            raise
        if self.engine.dialect.name == "postgresql" and n >= ANALYZE_MIN_ROWS:
            postgres.analyze(self.engine, "concepts")
        return self.atlas(name)

    def atlases(self) -> list[AtlasInfo]:
        with self.read_session() as s:
            return [self._atlas_info(s, r) for r in s.scalars(select(AtlasRow).order_by(AtlasRow.name))]

    def atlas(self, name: str | None = None) -> AtlasInfo:
        """The named atlas; with ``None``, the only atlas of the store."""
        with self.read_session() as s:
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
            index_backend=row.index_backend or FAISS, index_uri=row.index_uri,
        )

    def atlas_dependents(self, name: str) -> Dependents:
        """The maps on an atlas, the labelling runs on them and their label rows."""
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            return _dependents(s, AlignmentMapRow.atlas_id == row.id)

    def remove_atlas(self, name: str, cascade: bool = False) -> Removal:
        """Delete an atlas: its rows, then its files.

        While maps (and labelling runs on them) depend on it, refused with `InUseError` naming
        them, unless ``cascade``: then they go too. Rows are deleted child tables first, one
        set-based statement each, in one transaction; files after the commit.
        """
        self.check_writable()
        with self.session() as s:
            row = self._atlas_row(s, name)
            deps = _dependents(s, AlignmentMapRow.atlas_id == row.id)
            if deps.maps and not cascade:
                raise InUseError(
                    f"atlas {name!r} is used by {deps.describe()}; `atlas remove {name} --cascade` removes "
                    "them too, or remove them first"
                )
            loc = _row_location(row)
            index_file = [row.index_file] if loc.backend == FAISS else []
            collection = None if loc.backend == FAISS else row.index_file
            files = [row.vector_file, *index_file, *_label_index_files(name, row.extra), *deps.files]
            map_ids = select(AlignmentMapRow.id).where(AlignmentMapRow.atlas_id == row.id)
            run_ids = select(LabelRunRow.id).where(LabelRunRow.map_id.in_(map_ids))
            s.execute(delete(FeatureLabelRow).where(FeatureLabelRow.run_id.in_(run_ids)))
            s.execute(delete(LabelRunRow).where(LabelRunRow.map_id.in_(map_ids)))
            s.execute(delete(AlignmentMapRow).where(AlignmentMapRow.atlas_id == row.id))
            s.execute(delete(ConceptRow).where(ConceptRow.atlas_id == row.id))
            s.execute(delete(AtlasRow).where(AtlasRow.id == row.id))
        failpoint("remove_atlas.committed")
        for f in files:
            (self.path / f).unlink(missing_ok=True)
        if collection is not None:
            self._discard_index(loc, collection)
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
        return Removal(atlases=[name], maps=deps.maps, runs=deps.runs, n_labels=deps.n_labels, files=files)

    # ------------------------------------------------------------------ vectors and index

    def atlas_files(self, name: str) -> dict[str, str]:
        """The files an atlas's row claims, relative to the store root (``vectors``, ``index``,
        and ``labels`` where a label-embedding index exists); a Milvus-held atlas has its
        ``collection`` instead of an ``index`` file."""
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            out = {"vectors": row.vector_file}
            out["index" if row.index_backend in (None, FAISS) else "collection"] = row.index_file
            label_files = _label_index_files(name, row.extra, legacy=False)
            if label_files:
                out["labels"] = label_files[0]
            return out

    def atlas_tensors(self, name: str) -> dict[str, np.ndarray]:
        """All tensors of the atlas vector file as read-only memory maps, after the file's cheap
        integrity check (`check_file`: its stamp, or its full checksum when the stamp changed)."""
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            path, sha, cached = self.path / row.vector_file, row.vector_sha256, _cached_stamp(row, "vector")
            name = row.name
        try:
            self.check_file(name, "vector", path, sha, cached)
            return open_tensors(path)
        except FileNotFoundError:
            raise IndexIntegrityError(
                f"the vector file of atlas {name!r} is missing ({path}); it is the source of truth "
                "and cannot be rebuilt: re-import the atlas"
            ) from None

    def atlas_vectors(self, name: str, normalized: bool = False) -> np.ndarray:
        """The atlas directions (n_concepts, d) as imported (a read-only memory map: rows are read
        when used), or unit-norm with ``normalized`` (in memory)."""
        x = self.atlas_tensors(name)[layout.DIRECTIONS_KEY]
        return unit_rows(x) if normalized else x

    def check_file(self, name: str, kind: str, path: Path, sha: str | None, cached: FileStamp | None,
                   full: bool = False) -> None:
        """Check an atlas's ``kind`` file (``"vector"`` or ``"index"``) before it is used.

        The cheap check: the file's `FileStamp` (size, mtime, checksum of head and tail) equals
        the one cached in the row. A different size or head is a mismatch at once; a different
        mtime alone (a copied or moved store), no cached stamp (a row older than migration 0006)
        or ``full`` runs the full sha256, streamed, and on a match caches the new stamp (on a
        writable store). Raises `IndexIntegrityError` on a mismatch, `FileNotFoundError` when the
        file is missing."""
        what = "vector file" if kind == "vector" else "index"
        fix = ("re-import the atlas" if kind == "vector"
               else f"`atlas index rebuild {name}` restores it from the vectors")
        stamp = file_stamp(path)
        if not full and stamp == cached:
            return
        if cached is not None and (stamp.size != cached.size or stamp.head_sha256 != cached.head_sha256):
            raise IndexIntegrityError(f"the {what} of atlas {name!r} ({path}) is corrupt or stale "
                                      f"(its size or header changed); {fix}")
        if sha256_file(path) != sha:
            raise IndexIntegrityError(f"the {what} of atlas {name!r} ({path}) is corrupt or stale "
                                      f"(checksum mismatch); {fix}")
        if stamp != cached and not self.readonly:
            with self.session() as s:  # the file is right: remember its stamp (only if still this file)
                row = s.scalar(select(AtlasRow).where(AtlasRow.name == name))
                if row is not None and self.path / getattr(row, f"{kind}_file") == path:
                    for key, value in _stamp_columns(kind, stamp).items():
                        setattr(row, key, value)

    def index(self, name: str | None = None) -> indexes.VectorIndex:
        """The atlas's vector index, opened from its file (memory-mapped) after the cheap integrity
        check (`check_file`) and checked against the atlas's count."""
        for attempt in range(3):
            with self.read_session() as s:
                row = self._atlas_row(s, name)
                loc = _row_location(row)
                key = _cache_key(row.name, loc.backend, row.index_file, row.index_sha256)
                if key in self._indexes:
                    return self._indexes[key]
                path, spec, expected = self.path / row.index_file, row.index_spec, row.n_concepts
                atlas_name, ref, cached = row.name, row.index_file, _cached_stamp(row, "index")
            fix = f"`atlas index rebuild {atlas_name}` restores it from the vectors"
            if loc.backend != FAISS:
                self._indexes[key] = self._open_milvus_index(atlas_name, loc, ref, spec, expected, fix)
                return self._indexes[key]
            try:
                self.check_file(atlas_name, "index", path, key[1], cached)
                index = indexes.open_index(path, spec)
            except FileNotFoundError:
                if attempt < 2 and self._index_file_moved(atlas_name, path):
                    continue  # a rebuild switched the row to a new file (and removed this one): read again
                raise IndexIntegrityError(f"the index of atlas {atlas_name!r} is missing ({path}); {fix}") from None
            except (indexes.IndexCorruptError, indexes.IndexSpecError) as e:
                raise IndexIntegrityError(f"the index of atlas {atlas_name!r} cannot be read ({e}); {fix}") from None
            break
        if index.count() != expected:
            raise IndexIntegrityError(
                f"the index of atlas {atlas_name!r} holds {index.count()} vectors, the atlas has {expected}; {fix}"
            )
        self._attach_raw(atlas_name, index)
        self._indexes[key] = index
        return index

    def _open_milvus_index(self, name: str, loc: IndexLocation, collection: str, spec: str, expected: int,
                           fix: str) -> MilvusIndex:
        try:
            index = MilvusIndex.attach(loc.connect_uri(self.path), collection, spec)
            count = index.count()
        except MilvusUnavailableError as e:
            raise IndexUnavailableError(f"the index of atlas {name!r} is out of reach: {e}") from None
        except (indexes.IndexCorruptError, indexes.IndexSpecError) as e:
            raise IndexIntegrityError(f"the index of atlas {name!r} is missing or unreadable ({e}); {fix}") from None
        if count != expected:
            raise IndexIntegrityError(
                f"the index of atlas {name!r} (Milvus collection {collection}) holds {count} vectors, "
                f"the atlas has {expected}; {fix}")
        return index

    def _build_placed_index(self, x: np.ndarray, spec: str, loc: IndexLocation, name: str,
                            token: str) -> tuple[indexes.VectorIndex, str]:
        """The index of ``x`` where ``loc`` says: (index, its file or collection). A FAISS index is
        built in memory (the caller writes its file); a collection is created and filled here."""
        if loc.backend == FAISS:
            return build_index(x, spec), layout.index_file(name, token)
        collection = layout.collection_name(name, token)
        try:
            index = build_index(x, spec, loc.backend, uri=loc.connect_uri(self.path), collection=collection)
        except MilvusUnavailableError as e:
            raise IndexUnavailableError(str(e)) from None
        return index, collection

    def _discard_index(self, loc: IndexLocation, ref: str) -> None:
        """Remove an index file or drop a collection, best effort: one left behind is a leftover
        that `Store.verify` reports and `Store.gc` removes."""
        if loc.backend == FAISS:
            (self.path / ref).unlink(missing_ok=True)
            return
        try:
            drop_collection(loc.connect_uri(self.path), ref)
        except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
            pass

    def _attach_raw(self, name: str, index: indexes.VectorIndex) -> None:
        """A spec with ``rerank=R`` (a quantised index) re-scores its candidates from the atlas's
        vector file, memory-mapped: only the candidates' rows are read."""
        if "rerank" in index.spec.partition("|")[2] and hasattr(index, "rerank_from"):
            index.rerank_from(self.atlas_vectors(name))

    def _index_file_moved(self, name: str, path: Path) -> bool:
        with self.read_session() as s:
            return self.path / self._atlas_row(s, name).index_file != path

    def verify_index(self, name: str) -> IndexStatus:
        """Check an atlas's vector file and index without raising; says what is wrong."""
        info = self.atlas(name)
        count = None
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            files = [(kind, self.path / getattr(row, f"{kind}_file"), getattr(row, f"{kind}_sha256"),
                      _cached_stamp(row, kind)) for kind in ("vector", "index")]
        try:
            for kind, path, sha, cached in files:  # the full sha256 of each file, read in chunks
                if kind == "index" and info.index_backend not in (None, FAISS):
                    continue  # a collection: its count and stored vectors are checked below
                try:
                    self.check_file(name, kind, path, sha, cached, full=True)
                except FileNotFoundError:
                    if kind == "vector":
                        self.atlas_tensors(name)  # its one message for a missing vector file
                    break  # a missing index: `index` says so (or finds the file a rebuild switched to)
            x = self.atlas_tensors(name)[layout.DIRECTIONS_KEY]
            self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
            index = self.index(name)
            count = index.count()
            if isinstance(index, MilvusIndex):  # no checksum: compare a few stored vectors with the file
                probe = np.unique(np.linspace(0, len(x) - 1, min(len(x), 16)).astype(np.int64))
                try:
                    stored = index.vectors(probe)
                except indexes.IndexCorruptError as e:
                    raise IndexIntegrityError(f"the index of atlas {name!r} is incomplete ({e}); "
                                              f"`atlas index rebuild {name}` restores it") from None
                if not np.allclose(stored, unit_rows(x[probe]), atol=1e-4):
                    raise IndexIntegrityError(
                        f"the index of atlas {name!r} (Milvus collection {index.collection}) holds other vectors "
                        f"than its vector file (stale); `atlas index rebuild {name}` restores it")
        except (IndexIntegrityError, IndexUnavailableError) as e:
            return IndexStatus(name, False, str(e), info.index_spec, info.n_concepts, count, info.index_backend)
        return IndexStatus(name, True, None, info.index_spec, info.n_concepts, count, info.index_backend)

    def rebuild_index(self, name: str, spec: str | None = None, index_uri: str | None = None) -> IndexStatus:
        """Rebuild the index from the vector file (optionally with another spec, or in another place:
        ``index_uri`` as `add_atlas` takes it, e.g. to move an atlas to Milvus or back), atomically.

        The new index is built and checked, written under a new file or collection name, and the row
        switched to it in one transaction; only then is the old one removed. A crash at any point
        leaves the old index (and an unclaimed new one, which `Store.gc` removes) or the new one.
        """
        self.check_writable()
        info = self.atlas(name)
        spec = resolve_index_spec(info.index_spec if spec is None else spec, info.n_concepts, info.dim)
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            vec_sha, vec_path, cached = row.vector_sha256, self.path / row.vector_file, _cached_stamp(row, "vector")
            old_loc, old_ref = _row_location(row), row.index_file
        loc = old_loc if index_uri is None else parse_index_uri(index_uri, self.path)
        try:  # the source of the new index: its full checksum first
            self.check_file(name, "vector", vec_path, vec_sha, cached, full=True)
        except FileNotFoundError:
            self.atlas_tensors(name)  # its one message for a missing vector file
        # a chunk at a time from the mapped file
        index, ref = self._build_placed_index(self.atlas_vectors(name), spec, loc, name, layout.new_token())
        sha, stamp = None, None
        try:
            if loc.backend == FAISS:
                write_index(index, self.path / ref)
                sha, stamp = sha256_file(self.path / ref), file_stamp(self.path / ref)
            failpoint("rebuild.file_written")
            with self.session() as s:
                row = self._atlas_row(s, name)
                if row.vector_sha256 != vec_sha:
                    raise NotFoundError(f"atlas {name!r} was replaced while its index was rebuilt; rebuild again")
                old_loc, old_ref = _row_location(row), row.index_file
                row.index_file, row.index_spec, row.index_backend, row.index_uri = ref, spec, loc.backend, loc.uri
                row.index_sha256, row.index_count = sha, index.count()
                for key, value in _stamp_columns("index", stamp).items():
                    setattr(row, key, value)
        except BaseException:
            self._discard_index(loc, ref)
            raise
        failpoint("rebuild.committed")
        if (old_loc, old_ref) != (loc, ref):
            self._discard_index(old_loc, old_ref)
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
        self._attach_raw(name, index)
        self._indexes[_cache_key(name, loc.backend, ref, sha)] = index
        return self.verify_index(name)

    # ------------------------------------------------------------------ concepts and search

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


SPEC_HINT = ("use a FAISS factory string such as Flat, HNSW32 or IVF1024,Flat (search parameters after '|', "
             "e.g. HNSW32|efSearch=128), or auto")


def _row_location(row: AtlasRow) -> IndexLocation:
    return IndexLocation(row.index_backend or FAISS, row.index_uri)


def _cache_key(name: str, backend: str | None, ref: str, sha: str | None) -> tuple[str, str]:
    """How `Store.index` caches an open index: a FAISS file by its checksum, a collection by its name."""
    if backend not in (None, FAISS):
        return (name, f"{backend}:{ref}")
    return (name, sha or "")


def _new_index(dim: int, spec: str, backend: str = FAISS, **location: str) -> indexes.VectorIndex:
    """An empty index of ``spec``; a spec the backend does not understand is the user's `BadValueError`."""
    try:
        return indexes.create_index(dim, spec, backend, **location)
    except indexes.IndexSpecError as e:
        raise BadValueError(f"{e}; {SPEC_HINT}") from None


def build_index(x: np.ndarray, spec: str, backend: str = FAISS, **location: str) -> indexes.VectorIndex:
    """An index of ``spec`` over the rows of ``x`` scaled to unit norm (ids = row numbers), built a
    chunk of rows at a time in memory (FAISS) or in a new collection at ``location`` (Milvus:
    dropped again if this fails), and checked.

    ``x`` may be a memory map (the atlas's vector file): it is trained on an even sample of at most
    `TRAIN_SAMPLE` rows where the structure needs training, then filled chunk by chunk, each
    chunk's pages released after use, so the build holds the index and one chunk. Then a few rows
    are searched: a spec that cannot be built on these vectors, or an index that finds nothing, is
    a `BadValueError`.
    """
    n, d = x.shape
    index = _new_index(d, spec, backend, **location)
    try:
        try:
            if index.needs_training:
                rows = np.unique(np.linspace(0, n - 1, min(n, TRAIN_SAMPLE)).astype(np.int64))
                index.train(unit_rows(x[rows]))
            for lo, chunk in row_chunks(x):
                index.add(unit_rows(chunk), np.arange(lo, lo + len(chunk), dtype=np.int64))
            probe = unit_rows(x[np.unique(np.linspace(0, n - 1, min(n, 8)).astype(np.int64))])
            _, ids = index.search(probe, min(n, 5))
        except (RuntimeError, ValueError) as e:
            raise BadValueError(f"index spec {spec!r} does not work on {n} vectors of dim {d} "
                                f"({faiss_reason(e)}); {SPEC_HINT}") from None
        if index.count() != n or (ids < 0).all(axis=1).any():
            raise BadValueError(f"index spec {spec!r} built an index that does not find the atlas's own vectors; "
                                f"{SPEC_HINT}")
    except BaseException:
        if isinstance(index, MilvusIndex):
            index.drop()
        raise
    return index


def write_index(index: indexes.VectorIndex, path: Path) -> None:
    """`VectorIndex.write` with a folder that cannot be written as a one-line `ReadOnlyStoreError`."""
    write_store_file_with(path, lambda tmp: index.write(tmp))


def write_vectors(path: Path, x: np.ndarray, encoder: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write an atlas's vector file (directions, then encoder tensors) a chunk of rows at a time,
    checking each chunk of directions (`check_rows`); returns the file's sha256."""
    shapes = {layout.DIRECTIONS_KEY: (x.shape, np.dtype(np.float32)),
              **{k: (v.shape, np.dtype(np.float32)) for k, v in encoder.items()}}

    def chunks():
        for lo, chunk in row_chunks(x):
            yield layout.DIRECTIONS_KEY, check_rows(chunk, first_row=lo)
        for key, v in encoder.items():
            for _, chunk in row_chunks(v):
                yield key, chunk

    return write_tensor_file(path, shapes, chunks(), metadata)


def _stamp_columns(kind: str, stamp: FileStamp | None) -> dict[str, Any]:
    """The row's cached stamp columns of its ``kind`` file (all ``None``: no file, a Milvus collection)."""
    if stamp is None:
        return {f"{kind}_size": None, f"{kind}_mtime_ns": None, f"{kind}_head_sha256": None}
    return {f"{kind}_size": stamp.size, f"{kind}_mtime_ns": stamp.mtime_ns, f"{kind}_head_sha256": stamp.head_sha256}


def _cached_stamp(row: AtlasRow, kind: str) -> FileStamp | None:
    size, mtime, head = (getattr(row, f"{kind}_{c}") for c in ("size", "mtime_ns", "head_sha256"))
    return None if size is None or mtime is None or head is None else FileStamp(size, mtime, head)


def check_vectors(vectors: Any, what: str = "atlas vectors") -> np.ndarray:
    """``vectors`` as a float32 (n, d) matrix of usable directions, or a `ShapeError` saying why not
    (`check_matrix`, then `check_rows`)."""
    return check_rows(check_matrix(vectors, what), what=what)


def check_matrix(vectors: Any, what: str = "atlas vectors") -> np.ndarray:
    """``vectors`` as a non-empty 2-D array of real numbers (a memory map stays one: nothing is
    read), or a `ShapeError` (strings, objects, complex values, other shapes)."""
    try:
        x = np.asanyarray(vectors)
    except (ValueError, TypeError) as e:
        raise ShapeError(f"{what} are not an array of numbers ({e})") from None
    if x.dtype.kind not in "fiu":
        raise ShapeError(f"{what} must be real numbers (float or int), got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ShapeError(f"{what} must be a non-empty 2-D matrix (n_concepts, d), got {x.shape}")
    return x


def check_rows(x: np.ndarray, what: str = "atlas vectors", first_row: int = 0) -> np.ndarray:
    """Rows of a matrix (a chunk starting at row ``first_row``) as float32 usable directions.

    Refused: NaN or infinite values (also after the cast to float32), all-zero rows (no
    direction) and rows whose norm overflows float32 (unit-normalising them gives zeros).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ShapeError(f"{what} contain NaN or infinite values (or values beyond float32's range)")
        norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms))
    if len(bad):
        raise ShapeError(f"{what}: row {first_row + bad[0]} has a norm beyond float32's range ({len(bad)} such "
                         "rows in its chunk); scale the vectors down")
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ShapeError(f"{what}: row {first_row + zero[0]} is all zeros ({len(zero)} such rows in its chunk); "
                         "a concept needs a direction")
    return x


def check_encoder(encoder: dict[str, np.ndarray] | None, n: int, d: int) -> dict[str, np.ndarray]:
    """The SAE encoder tensors kept with an atlas, each checked against d_in = ``d``, d_sae = ``n``."""
    # k: a TopK SAE's number of active latents, kept as a one-element tensor (engine.atlas.encoder)
    shapes = {"W_enc": (d, n), "b_enc": (n,), "b_dec": (d,), "threshold": (n,), "k": (1,)}
    out = {}
    for key, value in (encoder or {}).items():
        if value is None:
            continue
        if key not in shapes:
            raise ShapeError(f"unknown encoder tensor {key!r} (known: {', '.join(shapes)})")
        v = np.asanyarray(value)  # a memory map stays one: checked below a chunk of rows at a time
        if v.dtype.kind not in "fiu":
            raise ShapeError(f"encoder tensor {key} must be real numbers, got dtype {v.dtype}")
        if v.shape != shapes[key]:
            raise ShapeError(f"encoder tensor {key} has shape {v.shape}; with d_in={d}, d_sae={n} it must be "
                             f"{shapes[key]}")
        for _, chunk in row_chunks(v):
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(np.asarray(chunk, dtype=np.float32)).all():
                    raise ShapeError(f"encoder tensor {key} contains NaN or infinite values")
        out[key] = v
    return out


def ensure_model(s: Session, name: str) -> ModelRow:
    """The row of model ``name``, inserted first if missing, race-free: an upsert
    (``INSERT ... ON CONFLICT DO NOTHING``) where the database has one, so two writers adding the
    same new model both get its one row."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = s.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        values = dict(name=name, extra={}, created_at=utcnow())
        stmt = (sqlite.insert(ModelRow).values(**values).on_conflict_do_nothing(index_elements=["name"])
                if dialect == "sqlite" else
                postgresql.insert(ModelRow).values(**values).on_conflict_do_nothing(index_elements=["name"]))
        s.execute(stmt)
        row = s.scalar(select(ModelRow).where(ModelRow.name == name))
        assert row is not None
        return row
    return get_or_create_model(s, name)
