"""Reads of atlases and concepts, and the search of an atlas's index, in plain SQL (`StoreReads`).

Why plain SQL: these are the reads of the one-shot commands (``atlas show``, ``neighbors``,
``lookup``), which must answer in a fraction of a second on a 1M-concept store, where importing
SQLAlchemy alone takes ~0.2 s (issue 26). So each query is written once here, with ``:name``
parameters (taken alike by SQLAlchemy's ``text`` and by the ``sqlite3`` driver), and run by whichever
object holds the mixin: the `Store` through its read sessions, on SQLite or PostgreSQL
(`engine.store.base.StoreBase.read`), or the plain ``sqlite3`` reader of the one-shot commands
(`engine.store.reader.StoreReader`). This module imports neither SQLAlchemy nor the ORM schema; the
writes of these tables are `engine.store.atlases`, which explains the files' checksums and stamps.
The files' per-block checksums (`engine.store.blocksums`) are checked here, by every read, on both
paths: a read of a few rows checks their blocks (`atlas_rows`, `checked_rows`), a read of a whole
file (`atlas_vectors`, an index opened for a search) every block, once per opened store.

A concept is a row of its atlas (``<atlas>/<ordinal>``). `StoreReads.search_arrays` is the one
search of an atlas's index: vectors in atlas coordinates scaled to unit norm (or subject vectors
turned into them batch by batch: `engine.search` projects them through a map), ``batch_size`` a
call; `search_vectors` and `engine.search.search` join its results with the concepts' labels into
`Hit` lists (`hits`). Text queries of the labels are `engine.atlas.lookup`; the records the reads
return are `engine.store.records`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import indexes
from engine.errors import IndexIntegrityError, IndexUnavailableError, NotFoundError, ShapeError
from engine.store import layout
from engine.store.blocksums import BlockCheck, BlockSums, CheckedRows, file_sums
from engine.store.index_location import FAISS, IndexLocation
from engine.store.records import (
    AtlasInfo,
    AtlasRecord,
    Concept,
    Hit,
    cached_stamp,
    json_value,
    parse_concept_ref,
    row_location,
)
from engine.store.vectorfiles import open_tensors
from engine.util import FileStamp, check_k, file_stamp, unit_rows
from indexes.milvus import MilvusIndex, MilvusUnavailableError

SEARCH_BATCH = 8192  # queries per index call: large enough to run at GEMM speed, ~25 MB at d=768
IN_CHUNK = 900  # ordinals per ``IN (...)``: under SQLite's bound-parameter limit


# The columns of an atlas row the reads use, in `AtlasRecord`'s order (the model's name joined in).
_ATLAS_COLUMNS = ("a.id", "a.name", "m.name", "a.layer", "a.hook", "a.dim", "a.n_concepts", "a.metric",
                  "a.source_kind", "a.source_ref", "a.index_spec", "a.raw_residuals", "a.vector_file",
                  "a.vector_sha256", "a.index_file", "a.index_backend", "a.index_uri", "a.index_sha256",
                  "a.index_count", "a.vector_size", "a.vector_mtime_ns", "a.vector_head_sha256", "a.index_size",
                  "a.index_mtime_ns", "a.index_head_sha256", "a.extra")
_ATLAS_SELECT = f"SELECT {', '.join(_ATLAS_COLUMNS)} FROM atlases a LEFT JOIN models m ON m.id = a.model_id"
_CONCEPT_COLUMNS = ("ordinal", "label", "description", "labelled", "source_kind", "source_ref", "density", "extra")
_CONCEPT_SELECT = f"SELECT {', '.join(_CONCEPT_COLUMNS)} FROM concepts WHERE atlas_id = :atlas_id"


class StoreReads:
    """The reads of atlases and concepts and the search of their indexes, over `read`.

    A holder provides ``path`` (the store's folder), ``readonly``, ``_indexes`` (the opened indexes by
    `IndexLocation.cache_key`), ``_blocks`` (the blocks of its files found intact: a `BlockCheck`),
    `read` and `_remember_stamp`."""

    path: Path
    readonly: bool
    _indexes: dict[tuple[str, str], indexes.VectorIndex]
    _blocks: BlockCheck

    @property
    def dialect(self) -> str:
        """The database's kind: ``sqlite`` or ``postgresql``."""
        raise NotImplementedError

    def read(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement with ``:name`` parameters."""
        raise NotImplementedError

    def _remember_stamp(self, name: str, kind: str, path: Path, stamp: FileStamp) -> None:
        """Cache a checked file's new stamp in its atlas's row (only if the row still names ``path``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ atlases

    def atlas_record(self, name: str | None = None) -> AtlasRecord:
        """The named atlas's row; with ``None``, the only atlas of the store."""
        if name is None:
            rows = self.read(f"{_ATLAS_SELECT} LIMIT 2")
            if len(rows) == 1:
                return AtlasRecord.from_row(rows[0])
            if not rows:
                raise NotFoundError("the store has no atlas yet; `atlas import-sae` adds one")
            raise NotFoundError("the store has several atlases; name one (`atlas atlases` lists them)")
        rows = self.read(f"{_ATLAS_SELECT} WHERE a.name = :name", {"name": name})
        if not rows:
            raise NotFoundError(f"no atlas named {name!r}; `atlas atlases` lists them")
        return AtlasRecord.from_row(rows[0])

    def atlas_info(self, record: AtlasRecord) -> AtlasInfo:
        """An atlas's `AtlasInfo`: its row and its number of labelled concepts (a count of its rows)."""
        n = self.read("SELECT count(*) FROM concepts WHERE atlas_id = :atlas_id AND labelled = :yes",
                      {"atlas_id": record.id, "yes": True})[0][0]
        return record.info(int(n or 0))

    def atlas(self, name: str | None = None) -> AtlasInfo:
        """The named atlas; with ``None``, the only atlas of the store."""
        return self.atlas_info(self.atlas_record(name))

    def atlas_records(self) -> list[AtlasRecord]:
        """Every atlas's row, by name (no count of their concepts: see `atlases`)."""
        return [AtlasRecord.from_row(r) for r in self.read(f"{_ATLAS_SELECT} ORDER BY a.name")]

    def atlases(self) -> list[AtlasInfo]:
        return [self.atlas_info(r) for r in self.atlas_records()]

    # ------------------------------------------------------------------ concepts

    def concept(self, ref: str | int, atlas: str | None = None) -> Concept:
        """A concept by ``"<atlas>/<ordinal>"``, or by ordinal within ``atlas`` (or the only atlas)."""
        atlas_name, ordinal = parse_concept_ref(ref, atlas)
        record = self.atlas_record(atlas_name)
        rows = self.read(f"{_CONCEPT_SELECT} AND ordinal = :ordinal", {"atlas_id": record.id, "ordinal": ordinal})
        if not rows:
            raise NotFoundError(
                f"atlas {record.name!r} has no concept {ordinal} (ordinals run 0..{record.n_concepts - 1})"
            )
        return _concept(record.name, rows[0])

    def concepts(self, atlas: str | None = None, ordinals: Sequence[int] | None = None) -> list[Concept]:
        """Concepts of an atlas, all or those at ``ordinals`` (in that order)."""
        record = self.atlas_record(atlas)
        if ordinals is None:
            return [_concept(record.name, r)
                    for r in self.read(f"{_CONCEPT_SELECT} ORDER BY ordinal", {"atlas_id": record.id})]
        wanted = [int(o) for o in ordinals]
        by_ord: dict[int, tuple[Any, ...]] = {}
        for chunk in range(0, len(wanted), IN_CHUNK):
            part = wanted[chunk : chunk + IN_CHUNK]
            marks = ", ".join(f":o{i}" for i in range(len(part)))
            params = {"atlas_id": record.id, **{f"o{i}": o for i, o in enumerate(part)}}
            by_ord.update((int(r[0]), r) for r in self.read(f"{_CONCEPT_SELECT} AND ordinal IN ({marks})", params))
        missing = [o for o in wanted if o not in by_ord]
        if missing:
            raise NotFoundError(f"atlas {record.name!r} has no concepts {missing[:5]}")
        return [_concept(record.name, by_ord[o]) for o in wanted]

    def concepts_at(self, refs: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Concept]:
        """Concepts of any atlases by (atlas name, ordinal), in one statement (`concepts` reads one atlas's, after
        its row); a ref that names no concept is a `NotFoundError`."""
        wanted = list(dict.fromkeys((str(a), int(o)) for a, o in refs))
        columns = ", ".join(f"c.{col}" for col in _CONCEPT_COLUMNS)
        found: dict[tuple[str, int], Concept] = {}
        for chunk in range(0, len(wanted), IN_CHUNK):
            by_atlas: dict[str, list[int]] = {}
            for a, o in wanted[chunk : chunk + IN_CHUNK]:
                by_atlas.setdefault(a, []).append(o)
            parts: list[str] = []
            params: dict[str, Any] = {}
            for j, (a, ords) in enumerate(by_atlas.items()):
                parts.append(f"SELECT a.name, {columns} FROM concepts c JOIN atlases a ON a.id = c.atlas_id "
                             f"WHERE a.name = :a{j} AND c.ordinal IN ({', '.join(f':o{j}_{i}' for i in range(len(ords)))})")
                params |= {f"a{j}": a, **{f"o{j}_{i}": o for i, o in enumerate(ords)}}
            found.update(((r[0], int(r[1])), _concept(r[0], r[1:])) for r in self.read(" UNION ALL ".join(parts), params))
        missing = [f"{a}/{o}" for a, o in wanted if (a, o) not in found]
        if missing:
            raise NotFoundError(f"no concepts {missing[:5]} in the store")
        return found

    def labels(self, atlas: str | None = None) -> list[str]:
        """Labels of all concepts in ordinal order (cheap: no full rows)."""
        record = self.atlas_record(atlas)
        return [r[0] for r in self.read("SELECT label FROM concepts WHERE atlas_id = :atlas_id ORDER BY ordinal",
                                        {"atlas_id": record.id})]

    # ------------------------------------------------------------------ vectors and index

    def atlas_tensors(self, name: str) -> dict[str, np.ndarray]:
        """All tensors of the atlas vector file as read-only memory maps, after the file's cheap
        integrity check (`check_file`: its stamp, or its full checksum when the stamp changed) and
        the check of every block (`check_blocks`: once per opened store). A reader of a few rows
        checks only theirs (`atlas_rows`, `checked_rows`)."""
        path, name, sums = self._vector_file(name)
        try:
            if sums is not None:
                self.check_blocks(name, "vector", path, sums, range(len(sums.hashes)))
            return open_tensors(path)
        except FileNotFoundError:
            self._vector_file(name)  # its one message for a missing vector file
            raise

    def _vector_file(self, name: str) -> tuple[Path, str, BlockSums | None]:
        """An atlas's vector file after its cheap check (`check_file`), its name and its block sums."""
        record = self.atlas_record(name)
        path, name = self.path / record.vector_file, record.name
        sums = self.block_sums(record, "vector")
        try:
            self.check_file(name, "vector", path, record.vector_sha256, cached_stamp(record, "vector"))
        except FileNotFoundError:
            raise IndexIntegrityError(
                f"the vector file of atlas {name!r} is missing ({path}); it is the source of truth "
                "and cannot be rebuilt: re-import the atlas"
            ) from None
        return path, name, sums

    def block_sums(self, record: AtlasRecord, kind: str) -> BlockSums | None:
        """The block checksums recorded for an atlas's ``kind`` file (``"vector"`` or ``"index"``),
        ``None`` for a file written before they were kept (or no longer the row's). Read apart from `atlas_record` (a 3 GB
        file has 48 KB of them): only the reads that check blocks load them."""
        file_column, column = {"vector": ("vector_file", "vector_blocks"), "index": ("index_file", "index_blocks")}[kind]
        rows = self.read(f"SELECT {column} FROM atlases WHERE id = :id AND {file_column} = :file",
                         {"id": record.id, "file": getattr(record, file_column)})
        return BlockSums.parse(rows[0][0]) if rows else None  # no row: a rewrite replaced the file meanwhile

    def atlas_vectors(self, name: str, normalized: bool = False) -> np.ndarray:
        """The atlas directions (n_concepts, d) as imported (a read-only memory map: rows are read
        when used; every block of the file checked first), or unit-norm with ``normalized`` (in memory).
        A read of a few rows is `atlas_rows`, which checks only their blocks."""
        x = self.atlas_tensors(name)[layout.DIRECTIONS_KEY]
        return unit_rows(x) if normalized else x

    def atlas_rows(self, name: str, ordinals: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``ordinals`` of the atlas directions as imported, (len, d) float32 in memory, after
        the check of the blocks that hold them only (`CheckedRows`)."""
        return self.checked_rows(name)[np.asarray(ordinals, dtype=np.int64)]

    def checked_rows(self, name: str) -> CheckedRows:
        """The atlas directions as a `CheckedRows`: each read checks the blocks of the rows it reads."""
        path, name, sums = self._vector_file(name)
        x = open_tensors(path)[layout.DIRECTIONS_KEY]
        if sums is None:  # a file written before block checksums: its stamp is all there is to check
            return CheckedRows(x, None)
        return CheckedRows(x, (sums.block_bytes, lambda blocks: self.check_blocks(name, "vector", path, sums, blocks)))

    def check_blocks(self, name: str, kind: str, path: Path, sums: BlockSums, blocks: Iterable[int]) -> None:
        """Check ``blocks`` of an atlas's ``kind`` file (``"vector"`` or ``"index"``) against their
        recorded hashes, each block once per opened store (`engine.store.blocksums`); a damaged one
        is an `IndexIntegrityError` naming the file, the block and the repair."""
        bad = self._blocks.first_damaged(path, sums, blocks)
        if bad is None:
            return
        what = "vector file" if kind == "vector" else "index"
        fix = ("re-import the atlas (its vectors are the source of truth; a copy from a backup with the same "
               "sha256 also does)" if kind == "vector" else f"`atlas index rebuild {name}` restores it from the vectors")
        lo = bad * sums.block_bytes
        raise IndexIntegrityError(
            f"the {what} of atlas {name!r} ({path}) is damaged: block {bad} (bytes {lo}-{lo + sums.block_bytes - 1}) "
            f"does not match the checksum recorded when it was written; `atlas index verify {name}` checks the "
            f"whole atlas; {fix}")

    def check_file(self, name: str, kind: str, path: Path, sha: str | None, cached: FileStamp | None,
                   full: bool = False) -> BlockSums | None:
        """Check an atlas's ``kind`` file (``"vector"`` or ``"index"``) before it is used; returns the
        file's block sums where its full sha256 was computed (the same pass), else ``None``.

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
            return None
        if cached is not None and (stamp.size != cached.size or stamp.head_sha256 != cached.head_sha256):
            raise IndexIntegrityError(f"the {what} of atlas {name!r} ({path}) is corrupt or stale "
                                      f"(its size or header changed); {fix}")
        digest, sums = file_sums(path)
        if digest != sha:
            raise IndexIntegrityError(f"the {what} of atlas {name!r} ({path}) is corrupt or stale "
                                      f"(checksum mismatch); {fix}")
        if stamp != cached and not self.readonly:
            self._remember_stamp(name, kind, path, stamp)  # the file is right: remember its stamp
        return sums

    def index(self, name: str | None = None) -> indexes.VectorIndex:
        """The atlas's vector index, opened from its file (memory-mapped) after the cheap integrity
        check (`check_file`) and checked against the atlas's count."""
        for attempt in range(3):
            record = self.atlas_record(name)
            loc = row_location(record)
            key = loc.cache_key(record.name, record.index_file, record.index_sha256)
            if key in self._indexes:
                return self._indexes[key]
            path, spec, expected = self.path / record.index_file, record.index_spec, record.n_concepts
            atlas_name, ref, cached = record.name, record.index_file, cached_stamp(record, "index")
            fix = f"`atlas index rebuild {atlas_name}` restores it from the vectors"
            if loc.backend != FAISS:
                self._indexes[key] = self._open_milvus_index(atlas_name, loc, ref, spec, expected, fix)
                return self._indexes[key]
            try:
                self.check_file(atlas_name, "index", path, key[1], cached)
                sums = self.block_sums(record, "index")
                if sums is not None:  # a search may read any block of the file: every one, once
                    self.check_blocks(atlas_name, "index", path, sums, range(len(sums.hashes)))
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

    def _attach_raw(self, name: str, index: indexes.VectorIndex) -> None:
        """A spec with ``rerank=R`` (a quantised index) re-scores its candidates from the atlas's
        vector file, memory-mapped: only the candidates' rows are read."""
        if "rerank" in index.spec.partition("|")[2] and hasattr(index, "rerank_from"):
            index.rerank_from(self.checked_rows(name))  # only the candidates' rows (and blocks) are read

    def _index_file_moved(self, name: str, path: Path) -> bool:
        return self.path / self.atlas_record(name).index_file != path

    # ------------------------------------------------------------------ search

    def search_vectors(self, atlas: str | None, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Nearest atlas concepts (cosine) of each vector (n, d) already in atlas coordinates."""
        name = self.atlas_record(atlas).name
        scores, ids = self.search_arrays(name, vectors, k)
        return self.hits(name, scores, ids)

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
        info = self.atlas_record(atlas)  # the row only: no count of its labelled concepts
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


def _concept(atlas: str, row: Sequence[Any]) -> Concept:
    ordinal, label, description, labelled, source_kind, source_ref, density, extra = row
    return Concept(atlas, int(ordinal), label, description, bool(labelled), source_kind, source_ref,
                   None if density is None else float(density), json_value(extra))
