"""Atlases: the ``atlases`` and ``concepts`` rows, their vector files and indexes (`AtlasesMixin`).

Why writes are ordered the way they are: the vector file is the source of truth and the index is
derived from it, so an atlas is validated and its index built in memory first, then written
files-first (each file to a temporary name, fsync'd, then renamed) under file names this write
owns (`engine.store.layout`), and committed to the database last, in one short transaction that
claims the files. A crash at any point leaves either no atlas (and unclaimed files, which
`Store.gc` removes) or a complete one; a failed write removes only the files it wrote. The
database holds the checksum and count of every file, so a stale or corrupt index is detected when
it is opened, and `Store.rebuild_index` restores it from the vectors (a new file, the row switched
to it, then the old file removed). The vectors are checked and written by `engine.store.vectorfiles`;
removal is `engine.store.removal`; the reads (atlases, concepts, opening the files, search) are
`engine.store.reads`.

An atlas's index is a FAISS file or a Milvus collection (`engine.store.index_location`, which owns
what differs between them: the code here never asks which one an atlas has to write it): the same
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
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import indexes
from engine.errors import (
    BadValueError,
    DuplicateError,
    IndexIntegrityError,
    IndexUnavailableError,
    NotFoundError,
    ShapeError,
    SiteMismatchError,
)
from engine.store import layout, postgres
from engine.store.base import StoreBase
from engine.store.blocksums import BlockSums
from engine.store.index_location import FAISS, IndexPlacement, parse_index_uri, resolve_spec
from engine.store.models import get_or_create_model
from engine.store.records import AtlasInfo, cached_stamp, row_location
from engine.store.schema import AtlasRow, ConceptRow, ModelRow
from engine.store.vectorfiles import check_encoder, check_matrix, open_tensors, write_vectors
from engine.util import FileStamp, check_name, failpoint, file_stamp, unit_rows, utcnow
from indexes.milvus import MilvusIndex

# The hook points an atlas's directions can live at (the sites SAE releases name: SAELens, Llama Scope,
# dictionary_learning, sparsify); a hook is one of these words, never a path.
ATLAS_HOOKS = ("resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out")
ANALYZE_MIN_ROWS = 1000  # PostgreSQL: an import of this many concepts refreshes the planner's statistics
CONCEPT_BATCH = 50_000  # concept rows per INSERT on import: ~50 MB of row dicts at a time


@dataclasses.dataclass(frozen=True)
class AtlasSource:
    """Where an atlas's directions come from: the model and site they live in (``hook`` ``None``:
    ``resid_post``), the model's revision, and the kind and reference of the file they were read from.
    An importer may leave ``model`` and ``layer`` out where the file records them; `add_atlas` needs them."""

    model: str | None = None
    layer: int | None = None
    hook: str | None = None
    revision: str | None = None
    kind: str = "matrix"
    ref: str | None = None


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    atlas: str
    ok: bool
    problem: str | None
    spec: str
    expected_count: int
    index_count: int | None
    backend: str = FAISS
    # files ("vector", "index") without block checksums (written before they were kept): read unchecked
    # by block (`engine.store.blocksums`); ``fixed``: those `verify_index(fix=True)` recorded them for
    unchecked: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()


class AtlasesMixin(StoreBase):
    """Store methods over atlases, their vector files and indexes."""

    def add_atlas(
        self,
        name: str,
        vectors: np.ndarray,
        labels: Sequence[str | None] | None = None,
        descriptions: Sequence[str | None] | None = None,
        *,
        source: AtlasSource,
        index: IndexPlacement = IndexPlacement(),
        raw_residuals: bool = True,
        encoder: dict[str, np.ndarray] | None = None,
        densities: Sequence[float | None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AtlasInfo:
        """Create an atlas from ``vectors`` (n, d), one label per row (``None`` = unlabelled).

        Unlabelled concepts keep their ordinal as label and are marked ``labelled=False``.
        ``source`` says where the directions live (its ``model`` and ``layer`` are needed);
        ``index`` how and where its index is built (`engine.store.index_location`; default a Flat FAISS file).
        """
        self.check_writable()
        check_name(name, "atlas")
        if source.model is None or source.layer is None:
            raise BadValueError("an atlas needs the model and layer its directions live in")
        x = check_matrix(vectors)  # not read yet: a memory-mapped source stays on disk
        n, d = x.shape
        index_spec = resolve_spec(index.spec, n, d)
        labels = list(labels) if labels is not None else [None] * n
        descriptions = list(descriptions) if descriptions is not None else [None] * n
        for what, seq in (("labels", labels), ("descriptions", descriptions), ("densities", densities)):
            if seq is not None and len(seq) != n:
                raise ShapeError(f"{len(seq)} {what} for {n} vectors: one per concept (row) is needed")
        enc = check_encoder(encoder, n, d)
        loc = index.location(self.path)
        with self.read_session() as s:  # early, friendly; checked again under the write lock
            if s.scalar(select(AtlasRow.id).where(AtlasRow.name == name)) is not None:
                raise DuplicateError(f"an atlas named {name!r} exists; pick another --name or remove it first")
            check_site(s.scalar(select(ModelRow).where(ModelRow.name == source.model)), source, d)
        loc.check_spec(d, index_spec)  # a spec the backend does not understand writes no file
        token = self.claim_token()  # before the first file: `Store.gc` keeps this write's files
        vec_rel, placed, committing = layout.vector_file(name, token), None, False
        hook = source.hook or "resid_post"
        try:
            vec_sha, vec_blocks = write_vectors(self.path / vec_rel, x, enc, {
                "atlas": name, "model": source.model, "layer": str(source.layer), "hook": hook})
            failpoint("add_atlas.vectors_written")
            vec_stamp = file_stamp(self.path / vec_rel)
            # built from the file just written, a chunk at a time, under this write's own file or
            # collection name (removed on a failure in it, or in the block below)
            placed = loc.place(open_tensors(self.path / vec_rel)[layout.DIRECTIONS_KEY], index_spec, self.path,
                               name, token)
            failpoint("add_atlas.index_written")
            committing = True  # a failure from here on may come after a commit that landed: read back
            try:
                with self.session() as s:  # the write lock is held from here to the commit only
                    if s.scalar(select(AtlasRow.id).where(AtlasRow.name == name)) is not None:
                        raise DuplicateError(f"an atlas named {name!r} exists (written while this import ran); "
                                             "pick another --name or remove it first")
                    model_row = ensure_model(s, source.model)
                    if model_row.d_model is None:
                        model_row.d_model = d
                    atlas = AtlasRow(
                        name=name, model_id=model_row.id, layer=source.layer, hook=hook, dim=d, n_concepts=n,
                        metric="cosine", raw_residuals=raw_residuals, source_kind=source.kind,
                        source_ref=source.ref, vector_file=vec_rel, vector_sha256=vec_sha,
                        index_file=placed.ref, index_spec=index_spec, index_backend=loc.backend, index_uri=loc.uri,
                        index_sha256=placed.sha256, index_count=placed.index.count(),
                        **_stamp_columns("vector", vec_stamp), **_stamp_columns("index", placed.stamp),
                        vector_blocks=vec_blocks.text(), index_blocks=placed.blocks.text() if placed.blocks else None,
                        extra={**(extra or {}), "revision": source.revision, "has_encoder": bool(enc)},
                    )
                    s.add(atlas)
                    s.flush()
                    for lo in range(0, n, CONCEPT_BATCH):  # batches: 1M row dicts at once would cost GBs
                        s.execute(insert(ConceptRow), [
                            dict(
                                atlas_id=atlas.id, ordinal=i,
                                label=str(labels[i]) if labels[i] not in (None, "") else str(i),
                                description=descriptions[i], labelled=labels[i] not in (None, ""),
                                source_kind=source.kind, source_ref=source.ref,
                                density=None if densities is None else densities[i], extra={},
                            )
                            for i in range(lo, min(n, lo + CONCEPT_BATCH))
                        ])
                    failpoint("add_atlas.before_commit")
            except IntegrityError:  # another database than SQLite: the unique name decides
                raise DuplicateError(f"an atlas named {name!r} exists (written while this import ran); "
                                     "pick another --name or remove it first") from None
            self._attach_raw(name, placed.index)
            self._indexes[loc.cache_key(name, placed.ref, placed.sha256)] = placed.index
        except BaseException as e:
            # After the commit began, whether it landed is read back (the error may be a connection
            # dropped as the commit returned): a committed row owns these files, so they are kept; an
            # answer that cannot be read (the database still away) keeps them too (`Store.gc` removes
            # them once this process is gone, if no row claims them).
            committed = self._committed(AtlasRow.vector_file, vec_rel) if committing else False
            if committed is False:
                (self.path / vec_rel).unlink(missing_ok=True)
                if placed is not None:
                    loc.discard(self.path, placed.ref)
            if not committed or not isinstance(e, Exception):
                raise
            # committed: the import is done; only its answer was lost
        finally:
            self.release_claim(token)
        if self.engine.dialect.name == "postgresql" and n >= ANALYZE_MIN_ROWS:
            postgres.analyze(self.engine, "concepts")
        return self.atlas(name)

    def _committed(self, column: Any, value: str) -> bool | None:
        """Whether an atlas row with ``column == value`` (a file a write named with its own token)
        is committed: read back after a write's commit failed, since a connection that drops as the
        commit returns leaves it unknown (`ConnectionLostError`). ``None``: the database cannot say now."""
        try:
            with self.read_session() as s:
                return s.scalar(select(AtlasRow.id).where(column == value)) is not None
        except Exception:  # noqa: BLE001 - the database still away: unknown, never "not committed"
            return None

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

    # ------------------------------------------------------------------ vectors and index

    def atlas_files(self, name: str) -> dict[str, str]:
        """The files an atlas's row claims, relative to the store root (``vectors``, ``index``,
        and ``labels`` where a label-embedding index exists); a Milvus-held atlas has its
        ``collection`` instead of an ``index`` file."""
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            out = {"vectors": row.vector_file}
            out["index" if row.index_backend in (None, FAISS) else "collection"] = row.index_file
            label_files = layout.label_index_files(name, row.extra, legacy=False)
            if label_files:
                out["labels"] = label_files[0]
            return out

    def index_identity(self, name: str) -> dict[str, Any]:
        """What identifies an atlas's index now: its backend, spec, and its file's checksum (a FAISS
        file: equal bytes answer equally) or, for a Milvus collection, its name. A labelling run
        records it and refuses to resume on another (`engine.labelling.run`)."""
        with self.read_session() as s:
            return index_identity(self._atlas_row(s, name))

    def _remember_stamp(self, name: str, kind: str, path: Path, stamp: FileStamp) -> None:
        with self.session() as s:  # only if the row still names this file
            row = s.scalar(select(AtlasRow).where(AtlasRow.name == name))
            if row is not None and self.path / getattr(row, f"{kind}_file") == path:
                for key, value in _stamp_columns(kind, stamp).items():
                    setattr(row, key, value)

    def verify_index(self, name: str, fix: bool = False) -> IndexStatus:
        """Check an atlas's vector file and index without raising; says what is wrong.

        Each file's full sha256 and its block checksums are computed in one pass. A file without
        recorded block checksums (written before they were kept) is listed in ``unchecked``; with
        ``fix`` its checksums are recorded (the ones of the file as it is, which its full sha256 has
        just shown to be the file as written) and it is listed in ``fixed`` instead."""
        info = self.atlas(name)
        count = None
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            files = [(kind, self.path / getattr(row, f"{kind}_file"), getattr(row, f"{kind}_sha256"),
                      cached_stamp(row, kind), BlockSums.parse(getattr(row, f"{kind}_blocks")))
                     for kind in ("vector", "index")]
        unchecked: list[str] = []
        fixed: list[str] = []
        try:
            for kind, path, sha, cached, recorded in files:  # the full sha256 of each file, read in chunks
                if kind == "index" and info.index_backend not in (None, FAISS):
                    continue  # a collection: its count and stored vectors are checked below
                try:
                    sums = self.check_file(name, kind, path, sha, cached, full=True)
                except FileNotFoundError:
                    if kind == "vector":
                        self.atlas_tensors(name)  # its one message for a missing vector file
                    break  # a missing index: `index` says so (or finds the file a rebuild switched to)
                if recorded == sums or sums is None:
                    continue
                if fix and self._record_blocks(name, kind, path, sha, sums):
                    fixed.append(kind)
                elif recorded is None:
                    unchecked.append(kind)
                else:
                    raise IndexIntegrityError(
                        f"the block checksums recorded for the {kind} file of atlas {name!r} do not match the file, "
                        f"whose full sha256 does: the record is damaged; `atlas index verify {name} --fix` rewrites it")
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
            return IndexStatus(name, False, str(e), info.index_spec, info.n_concepts, count, info.index_backend,
                               tuple(unchecked), tuple(fixed))
        return IndexStatus(name, True, None, info.index_spec, info.n_concepts, count, info.index_backend,
                           tuple(unchecked), tuple(fixed))

    def _record_blocks(self, name: str, kind: str, path: Path, sha: str, sums: BlockSums) -> bool:
        """Record ``sums`` as the block checksums of an atlas's ``kind`` file, if its row still names
        that file with that sha256 (a rebuild or re-import meanwhile wrote its own); whether it did."""
        self.check_writable()
        with self.session() as s:
            row = s.scalar(select(AtlasRow).where(AtlasRow.name == name))
            if row is None or self.path / getattr(row, f"{kind}_file") != path or getattr(row, f"{kind}_sha256") != sha:
                return False
            setattr(row, f"{kind}_blocks", sums.text())
        return True

    def rebuild_index(self, name: str, spec: str | None = None, index_uri: str | None = None) -> IndexStatus:
        """Rebuild the index from the vector file (optionally with another spec, or in another place:
        ``index_uri`` as `add_atlas` takes it, e.g. to move an atlas to Milvus or back), atomically.

        The new index is built and checked, written under a new file or collection name, and the row
        switched to it in one transaction; only then is the old one removed. A crash at any point
        leaves the old index (and an unclaimed new one, which `Store.gc` removes) or the new one.
        """
        self.check_writable()
        info = self.atlas(name)
        spec = resolve_spec(info.index_spec if spec is None else spec, info.n_concepts, info.dim)
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            vec_sha, vec_path, cached = row.vector_sha256, self.path / row.vector_file, cached_stamp(row, "vector")
            old_loc, old_ref = row_location(row), row.index_file
        loc = old_loc if index_uri is None else parse_index_uri(index_uri, self.path)
        try:  # the source of the new index: its full checksum first
            self.check_file(name, "vector", vec_path, vec_sha, cached, full=True)
        except FileNotFoundError:
            self.atlas_tensors(name)  # its one message for a missing vector file
        # a chunk at a time from the mapped file
        token = self.claim_token()  # before the file: `Store.gc` keeps it until the row claims it
        try:
            placed = loc.place(self.atlas_vectors(name), spec, self.path, name, token)
        except BaseException:
            self.release_claim(token)
            raise
        index, ref, sha = placed.index, placed.ref, placed.sha256
        try:
            failpoint("rebuild.file_written")
            with self.session() as s:
                row = self._atlas_row(s, name)
                if row.vector_sha256 != vec_sha:
                    raise NotFoundError(f"atlas {name!r} was replaced while its index was rebuilt; rebuild again")
                old_loc, old_ref = row_location(row), row.index_file
                row.index_file, row.index_spec, row.index_backend, row.index_uri = ref, spec, loc.backend, loc.uri
                row.index_sha256, row.index_count = sha, index.count()
                row.index_blocks = placed.blocks.text() if placed.blocks else None
                for key, value in _stamp_columns("index", placed.stamp).items():
                    setattr(row, key, value)
        except BaseException as e:
            committed = self._committed(AtlasRow.index_file, ref)  # read back, as `add_atlas` does
            if committed is False:
                loc.discard(self.path, ref)
            if not committed or not isinstance(e, Exception):
                raise
        finally:
            self.release_claim(token)
        failpoint("rebuild.committed")
        if (old_loc, old_ref) != (loc, ref):
            old_loc.discard(self.path, old_ref)
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
        self._attach_raw(name, index)
        self._indexes[loc.cache_key(name, ref, sha)] = index
        return self.verify_index(name)


def check_site(model: ModelRow | None, source: AtlasSource, d: int) -> None:
    """Refuse an atlas site its model cannot have: a hook not in `ATLAS_HOOKS`, a negative layer, and,
    where the model is registered (`atlas models add`: its source, architecture or depth recorded), a
    layer past its last or a width other than its ``d_model``. A model row an earlier import created
    (only its width, taken from that atlas) is not checked against: it says nothing the import did not."""
    hook, layer = source.hook or "resid_post", source.layer
    if hook not in ATLAS_HOOKS:
        raise BadValueError(f"hook {str(hook)[:60]!r} is not a site an atlas can live at; use one of "
                            f"{', '.join(ATLAS_HOOKS)}")
    if layer is None or isinstance(layer, bool) or int(layer) != layer or layer < 0:
        raise BadValueError(f"layer {layer!r} is not a block index; layers count from 0")
    if model is None or (model.source is None and model.architecture is None and model.n_layers is None):
        return
    if model.n_layers is not None and layer >= model.n_layers:
        raise SiteMismatchError(f"model {model.name!r} has {model.n_layers} layers (0-{model.n_layers - 1}); "
                                f"--layer {layer} is not one of them")
    if model.d_model is not None and d != model.d_model:
        raise SiteMismatchError(f"these directions have d={d}, model {model.name!r} has d_model={model.d_model}; "
                                "they were not read from this model's residual stream")


def index_identity(row: AtlasRow) -> dict[str, Any]:
    """`AtlasesMixin.index_identity` of an atlas row."""
    backend = row.index_backend or FAISS
    return {"backend": backend, "spec": row.index_spec,
            **({"sha256": row.index_sha256} if backend == FAISS else {"collection": row.index_file})}


def _stamp_columns(kind: str, stamp: FileStamp | None) -> dict[str, Any]:
    """The row's cached stamp columns of its ``kind`` file (all ``None``: no file, a Milvus collection)."""
    if stamp is None:
        return {f"{kind}_size": None, f"{kind}_mtime_ns": None, f"{kind}_head_sha256": None}
    return {f"{kind}_size": stamp.size, f"{kind}_mtime_ns": stamp.mtime_ns, f"{kind}_head_sha256": stamp.head_sha256}


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
