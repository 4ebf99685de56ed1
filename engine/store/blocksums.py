"""Per-block checksums of an atlas's files: what catches bit rot where the file's stamp cannot.

Opening a file checks its `engine.util.FileStamp` (size, mtime, the sha256 of its first and last
MiB): a byte that flips in the middle of a file, its mtime kept, passes that check. So every
vector file and FAISS index file is also cut into `BLOCK_BYTES` blocks (from byte 0, the last
one shorter) and the 64-bit XXH3 hash of each block is recorded with the file's row (``vector_blocks`` /
``index_blocks``, migration 0011), computed while the file is written, in the same pass as its
sha256. A read checks the blocks it depends on before it uses them (`BlockCheck`): a read of a
few rows the blocks that hold them, a read of the whole file (a search of its index, an atlas's
vectors as a whole) every block, once per opened store and file (the file's path, inode, size
and mtime: a replaced file is checked again).

Why XXH3 (``xxhash``): a check reads the file's pages through a memory map and hashes them at
about 15 GB/s on one core, so the check of a whole 3 GB index costs ~0.1 s of CPU (CRC-32, from
zlib, is 4-5 times slower; sha256 10 times). A damaged block goes unnoticed with probability
2^-64; it is not a defence against someone who rewrites the file on purpose (the full sha256 of
`atlas index verify` is the check of a file's identity).

A row's text is ``xxh3:<block bytes>:<16 hex digits per block>``; ``None`` on rows written before
block checksums (their reads are checked by the stamp only, and `atlas index verify --fix` adds
them once the full file matches its recorded sha256).

The reads that check them are `engine.store.reads.StoreReads` (the full store's and the
one-shot commands' plain ``sqlite3`` reader's alike); `CheckedRows` is what a reader of a few rows gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import xxhash

from engine.util import HASH_CHUNK

BLOCK_BYTES = 1 << 20  # 1 MiB: a single-row read checks at most two of these
ALGORITHM = "xxh3"
_DIGITS = 16  # hex digits of one block's hash


@dataclasses.dataclass(frozen=True)
class BlockSums:
    """The XXH3-64 hash of each `BLOCK_BYTES` block of a file (``hashes[i]``: block ``i``)."""

    block_bytes: int
    hashes: tuple[int, ...]

    def text(self) -> str:
        """The form a database row keeps (`parse` reads it back)."""
        return f"{ALGORITHM}:{self.block_bytes}:" + "".join(f"{c:016x}" for c in self.hashes)

    @classmethod
    def parse(cls, text: str | None) -> BlockSums | None:
        """The sums a row's text records; ``None`` for a row without them (or a form this version
        does not know: such a file is read as one without sums)."""
        if not text:
            return None
        algo, _, rest = text.partition(":")
        size, _, digits = rest.partition(":")
        if algo != ALGORITHM or not size.isdigit() or int(size) <= 0 or len(digits) % _DIGITS:
            return None
        return cls(int(size), tuple(int(digits[i : i + _DIGITS], 16) for i in range(0, len(digits), _DIGITS)))


class BlockHasher:
    """The sha256 and `BlockSums` of bytes fed in pieces of any size (a file as it is written)."""

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.sha = hashlib.sha256()
        self._done: list[int] = []
        self._block = xxhash.xxh3_64()
        self._filled = 0  # bytes of the current block seen so far

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._block.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self._done.append(self._block.intdigest())
                self._block, self._filled = xxhash.xxh3_64(), 0

    def sums(self) -> BlockSums:
        return BlockSums(self.block_bytes, tuple(self._done + ([self._block.intdigest()] if self._filled else [])))


def file_sums(path: Path, block_bytes: int = BLOCK_BYTES) -> tuple[str, BlockSums]:
    """(sha256, `BlockSums`) of a file, in one pass over it, a `HASH_CHUNK` at a time."""
    h = BlockHasher(block_bytes)
    with open(path, "rb") as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.sha.hexdigest(), h.sums()


class BlockCheck:
    """The blocks of files an opened store has found intact, by file (path, inode, size, mtime):
    each block is read and checked once per opened store (see the module doc)."""

    def __init__(self) -> None:
        self._ok: dict[tuple[str, int, int, int], set[int]] = {}

    def first_damaged(self, path: Path, sums: BlockSums, blocks: Iterable[int]) -> int | None:
        """The first of ``blocks`` of ``path`` whose hash differs from ``sums`` (or that the file no
        longer has), or ``None``; blocks found intact are remembered. The file is read through a
        memory map (no copy). ``FileNotFoundError`` when the file is missing."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
            ok = self._ok.setdefault(key, set())
            todo = [b for b in blocks if b not in ok]
            if not todo:
                return None
            if -(-st.st_size // sums.block_bytes) != len(sums.hashes):
                return todo[0]  # not the file the sums were taken of (its size changed)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for b in todo:
                        lo = b * sums.block_bytes
                        if b >= len(sums.hashes) or xxhash.xxh3_64_intdigest(view[lo : lo + sums.block_bytes]) != sums.hashes[b]:
                            return b
                        ok.add(b)
                finally:
                    view.release()
        return None


class CheckedRows:
    """Rows of a memory-mapped (n, d) matrix whose reads check first the blocks of the file that
    hold the rows read: what a reader of a few rows (a concept's direction, a quantised index's
    rerank candidates) gets instead of the bare map. ``check`` is (block bytes, a function checking
    blocks by number), or ``None`` (nothing to check against)."""

    def __init__(self, x: np.ndarray, check: tuple[int, Callable[[Iterable[int]], None]] | None) -> None:
        self._x, self._check = x, check
        self.shape, self.ndim, self.dtype = x.shape, x.ndim, x.dtype
        self._offset = int(getattr(x, "offset", 0))  # of the matrix in its file
        self._row_bytes = int(x.strides[0])

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows as numpy indexes them (an int, a slice, ordinals), float32 in memory."""
        n = len(self._x)
        r = np.arange(*rows.indices(n)) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64).ravel()
        r = np.where(r < 0, r + n, r)
        if len(r) and (r.min() < 0 or r.max() >= n):
            raise IndexError(f"row {int(r[(r < 0) | (r >= n)][0])} is out of range for {n} rows")
        if self._check is not None and len(r):
            block, check = self._check
            first = (self._offset + r * self._row_bytes) // block
            last = (self._offset + (r + 1) * self._row_bytes - 1) // block
            blocks = first[:, None] + np.arange(self._row_bytes // block + 2)[None, :]  # a row's blocks, and more
            check(np.unique(blocks[blocks <= last[:, None]]).tolist())
        return np.array(self._x[rows], dtype=np.float32)
