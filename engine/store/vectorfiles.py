"""Atlas vector files out of core: written in chunks, read memory-mapped, checked by their stamp.

Why not `safetensors.numpy.save` / `load`: both hold the whole file in memory (the save builds
its bytes, the load reads them), so a 1M × 768 atlas (3 GB) costs 3 GB twice over on import and
3 GB in every process that opens it. The safetensors layout is simple (an 8-byte header length,
a JSON header with each tensor's dtype, shape and byte range, then the raw little-endian data), so
the file is written here one chunk of rows at a time, hashed while it is written, and read back
as `numpy.memmap` views: a process reads the pages it touches. Files stay readable by
``safetensors`` (tests/search/test_scale.py reads one back with it).

The checks an atlas's vectors and encoder tensors pass before they are written (`check_matrix`,
`check_rows`, `check_encoder`) live here too, with `write_vectors`, which checks each chunk of
directions as it writes it.

`release` drops a chunk's pages from the process once it has been used (``MADV_DONTNEED`` on a
read-only file mapping: the page cache keeps them, the process's resident set does not), so a
pass over a mapped file costs one chunk of resident memory, not the file.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import IndexIntegrityError, ShapeError
from engine.store import layout
from engine.store.blocksums import BlockHasher, BlockSums
from engine.util import write_store_file_with

CHUNK_ROWS = 16384  # rows per chunk when streaming a matrix: 48 MiB at d=768, float32 (a few copies live)
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_tensor_file(path: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                      chunks: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> tuple[str, BlockSums]:
    """Write a safetensors file atomically from ``chunks`` and return its sha256 and block checksums
    (`engine.store.blocksums`), both computed from the bytes as they are written.

    ``shapes`` gives each tensor's shape and dtype, in file order; ``chunks`` yields
    ``(key, array)`` pieces in the same order, each a run of leading-axis rows (C order), that
    together fill every tensor exactly. Nothing but one chunk is held in memory.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for key, (shape, dtype) in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest = BlockHasher()

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for piece in (struct.pack("<Q", len(head)), head):
                f.write(piece)
                digest.update(piece)
            written = 0
            for key, chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype=shapes[key][1]).data
                f.write(data)
                digest.update(data)
                written += data.nbytes
            if written != offset:
                raise ValueError(f"{path.name}: chunks filled {written} bytes of {offset}")

    write_store_file_with(path, fill)
    return digest.sha.hexdigest(), digest.sums()


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data, the JSON header) of a safetensors file, each entry checked:
    a known dtype, a shape of non-negative ints and a byte range inside the file that holds
    exactly that shape. Anything else is an `IndexIntegrityError` (never a huge read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise IndexIntegrityError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise IndexIntegrityError(f"{path} is not a safetensors file (header longer than the file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise IndexIntegrityError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise IndexIntegrityError(f"{path} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    for key, meta in header.items():
        ok = isinstance(meta, dict) and meta.get("dtype") in _DTYPES
        shape, offsets = (meta.get("shape"), meta.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if ok and isinstance(shape, list) and isinstance(offsets, list):
            lo, hi = offsets
            n_bytes = math.prod(shape) * np.dtype(_DTYPES[meta["dtype"]]).itemsize  # Python ints: no overflow
            ok = 0 <= lo <= hi <= size - 8 - n and hi - lo == n_bytes
        if not ok:
            raise IndexIntegrityError(f"{path}: tensor {str(key)[:40]!r} is not one the store reads "
                                      "(dtype, shape or byte range)")
    return 8 + n, header


def open_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (nothing is read yet)."""
    start, header = read_header(path)
    out: dict[str, np.ndarray] = {}
    for key, meta in header.items():
        dtype = _DTYPES[meta["dtype"]]
        lo, hi = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if hi == lo:
            out[key] = np.zeros(shape, dtype=dtype)
            continue
        out[key] = np.memmap(path, dtype=dtype, mode="r", offset=start + lo, shape=shape)
    return out


def row_chunks(x: np.ndarray, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` of ``x`` `CHUNK_ROWS` at a time, each chunk's pages released after
    use when ``x`` is a memory map (see `release`)."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    for lo in range(0, len(x), chunk_rows):
        yield lo, x[lo : lo + chunk_rows]
        release(x, lo, min(len(x), lo + chunk_rows))


def release(x: np.ndarray, lo: int, hi: int) -> None:
    """Drop the resident pages of rows ``[lo, hi)`` of ``x`` when it is (a C-ordered view of) a
    read-only memory map; a no-op for arrays in memory."""
    mm = getattr(x, "_mmap", None)
    if not isinstance(mm, mmap.mmap) or x.ndim == 0 or not x.flags.c_contiguous or hi <= lo:
        return
    row_bytes = x.strides[0]
    start = x.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data + lo * row_bytes  # in the map
    page = mmap.PAGESIZE
    first = -(-start // page) * page  # whole pages inside the rows only
    last = (start + (hi - lo) * row_bytes) // page * page
    if last > first:
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):
            pass


def write_vectors(path: Path, x: np.ndarray, encoder: dict[str, np.ndarray],
                  metadata: dict[str, str]) -> tuple[str, BlockSums]:
    """Write an atlas's vector file (directions, then encoder tensors) a chunk of rows at a time,
    checking each chunk of directions (`check_rows`); returns the file's sha256 and block checksums."""
    shapes = {layout.DIRECTIONS_KEY: (x.shape, np.dtype(np.float32)),
              **{k: (v.shape, np.dtype(np.float32)) for k, v in encoder.items()}}

    def chunks():
        for lo, chunk in row_chunks(x):
            yield layout.DIRECTIONS_KEY, check_rows(chunk, first_row=lo)
        for key, v in encoder.items():
            for _, chunk in row_chunks(v):
                yield key, chunk

    return write_tensor_file(path, shapes, chunks(), metadata)


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


def check_query_rows(x: np.ndarray, kind: str = "directions", what: str = "query vectors") -> np.ndarray:
    """Query rows by the rule import applies to directions (`check_rows`, a chunk at a time): directions
    must be finite, non-zero and of a norm float32 holds (a zero or overflowing row has no direction
    and would get arbitrary hits at score 0); activations (``kind="activations"``) must be finite."""
    if kind != "directions":
        for lo, chunk in row_chunks(x):
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.isfinite(np.asarray(chunk, dtype=np.float32)).all(axis=1)
            if not finite.all():
                raise ShapeError(f"{what}: row {lo + int(np.flatnonzero(~finite)[0])} has NaN or infinite values")
        return x
    for lo, chunk in row_chunks(x):
        check_rows(chunk, what, first_row=lo)
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
