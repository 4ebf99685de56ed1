"""Where an atlas's index lives: a FAISS file in the store, or a Milvus collection (docs/design.md §3).

``--index-uri`` says which: ``faiss`` (the default: a file in ``indexes/``), a Milvus Lite folder
(a path ending in ``.db``: embedded, one process at a time), or a Milvus server or cluster
(``http://host:19530``, ``https://...``, ``tcp://...``). The store records the backend and the
URI per atlas (migration 0007). A Lite folder inside the store is recorded relative to the store
root, so a moved or copied store keeps its vectors; a relative Lite path given on the command line
is relative to the store root, not the working directory (the same behaviour from anywhere).
Credentials never go into the URI (the database would keep them): `indexes.milvus.TOKEN_ENV`.

The location owns what differs between the backends, so the store's writers never ask which one
an atlas has: `IndexLocation.check_spec` (a spec FAISS does not understand writes nothing),
`IndexLocation.place` (build an index over the vectors under this write's own file or collection
name: a FAISS index is built in memory and written to its file, a collection is created and
filled), `IndexLocation.discard` (remove that file, drop that collection) and
`IndexLocation.files` (the files of the store it claims). How an index is built a chunk at a time
and checked is `build_index`. What a caller asks for is an `IndexPlacement`: a spec and a URI,
as ``--index`` / ``--index-uri`` give them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

import indexes
from engine.errors import BadValueError, IndexUnavailableError
from engine.store import layout
from engine.store.blocksums import BlockSums, file_sums
from engine.store.vectorfiles import row_chunks
from engine.util import FileStamp, file_stamp, unit_rows, write_store_file_with
from indexes.faiss_backend import faiss_reason
from indexes.milvus import MilvusIndex, MilvusUnavailableError, drop_collection

FAISS, MILVUS = "faiss", "milvus"
TRAIN_SAMPLE = 200_000  # rows an index that needs training (IVF, PQ, SQ) is trained on: an even
#                         spread of the atlas (k-means uses at most 256 a list, so IVF4096 and below
#                         see what they would see of all rows); 600 MB at d=768
URI_HINT = ("use faiss (a FAISS file in the store), a Milvus Lite folder ending in .db (e.g. milvus.db, "
            "relative to the store root) or a Milvus server URI such as http://host:19530")


@dataclasses.dataclass(frozen=True)
class IndexPlacement:
    """How and where an atlas's index is to be built, as a caller asks for it: ``spec`` (a FAISS factory
    string, or ``auto``: `indexes.policy.resolve_index_spec`) and ``uri`` (`parse_index_uri`; ``None``:
    a FAISS file in the store)."""

    spec: str = "Flat"
    uri: str | None = None

    def location(self, root: Path) -> IndexLocation:
        """The location the store records for ``uri``."""
        return IndexLocation(FAISS) if self.uri is None else parse_index_uri(self.uri, root)


@dataclasses.dataclass(frozen=True)
class PlacedIndex:
    """An index built where its location says: its file (relative to the store root) or collection
    name, and, for a file, its checksum, block checksums and stamp (``None`` for a collection)."""

    index: indexes.VectorIndex
    ref: str
    sha256: str | None = None
    stamp: FileStamp | None = None
    blocks: BlockSums | None = None


@dataclasses.dataclass(frozen=True)
class IndexLocation:
    """An atlas index's backend and, for Milvus, its URI as the store records it."""

    backend: str  # "faiss" | "milvus"
    uri: str | None = None  # Milvus: a Lite folder (relative to the store root where inside it) or a server

    @property
    def is_lite(self) -> bool:
        return self.backend == MILVUS and bool(self.uri) and str(self.uri).endswith(".db")

    def connect_uri(self, root: Path) -> str:
        """The URI pymilvus connects to: a recorded relative Lite folder resolved against ``root``."""
        if self.uri is None:
            raise BadValueError("a FAISS index has no URI")
        if self.is_lite and not Path(self.uri).is_absolute():
            return str(root / self.uri)
        return self.uri

    def check_spec(self, dim: int, spec: str) -> None:
        """Refuse a spec FAISS does not understand before anything is written (a collection checks
        its spec when it is built)."""
        if self.backend == FAISS:
            new_index(dim, spec)

    def place(self, x: np.ndarray, spec: str, root: Path, name: str, token: str) -> PlacedIndex:
        """The index of ``x`` where this location says, under names this write owns (``token``): a
        FAISS index built in memory and written to its file (removed again if a later step here
        fails), or a collection created and filled (dropped again if building it fails)."""
        if self.backend != FAISS:
            collection = layout.collection_name(name, token)
            try:
                index = build_index(x, spec, self.backend, uri=self.connect_uri(root), collection=collection)
            except MilvusUnavailableError as e:
                raise IndexUnavailableError(str(e)) from None
            return PlacedIndex(index, collection)
        index, ref = build_index(x, spec), layout.index_file(name, token)
        try:
            write_index(index, root / ref)
            sha, blocks = file_sums(root / ref)  # one pass over the file just written
            return PlacedIndex(index, ref, sha, file_stamp(root / ref), blocks)
        except BaseException:
            self.discard(root, ref)
            raise

    def discard(self, root: Path, ref: str) -> None:
        """Remove an index file or drop a collection, best effort: one left behind is a leftover
        that `Store.verify` reports and `Store.gc` removes."""
        if self.backend == FAISS:
            (root / ref).unlink(missing_ok=True)
            return
        try:
            drop_collection(self.connect_uri(root), ref)
        except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
            pass

    def files(self, ref: str) -> list[str]:
        """The store files an index at ``ref`` claims: its file, or none (a collection)."""
        return [ref] if self.backend == FAISS else []

    def cache_key(self, name: str, ref: str, sha: str | None) -> tuple[str, str]:
        """How `Store.index` caches an open index: a FAISS file by its checksum, a collection by its name."""
        if self.backend != FAISS:
            return (name, f"{self.backend}:{ref}")
        return (name, sha or "")


def parse_index_uri(text: str, root: Path) -> IndexLocation:
    """``--index-uri`` → the location the store records (see the module docstring)."""
    value = str(text).strip()
    if value.lower() == FAISS:
        return IndexLocation(FAISS)
    if value.endswith(".db"):
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else root / p).resolve()
        if p.exists() and not p.is_dir():
            raise BadValueError(f"--index-uri {value!r}: {p} is a file; a Milvus Lite URI names a folder "
                                "(made on first use)")
        if not p.parent.is_dir():
            raise BadValueError(f"--index-uri {value!r}: the folder {p.parent} does not exist")
        try:
            return IndexLocation(MILVUS, p.relative_to(root.resolve()).as_posix())
        except ValueError:
            return IndexLocation(MILVUS, str(p))
    parts = urlsplit(value)
    if parts.scheme.lower() in ("http", "https", "tcp"):
        if parts.username or parts.password:
            raise BadValueError(f"--index-uri: put credentials in $ATLAS_MILVUS_TOKEN, not in the URI "
                                f"(the store records the URI); got {parts.scheme}://...@{parts.hostname}")
        if not parts.hostname:
            raise BadValueError(f"--index-uri {value!r} names no host; {URI_HINT}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise BadValueError(f"--index-uri {value!r} has a bad port; {URI_HINT}") from None
        return IndexLocation(MILVUS, value.rstrip("/"))
    raise BadValueError(f"--index-uri {value[:80]!r} is not understood; {URI_HINT}")


SPEC_HINT = ("use a FAISS factory string such as Flat, HNSW32 or IVF1024,Flat (search parameters after '|', "
             "e.g. HNSW32|efSearch=128), or auto")


def resolve_spec(spec: str, n: int, d: int) -> str:
    """`indexes.policy.resolve_index_spec` for ``n`` vectors of width ``d``; a spec it refuses (malformed, too
    few vectors to train, too much memory) is the user's `BadValueError`, with the same message."""
    from indexes.policy import resolve_index_spec

    try:
        return resolve_index_spec(spec, n, d)
    except indexes.IndexSpecError as e:
        raise BadValueError(str(e)) from None


def new_index(dim: int, spec: str, backend: str = FAISS, **location: str) -> indexes.VectorIndex:
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
    index = new_index(d, spec, backend, **location)
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
        except MemoryError:  # past the spec's memory estimate (indexes.policy): a line, not a traceback
            raise BadValueError(f"index spec {spec!r} ran out of memory building {n:,} vectors of dim {d}; use a "
                                f"smaller graph degree (e.g. HNSW32) or Flat") from None
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
