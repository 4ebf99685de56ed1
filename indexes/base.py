"""The `VectorIndex` interface and the backend registry."""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np


class IndexSpecError(ValueError):
    """An index spec string is not understood by the backend."""


class IndexCorruptError(RuntimeError):
    """An index file cannot be read back (truncated, corrupt, or not an index)."""


class VectorIndex(ABC):
    """Inner-product nearest-neighbour search over float32 vectors with int64 ids.

    Vectors are expected unit-norm, so scores are cosines. ``spec`` is the backend's
    description of the structure (``Flat``, ``HNSW32``, ``IVF1024,Flat`` ...).
    """

    backend: str = ""

    def __init__(self, dim: int, spec: str) -> None:
        self.dim = dim
        self.spec = spec

    @abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n,); trains the index first if it needs it."""

    @property
    def needs_training(self) -> bool:
        """Whether `train` must see a sample before `add` (IVF, PQ, SQ structures)."""
        return False

    def train(self, sample: np.ndarray) -> None:
        """Train on ``sample`` (n, dim) so the index can then be filled by `add` in chunks; a no-op
        for structures that need no training."""
        return None

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: (scores (n, k) float32, ids (n, k) int64; -1 where none)."""

    @abstractmethod
    def count(self) -> int:
        """Number of vectors held."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Serialise the index."""

    @classmethod
    @abstractmethod
    def from_bytes(cls, data: bytes, spec: str | None = None) -> VectorIndex:
        """Read an index serialised by `to_bytes` (``spec`` restores search parameters).

        Raises `IndexCorruptError` when the bytes are not a readable index."""

    def save(self, path: str | Path) -> bytes:
        """Write the index atomically (temporary file, fsync, rename); returns the bytes written."""
        data = self.to_bytes()
        write_atomic(Path(path), data)
        return data

    def write(self, path: str | Path) -> None:
        """Write the index to ``path`` atomically without holding its serialised bytes in memory
        where the backend can (this default serialises to bytes first)."""
        write_atomic(Path(path), self.to_bytes())

    @classmethod
    def open(cls, path: str | Path, spec: str | None = None) -> VectorIndex:
        """Open an index written by `write` or `save` from its file: memory-mapped where the
        backend and the index type allow (this default reads the bytes).

        Raises `IndexCorruptError` when the file is not a readable index."""
        return cls.from_bytes(Path(path).read_bytes(), spec)

    def _check_rows(self, vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows to add as contiguous float32 (n, dim) with int64 ids (n,); `ValueError` otherwise."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {tuple(x.shape)}")
        if ids.shape != (x.shape[0],):
            raise ValueError(f"ids must have shape ({x.shape[0]},), got {tuple(ids.shape)}")
        return x, ids

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {tuple(queries.shape)}")
        return q


FAILPOINT_ENV = "ATLAS_FAILPOINT"
FAILPOINT_ONCE_ENV = "ATLAS_FAILPOINT_ONCE"  # a marker file: kill only the first process to create it


def failpoint(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, like a power cut) when ``$ATLAS_FAILPOINT`` is
    ``name``. Writers call it between the steps of their write order, so the fault-injection tests
    (tests/store/test_faults.py) can stop a write at every step boundary; unset, it costs one lookup.
    With ``$ATLAS_FAILPOINT_ONCE`` set to a file path, only the process that creates that file is
    killed (a retried task then runs through: tests/distributed/test_ray.py kills a Ray worker once)."""
    if os.environ.get(FAILPOINT_ENV) == name:
        import signal

        once = os.environ.get(FAILPOINT_ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return

        os.kill(os.getpid(), signal.SIGKILL)


def file_mode() -> int:
    """The mode of every file written here: ``0o666`` minus the process umask (what ``open`` gives)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and back at once)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one (see
    `write_atomic_with`)."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic_with(path, fill)


def write_atomic_with(path: Path, fill: Callable[[Path], None]) -> None:
    """Have ``fill`` write the file's content to a temporary path, then make it ``path`` so that a
    crash leaves either the old file or the new one (fsync, rename, fsync of the folder).

    The temporary file is ``.<pid>.<random>.tmp`` in the same folder (its writer is in its name, so
    a leftover of a killed writer can be told from a file being written); the file gets the mode
    ``open`` would give it (`file_mode`: the umask applies), like the SQLite database beside it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        os.close(fd)
        fill(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        failpoint("write_atomic.before_rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself durable before anything (a database row) refers to the file
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


_BACKENDS: dict[str, type[VectorIndex]] = {}


def register_backend(name: str, cls: type[VectorIndex]) -> None:
    """Register an index backend under ``name``; a name can be registered once."""
    if name in _BACKENDS:
        raise ValueError(f"index backend {name!r} is already registered")
    cls.backend = name
    _BACKENDS[name] = cls


def backends() -> list[str]:
    return sorted(_BACKENDS)


def _backend(name: str) -> type[VectorIndex]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise IndexSpecError(f"unknown index backend {name!r}; known: {', '.join(backends())}") from None


def create_index(dim: int, spec: str = "Flat", backend: str = "faiss", **location: str) -> VectorIndex:
    """An empty index; ``location`` is where a backend that is not a file keeps it (Milvus: ``uri``,
    ``collection``)."""
    return _backend(backend)(dim, spec, **location)


def load_index(data: bytes, spec: str | None = None, backend: str = "faiss") -> VectorIndex:
    return _backend(backend).from_bytes(data, spec)


def open_index(path: str | Path, spec: str | None = None, backend: str = "faiss") -> VectorIndex:
    """An index opened from its file (`VectorIndex.open`: memory-mapped where it can be)."""
    return _backend(backend).open(path, spec)
