"""FAISS backend: inner product over unit vectors, any ``index_factory`` spec.

Specs are FAISS factory strings (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ64``),
optionally followed by search-time parameters after a ``|``: ``HNSW32|efSearch=128``,
``IVF1024,Flat|nprobe=32``. Indexes that do not take ids natively (Flat, HNSW) are wrapped in an
``IndexIDMap2`` so ids are always the caller's (concept ordinals).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import faiss
import numpy as np

from indexes.base import IndexCorruptError, IndexSpecError, VectorIndex, register_backend, write_atomic_with
from indexes.exact import topk_inner_product
from indexes.ivf import LowLists, bf16_lists, ivf_topk
from indexes.torch_search import search_device, topk_inner_product_torch

# Search-time defaults: chosen for recall >= 0.95 on structured (clustered) vectors.
DEFAULT_SEARCH_PARAMS = {"HNSW": {"efSearch": 128}, "IVF": {"nprobe": 32}}


# From this many queries on, a Flat index is searched by `indexes.exact` (blocked GEMM + threshold
# top-k) instead of FAISS's own search; below it both are bound by reading the vectors once.
GEMM_MIN_QUERIES = 20
# From this many queries on, an IVF-Flat index is searched by `indexes.ivf` (the queries that probe
# a list scored against it in one GEMM); below it few queries share a list and FAISS's scan is as fast.
IVF_GEMM_MIN_QUERIES = 1024
# Opening a file maps the index's vectors (flat codes, HNSW storage, IVF lists) instead of reading
# them: pages are read when a search touches them, and many processes share one copy.
OPEN_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY

INT_MAX = 2**31 - 1  # FAISS keeps these numbers in C ints: larger ones wrap around
# Search parameters that must be at least 1 (0 makes HNSW return one hit, IVF raise on every search).
POSITIVE_PARAMS = ("efSearch", "efConstruction", "nprobe", "rerank")
# Not FAISS's: ``rerank=R`` has a quantised index (SQ8, PQ) return R·k candidates, re-scored
# exactly from the raw vectors (`FaissIndex.rerank_from`) before the top k are kept.
RERANK = "rerank"
# Not FAISS's: ``bf16=1`` on an IVF-Flat index scores the probed lists of a bulk search in bfloat16
# (`indexes.ivf`: the same results, the survivors re-scored in float32), against a bfloat16 copy of
# the lists (half the index's size again in memory). Worth it on CPUs with AVX512-BF16 (or AMX).
BF16 = "bf16"
ENGINE_PARAMS = (RERANK, BF16)
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


def normalize_spec(spec: str) -> str:
    """One spelling per spec: blanks around names, commas, ``|`` and ``=`` dropped, and a ``|`` with no
    parameters after it (``" Flat"`` and ``"Flat|"`` are ``"Flat"``; ``"HNSW32 | efSearch = 64"`` is
    ``"HNSW32|efSearch=64"``). Anything else (a non-string) is left for `parse_spec` to refuse."""
    if not isinstance(spec, str):
        return spec
    factory, _, params = spec.partition("|")
    factory = ",".join(part.strip() for part in factory.split(","))
    items = [re.sub(r"\s*=\s*", "=", p.strip()) for p in params.split(",") if p.strip()]
    return factory.strip() + ("|" + ",".join(items) if items else "")


def faiss_reason(e: BaseException) -> str:
    """The part of a FAISS error that says what failed, on one line (its messages carry C++
    signatures and source locations)."""
    text = " ".join(str(e).split())
    m = re.search(r"failed: (.+)$", text) or re.search(r"at \S+:\d+: (?:Error: )?(.+)$", text)
    return (m.group(1) if m else text)[:200]


def rerank(q: np.ndarray, cand: np.ndarray, raw: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of the candidate ids ``cand`` (nq, c) of each query by exact cosine with the
    rows of ``raw``, read (and normalised) once per distinct candidate of a block of queries."""
    nq = len(q)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for lo in range(0, nq, block):
        c = cand[lo : lo + block]  # (m, c)
        uniq, inv = np.unique(c[c >= 0], return_inverse=True)
        if not len(uniq):
            continue
        rows = np.asarray(raw[uniq], dtype=np.float32)  # (u, d): only these rows are read
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-30))
        pos = np.full(c.shape, -1, dtype=np.int64)
        pos[c >= 0] = inv
        s = np.einsum("md,mcd->mc", q[lo : lo + block], rows[np.maximum(pos, 0)])  # (m, c)
        s[pos < 0] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        kk = top.shape[1]
        out_s[lo : lo + len(c), :kk] = np.take_along_axis(s, top, 1)
        out_i[lo : lo + len(c), :kk] = np.where(np.take_along_axis(pos, top, 1) >= 0, np.take_along_axis(c, top, 1), -1)
    return out_s, out_i


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


class FaissIndex(VectorIndex):
    def __init__(self, dim: int, spec: str = "Flat", _index: faiss.Index | None = None) -> None:
        super().__init__(dim, spec)
        factory, self.search_params = parse_spec(spec)
        self._ids: np.ndarray | None = None  # the IDMap's ids as an array, for the GEMM path
        self._ivf: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None = None  # for `indexes.ivf`
        self._low: LowLists | None = None  # the lists in bfloat16 (``bf16=1``)
        self._raw: np.ndarray | None = None  # raw vectors by id, for ``rerank`` (`rerank_from`)
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
        params.update({k: v for k, v in self.search_params.items() if k not in ENGINE_PARAMS})
        ps = faiss.ParameterSpace()
        for key, value in params.items():
            try:
                ps.set_index_parameter(self._index, key, value)
            except RuntimeError as e:
                raise IndexSpecError(f"index {self.spec!r} has no search parameter {key!r} ({faiss_reason(e)})") from None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        x, ids = self._check_rows(vectors, ids)
        if not self._index.is_trained:
            self._index.train(x)
        self._index.add_with_ids(x, ids)
        self._ids = self._ivf = self._low = None

    @property
    def needs_training(self) -> bool:
        return not self._index.is_trained

    def train(self, sample: np.ndarray) -> None:
        if not self._index.is_trained:
            self._index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._check_queries(queries)
        k = max(1, min(int(k), max(self.count(), 1)))
        if len(q) >= GEMM_MIN_QUERIES:
            flat = self._flat_vectors()
            if flat is not None and search_device() is not None:  # `indexes.torch_search.set_search_device`
                return topk_inner_product_torch(q, flat, k, ids=self._flat_ids(), device=str(search_device()))
            if flat is not None:
                return topk_inner_product(q, flat, k, ids=self._flat_ids())
        if len(q) >= IVF_GEMM_MIN_QUERIES:
            ivf = self._ivf_lists()
            if ivf is not None:
                if self.search_params.get(BF16) and self._low is None:
                    self._low = bf16_lists(ivf[1])
                return ivf_topk(q, *ivf, k, nprobe=faiss.extract_index_ivf(self._index).nprobe,
                                low=self._low if self.search_params.get(BF16) else None)
        factor = self.search_params.get(RERANK, 1)
        if factor > 1 and self._raw is not None:
            _, cand = self._index.search(q, min(k * factor, self.count()))
            return rerank(q, cand, self._raw, k)
        scores, ids = self._index.search(q, k)
        return scores, ids

    def rerank_from(self, raw: np.ndarray) -> None:
        """Re-score the candidates of a ``rerank=R`` spec exactly from ``raw`` (n, dim): row ``i``
        is the vector of id ``i``, any scale (rows are normalised when read). A memory map of the
        atlas's vector file does: only the candidates' rows are read, so the raw vectors need not
        fit in memory while the quantised index does."""
        if raw.ndim != 2 or raw.shape[1] != self.dim:
            raise ValueError(f"raw vectors must have shape (n, {self.dim}), got {tuple(raw.shape)}")
        self._raw = raw

    def _flat_vectors(self) -> np.ndarray | None:
        """The stored vectors (n, dim) of a Flat inner-product index, as a view (no copy; on an
        index opened from its file, a view of the mapped file); None for other structures."""
        inner = _inner(self._index)
        flat = type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP) and inner.metric_type == faiss.METRIC_INNER_PRODUCT
        if not flat or inner.ntotal == 0:
            return None
        xb = faiss.rev_swig_ptr(cast(faiss.IndexFlat, inner).get_xb(), inner.ntotal * self.dim)
        return xb.reshape(inner.ntotal, self.dim)

    def _ivf_lists(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None:
        """An IVF-Flat inner-product index's centroids (n_lists, dim) and lists (vectors, ids),
        as views of its storage (on an index opened from its file, of the mapped file); None for
        other structures."""
        if type(self._index) is not faiss.IndexIVFFlat or self._index.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        if self._ivf is None:
            ivf = self._index
            quantizer = faiss.downcast_index(ivf.quantizer)
            if type(quantizer) not in (faiss.IndexFlat, faiss.IndexFlatIP) or ivf.code_size != 4 * self.dim:
                return None
            xb = cast(faiss.IndexFlat, quantizer).get_xb()
            centroids = faiss.rev_swig_ptr(xb, ivf.nlist * self.dim).reshape(ivf.nlist, self.dim)
            invlists, lists = ivf.invlists, []
            if invlists is None:
                return None
            empty = (np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=np.int64))
            for li in range(ivf.nlist):
                n = invlists.list_size(li)
                if not n:
                    lists.append(empty)
                    continue
                codes = faiss.rev_swig_ptr(invlists.get_codes(li), n * ivf.code_size)
                lists.append((codes.view(np.float32).reshape(n, self.dim), faiss.rev_swig_ptr(invlists.get_ids(li), n)))
            self._ivf = (centroids, lists)
        return self._ivf

    def _flat_ids(self) -> np.ndarray | None:
        if not isinstance(self._index, faiss.IndexIDMap):
            return None
        if self._ids is None or len(self._ids) != self._index.ntotal:
            self._ids = faiss.vector_to_array(self._index.id_map)
        return self._ids

    def count(self) -> int:
        return int(self._index.ntotal)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    def write(self, path: str | Path) -> None:
        """Written by FAISS straight to a temporary file (no serialised copy in memory), then renamed."""
        write_atomic_with(Path(path), lambda tmp: faiss.write_index(self._index, str(tmp)))

    @classmethod
    def open(cls, path: str | Path, spec: str | None = None) -> FaissIndex:
        """Memory-mapped (`OPEN_FLAGS`): the vectors stay in the file until a search reads them.

        The file must stay as it is while the index is open: store files are never rewritten
        in place (a rebuild writes a new file and renames), so a mapping always sees one version."""
        try:
            index = faiss.read_index(str(path), OPEN_FLAGS)
        except (RuntimeError, ValueError) as e:
            if not Path(path).is_file():
                raise FileNotFoundError(str(path)) from None
            raise IndexCorruptError(f"not a readable FAISS index ({faiss_reason(e)})") from None
        out = cls(index.d, spec or "Flat", _index=index)
        if spec:
            out._apply_search_params()
        return out

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
