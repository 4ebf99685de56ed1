"""FAISS backend: inner product over unit vectors, any ``index_factory`` spec.

Specs are FAISS factory strings (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ64``),
optionally followed by search-time parameters after a ``|``: ``HNSW32|efSearch=128``,
``IVF1024,Flat|nprobe=32``. Indexes that do not take ids natively (Flat, HNSW) are wrapped in an
``IndexIDMap2`` so ids are always the caller's (concept ordinals).
"""

from __future__ import annotations

import re

import faiss
import numpy as np

from indexes.base import IndexCorruptError, IndexSpecError, VectorIndex, register_backend

# Search-time defaults: chosen for recall >= 0.95 on structured (clustered) vectors.
DEFAULT_SEARCH_PARAMS = {"HNSW": {"efSearch": 128}, "IVF": {"nprobe": 32}}


INT_MAX = 2**31 - 1  # FAISS keeps these numbers in C ints: larger ones wrap around
# Search parameters that must be at least 1 (0 makes HNSW return one hit, IVF raise on every search).
POSITIVE_PARAMS = ("efSearch", "efConstruction", "nprobe")
# Structures whose number is a graph degree: FAISS asserts (aborts the process) or crashes below 2.
_GRAPH_DEGREE = re.compile(r"(HNSW|NSG)(\d+)")


def search_threads() -> int:
    """The OpenMP threads FAISS searches with in this process: the last bits of its scores depend
    on it (how its BLAS products are split), so processes that must agree bit for bit use one count."""
    return int(faiss.omp_get_max_threads())


def set_search_threads(n: int) -> None:
    """Search with ``n`` OpenMP threads in this process (see `search_threads`)."""
    faiss.omp_set_num_threads(max(1, int(n)))


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """Split ``"HNSW32|efSearch=64"`` into the factory string and search parameters.

    Numbers FAISS would take without complaint and then crash or misbehave on are refused here,
    before FAISS sees them: any number in the factory string below 1 (``IVF0``), an HNSW or NSG
    degree below 2 (``HNSW0`` aborts the process, ``HNSW1`` crashes it), an ``efSearch``,
    ``efConstruction`` or ``nprobe`` below 1, and numbers beyond a C int.
    """
    if not isinstance(spec, str):
        raise IndexSpecError(f"an index spec is a string, got {spec!r}")
    factory, _, params = spec.partition("|")
    factory = factory.strip()
    if not factory:
        raise IndexSpecError(f"empty index spec {spec!r}")
    for number in re.findall(r"\d+", factory):
        if not 1 <= int(number) <= INT_MAX:
            raise IndexSpecError(f"index spec {spec!r}: every number in it must be between 1 and {INT_MAX}")
    for kind, degree in _GRAPH_DEGREE.findall(factory):
        if int(degree) < 2:
            raise IndexSpecError(f"index spec {spec!r}: {kind} needs a degree of at least 2 (e.g. {kind}32)")
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip().isdigit() or not key:
            raise IndexSpecError(f"bad search parameter {item!r} in index spec {spec!r} (want name=int)")
        v = int(value)
        low = 1 if key in POSITIVE_PARAMS else 0
        if not low <= v <= INT_MAX:
            raise IndexSpecError(f"search parameter {key}={v} in index spec {spec!r} must be between {low} and {INT_MAX}")
        out[key] = v
    return factory, out


def faiss_reason(e: BaseException) -> str:
    """The part of a FAISS error that says what failed, on one line (its messages carry C++
    signatures and source locations)."""
    text = " ".join(str(e).split())
    m = re.search(r"failed: (.+)$", text) or re.search(r"at \S+:\d+: (?:Error: )?(.+)$", text)
    return (m.group(1) if m else text)[:200]


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


class FaissIndex(VectorIndex):
    def __init__(self, dim: int, spec: str = "Flat", _index: faiss.Index | None = None) -> None:
        super().__init__(dim, spec)
        factory, self.search_params = parse_spec(spec)
        if _index is not None:
            self._index = _index
            return
        try:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise IndexSpecError(f"FAISS cannot build index spec {factory!r} for dim {dim}: {faiss_reason(e)}") from None
        self._index = base if factory.startswith("IVF") else faiss.IndexIDMap2(base)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        inner = _inner(self._index)
        params = {}
        for prefix, defaults in DEFAULT_SEARCH_PARAMS.items():
            if type(inner).__name__.startswith(f"Index{prefix}"):
                params.update(defaults)
        params.update(self.search_params)
        ps = faiss.ParameterSpace()
        for key, value in params.items():
            try:
                ps.set_index_parameter(self._index, key, value)
            except RuntimeError as e:
                raise IndexSpecError(f"index {self.spec!r} has no search parameter {key!r} ({faiss_reason(e)})") from None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {tuple(x.shape)}")
        if ids.shape != (x.shape[0],):
            raise ValueError(f"ids must have shape ({x.shape[0]},), got {tuple(ids.shape)}")
        if not self._index.is_trained:
            self._index.train(x)
        self._index.add_with_ids(x, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._check_queries(queries)
        k = max(1, min(int(k), max(self.count(), 1)))
        scores, ids = self._index.search(q, k)
        return scores, ids

    def count(self) -> int:
        return int(self._index.ntotal)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, spec: str | None = None) -> FaissIndex:
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except (RuntimeError, ValueError) as e:
            raise IndexCorruptError(f"not a readable FAISS index ({str(e).splitlines()[0][:120]})") from None
        out = cls(index.d, spec or "Flat", _index=index)
        if spec:
            out._apply_search_params()
        return out


register_backend("faiss", FaissIndex)
