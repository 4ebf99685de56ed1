"""Milvus backend: the `VectorIndex` interface on a Milvus collection (pymilvus).

Why a collection and not a file: past one machine the vectors live in a vector database that
several processes (a team, a cluster) search at once. The same code reaches Milvus Lite (a local
folder, a URI ending in ``.db``: embedded in this process, one process at a time) and a Milvus
server or cluster (``http://host:19530``): pymilvus starts the Lite server itself for a ``.db``
URI. A collection holds ``id`` (INT64, the concept ordinal, primary key) and ``vector``
(FLOAT_VECTOR, unit rows), searched by inner product.

Specs are the FAISS backend's strings, so ``--index-spec`` means the same on both backends:
``Flat`` → FLAT, ``HNSW<M>`` → HNSW with ``M``, ``efConstruction`` and ``ef`` (``efSearch``),
``IVF<nlist>,Flat`` → IVF_FLAT with ``nprobe``, ``IVF<nlist>,SQ8`` → IVF_SQ8. A Milvus index has
no bytes: `to_bytes` / `from_bytes` refuse, and the store records the URI and collection name
instead of a file (`MilvusIndex.attach` reconnects). pymilvus is imported on first use (the
``milvus`` extra).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from indexes.base import IndexCorruptError, IndexSpecError, VectorIndex, register_backend
from indexes.faiss_backend import DEFAULT_SEARCH_PARAMS, parse_spec

ID_FIELD, VECTOR_FIELD = "id", "vector"
INSERT_BATCH = 8192  # rows per insert: 8192 x d=768 x 4 B = 25 MB, under gRPC's 64 MB message limit
SEARCH_BATCH = 1024  # queries per search call
MAX_TOPK = 16384  # Milvus's limit on k
LITE_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": False}
TOKEN_ENV = "ATLAS_MILVUS_TOKEN"  # "user:password" or an API key for a server; never stored
# Collection names: letters, digits and underscores, starting with a letter or underscore, <= 255.
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_HNSW = re.compile(r"^HNSW(\d+)(,Flat)?$")
_IVF = re.compile(r"^IVF(\d+),(Flat|SQ8)$")


class MilvusUnavailableError(RuntimeError):
    """A Milvus URI cannot be reached or opened (pymilvus missing, no server, Lite folder busy)."""


def is_milvus_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus: a Lite folder (ends in ``.db``) or a server (http/https/tcp)."""
    return uri.endswith(".db") or uri.split("://", 1)[0].lower() in ("http", "https", "tcp")


def milvus_params(spec: str) -> tuple[str, dict[str, int], dict[str, int]]:
    """A spec string → (Milvus index type, build parameters, search parameters)."""
    factory, params = parse_spec(spec)
    params = dict(params)
    if factory == "Flat":
        kind, build, search = "FLAT", {}, {}
    elif m := _HNSW.match(factory):
        kind = "HNSW"
        build = {"M": int(m.group(1)), "efConstruction": params.pop("efConstruction", 40)}
        search = {"ef": params.pop("efSearch", DEFAULT_SEARCH_PARAMS["HNSW"]["efSearch"])}
    elif m := _IVF.match(factory):
        kind = "IVF_FLAT" if m.group(2) == "Flat" else "IVF_SQ8"
        build = {"nlist": int(m.group(1))}
        search = {"nprobe": params.pop("nprobe", DEFAULT_SEARCH_PARAMS["IVF"]["nprobe"])}
    else:
        raise IndexSpecError(f"the milvus backend has no index for spec {spec!r} "
                             "(it knows Flat, HNSW<M>, IVF<nlist>,Flat and IVF<nlist>,SQ8)")
    if params:
        raise IndexSpecError(f"index {spec!r} has no search parameter {sorted(params)[0]!r} on the milvus backend")
    return kind, build, search


_CLIENTS: dict[str, Any] = {}


def client(uri: str) -> Any:
    """One `MilvusClient` per URI and process (a Lite URI starts its in-process server once)."""
    if uri in _CLIENTS:
        return _CLIENTS[uri]
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise MilvusUnavailableError("the milvus backend needs pymilvus and milvus-lite: "
                                     "pip install 'concept-atlas[milvus]'") from None
    if uri.endswith(".db") and not os.path.isdir(os.path.dirname(os.path.abspath(uri))):
        raise MilvusUnavailableError(f"cannot open Milvus Lite at {uri}: its folder does not exist")
    lite_log, caught = logging.getLogger("milvus_lite"), _Caught()
    lite_log.addHandler(caught)  # a failed Lite start is logged with a traceback: keep it, say one line
    propagate, lite_log.propagate = lite_log.propagate, False
    try:
        # Milvus Lite runs in this process: keepalive pings to it are pointless, and its gRPC server
        # answers pymilvus's 10 s ones with GOAWAY "too_many_pings" (logged to stderr) once idle.
        options = {"grpc_options": LITE_GRPC_OPTIONS} if uri.endswith(".db") else {}
        c = MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""), timeout=30, **options)
    except MilvusException as e:
        if uri.endswith(".db"):
            raise MilvusUnavailableError(
                f"cannot open Milvus Lite at {uri}: {caught.reason() or _reason(e)} (Milvus Lite serves one "
                "process at a time; a Milvus server shares an atlas)") from None
        raise MilvusUnavailableError(f"cannot reach Milvus at {uri}: {_reason(e)}") from None
    finally:
        lite_log.removeHandler(caught)
        lite_log.propagate = propagate
    _CLIENTS[uri] = c
    return c


class _Caught(logging.Handler):
    """Keeps the records Milvus Lite logs while a client connects (see `client`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def reason(self) -> str | None:
        for r in self.records:
            if r.exc_info and r.exc_info[1] is not None:
                return _reason(r.exc_info[1])
        return None


def open_uris() -> list[str]:
    """The URIs this process holds a client of."""
    return sorted(_CLIENTS)


def release(uri: str) -> None:
    """Close this process's client of ``uri``; for Milvus Lite also stop its in-process server, so
    that another process can open the folder. A later call of `client` opens it again."""
    c = _CLIENTS.pop(uri, None)
    if c is None:
        return
    try:
        c.close()
        if uri.endswith(".db"):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)
    except Exception:  # noqa: BLE001 - closing is best effort (an older milvus-lite has no release)
        pass


def _reason(e: BaseException) -> str:
    return " ".join(str(getattr(e, "message", None) or e).split())[:200]


def collections(uri: str) -> list[str]:
    """The names of all collections at ``uri``."""
    return sorted(client(uri).list_collections())


def drop_collection(uri: str, collection: str) -> None:
    """Drop ``collection`` at ``uri`` if it exists."""
    c = client(uri)
    if c.has_collection(collection):
        c.drop_collection(collection)


class MilvusIndex(VectorIndex):
    """A Milvus collection as a `VectorIndex`. ``MilvusIndex(dim, spec, uri=..., collection=...)``
    creates the collection (refused if it exists); `MilvusIndex.attach` attaches to one."""

    def __init__(self, dim: int, spec: str = "Flat", *, uri: str | None = None, collection: str | None = None,
                 _create: bool = True) -> None:
        super().__init__(dim, spec)
        self.index_type, self.build_params, self.search_params = milvus_params(spec)
        if not uri or not collection:
            raise IndexSpecError("the milvus backend needs a uri and a collection name")
        if not _COLLECTION.match(collection):
            raise IndexSpecError(f"bad Milvus collection name {collection!r} "
                                 "(letters, digits and underscores, starting with a letter or _)")
        self.uri, self.collection = uri, collection
        client(uri)  # reachable now, or a clear error
        self._indexed = not _create
        if _create:
            self._create()

    @property
    def _client(self) -> Any:  # looked up per call: a released client (`release`) is opened again
        return client(self.uri)

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        c = self._client
        if c.has_collection(self.collection):
            raise IndexSpecError(f"a Milvus collection named {self.collection!r} exists at {self.uri}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        c.create_collection(self.collection, schema=schema, consistency_level="Strong")

    @classmethod
    def attach(cls, uri: str, collection: str, spec: str) -> MilvusIndex:
        """Attach to an existing collection; `IndexCorruptError` if it is missing or not an atlas index."""
        c = client(uri)
        if not c.has_collection(collection):
            raise IndexCorruptError(f"no Milvus collection {collection!r} at {uri}")
        fields = {f["name"]: f for f in c.describe_collection(collection)["fields"]}
        vec = fields.get(VECTOR_FIELD)
        if ID_FIELD not in fields or vec is None or "dim" not in (vec.get("params") or {}):
            raise IndexCorruptError(f"Milvus collection {collection!r} at {uri} is not an atlas index "
                                    f"(fields {sorted(fields)})")
        out = cls(int(vec["params"]["dim"]), spec, uri=uri, collection=collection, _create=False)
        c.load_collection(collection)
        return out

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        x, ids = self._check_rows(vectors, ids)
        for start in range(0, len(x), INSERT_BATCH):
            rows = [{ID_FIELD: int(i), VECTOR_FIELD: v}
                    for i, v in zip(ids[start:start + INSERT_BATCH], x[start:start + INSERT_BATCH])]
            self._client.insert(self.collection, rows)
        self._client.flush(self.collection)
        if not self._indexed:  # built after the data, as FAISS trains on it (IVF's centroids)
            params = self._client.prepare_index_params()
            params.add_index(field_name=VECTOR_FIELD, index_type=self.index_type, metric_type="IP",
                             params=self.build_params)
            self._client.create_index(self.collection, params)
            self._indexed = True
        self._client.load_collection(self.collection)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._check_queries(queries)
        n = self.count()
        k = max(1, min(int(k), max(n, 1), MAX_TOPK))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if n == 0:
            return scores, ids
        for start in range(0, len(q), SEARCH_BATCH):
            res = self._client.search(
                self.collection, data=list(q[start:start + SEARCH_BATCH]), limit=k, anns_field=VECTOR_FIELD,
                search_params={"metric_type": "IP", "params": self.search_params}, output_fields=[ID_FIELD],
            )
            for row, hits in enumerate(res, start=start):
                for col, h in enumerate(list(hits)[:k]):
                    ids[row, col], scores[row, col] = int(h["id"]), float(h["distance"])
        return scores, ids

    def count(self) -> int:
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (m, dim); `IndexCorruptError` if any is missing."""
        wanted = [int(i) for i in np.asarray(ids).ravel()]
        got = {int(r[ID_FIELD]): r[VECTOR_FIELD]
               for r in self._client.get(self.collection, ids=wanted, output_fields=[ID_FIELD, VECTOR_FIELD])}
        missing = [i for i in wanted if i not in got]
        if missing:
            raise IndexCorruptError(f"Milvus collection {self.collection!r} lacks ids {missing[:5]}")
        return np.asarray([got[i] for i in wanted], dtype=np.float32).reshape(len(wanted), self.dim)

    def drop(self) -> None:
        """Drop the collection (and with it every vector)."""
        drop_collection(self.uri, self.collection)

    def to_bytes(self) -> bytes:
        raise IndexSpecError("a Milvus index lives in its collection and has no bytes; "
                             f"MilvusIndex.attach({self.uri!r}, {self.collection!r}, spec) attaches to it")

    @classmethod
    def from_bytes(cls, data: bytes, spec: str | None = None) -> MilvusIndex:
        raise IndexSpecError("a Milvus index is not read from bytes; MilvusIndex.attach attaches to its collection")


register_backend("milvus", MilvusIndex)
