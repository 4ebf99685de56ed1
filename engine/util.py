"""Small helpers shared across the engine, one copy each.

`write_atomic` is the index backends' (``indexes.base``): the engine writes its own files
(vectors, maps, manifests, exports) the same way, temporary file, fsync, rename, and no module
hand-rolls it. `build_then_rename` is the same for a folder built by one process while others may
build the same one (a world, an SAE): built aside, renamed into place, a racer's copy kept.

`check_name` is the one naming rule of atlases, maps and labelling runs: their names become
file names (``vectors/<atlas>.safetensors``, ``maps/<map>.safetensors``), so a name must be one
path component, not hidden, and short enough in bytes for any file system.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BadNameError, BadValueError, ReadOnlyStoreError
from indexes.base import failpoint, write_atomic, write_atomic_with

__all__ = ["FileStamp", "check_k", "check_name", "corpus_fingerprint", "file_stamp", "sha256_bytes", "sha256_file",
           "to_plain", "unit_rows", "utcnow", "failpoint", "write_atomic", "write_atomic_with", "write_store_file",
           "write_store_file_with", "build_then_rename"]

MAX_NAME = 200  # characters, and bytes in UTF-8: a name plus its suffixes stays under NAME_MAX (255)
NAME_RULE = (f"use letters, digits, '-', '_' or '.', not starting with '.', "
             f"at most {MAX_NAME} characters ({MAX_NAME} bytes in UTF-8)")


def check_name(name: str, what: str) -> None:
    """Raise `BadNameError` unless ``name`` is a valid name for a ``what`` (atlas, map, run).

    The rule: letters, digits, ``-``, ``_`` and ``.`` only (so no ``/``, spaces or control
    characters), not starting with ``.``, at most 200 characters and 200 bytes in UTF-8.
    """
    ok = (
        isinstance(name, str) and 0 < len(name) <= MAX_NAME and len(name.encode("utf-8")) <= MAX_NAME
        and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)
    )
    if not ok:
        raise BadNameError(f"bad {what} name {name!r}: {NAME_RULE}")


def write_store_file(path: Path, data: bytes) -> None:
    """`write_atomic` for a store's own files: a folder that cannot be written (read-only,
    permissions, disk full) is a one-line `ReadOnlyStoreError` naming the folder, not a traceback."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise ReadOnlyStoreError(f"cannot write {path} ({e.strerror or e}); the store's folder "
                                 f"{path.parent} must be writable (and the disk not full)") from None


def write_store_file_with(path: Path, fill: Callable[[Path], None]) -> None:
    """`write_store_file` for content written by ``fill(temporary path)`` (a stream, FAISS)."""
    try:
        write_atomic_with(path, fill)
    except OSError as e:
        raise ReadOnlyStoreError(f"cannot write {path} ({e.strerror or e}); the store's folder "
                                 f"{path.parent} must be writable (and the disk not full)") from None


def build_then_rename(tmp: Path, final: Path, build: Callable[[Path], object], marker: str,
                      part: str | None = None) -> None:
    """Make the folder ``final`` appear whole: ``build(tmp)`` fills the temporary folder ``tmp`` (emptied
    and created first), then ``tmp`` (or its subfolder ``part``) is renamed to ``final``. A racer that
    renamed its own first wins: when the rename fails and ``final / marker`` exists, theirs is kept.
    ``tmp`` is removed in any case."""
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        built = tmp / part if part else tmp
        try:
            os.rename(built, final)
        except OSError:
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HASH_CHUNK = 8 << 20  # bytes read at a time by `sha256_file`: memory stays flat for any file size
HEAD_BYTES = 1 << 20  # bytes of a file's head (and tail) in its cheap `FileStamp` checksum


def sha256_file(path: Path, chunk: int | None = None) -> str:
    """The sha256 of a file, read in ``chunk``-byte pieces (`HASH_CHUNK`; never the whole file)."""
    chunk = chunk or HASH_CHUNK
    h = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class FileStamp:
    """What opening a store file checks instead of its full sha256: size, modification time
    (nanoseconds) and the sha256 of its first and last `HEAD_BYTES` (the header, where a format
    keeps its counts and shapes). Cached in the database row beside the full checksum."""

    size: int
    mtime_ns: int
    head_sha256: str


def file_stamp(path: Path) -> FileStamp:
    """The `FileStamp` of a file: one ``stat`` and at most 2 MiB read."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = hashlib.sha256(f.read(HEAD_BYTES))
        if st.st_size > HEAD_BYTES:
            f.seek(max(HEAD_BYTES, st.st_size - HEAD_BYTES))
            h.update(f.read(HEAD_BYTES))
    return FileStamp(st.st_size, st.st_mtime_ns, h.hexdigest())


def unit_rows(x: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as ``dtype`` (float32 unless asked)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


MAX_K = 1_000_000  # results per query: searches return at most the atlas, and this bounds their arrays


def check_k(k: int) -> int:
    """``k`` (results per query) if it is a whole number from 1 to `MAX_K`, else a `BadValueError`
    saying so (searches return at most the atlas's size: a larger k gives the whole atlas)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BadValueError(f"k must be a whole number >= 1 (results per query), got {k!r}")
    if k > MAX_K:
        raise BadValueError(f"k must be at most {MAX_K:,} (results per query), got {str(k)[:30]}")
    return k


def utcnow() -> dt.datetime:
    """Now in UTC, without tzinfo (how the database stores times)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def to_plain(obj: Any) -> Any:
    """Dataclasses, paths and numpy scalars → JSON-serialisable values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj


def corpus_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (records which corpus a map was fitted on)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
