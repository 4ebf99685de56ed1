"""Vector-index backends behind one small interface.

``indexes`` knows nothing of the engine: it stores float32 vectors under integer ids and answers
inner-product nearest-neighbour queries: in a FAISS file (`indexes.faiss_backend`) or a Milvus
collection (`indexes.milvus`, pymilvus loaded on first use). Backends register themselves by name; the engine picks
one by name and a spec string.
"""

from indexes.base import (
    IndexCorruptError,
    IndexSpecError,
    VectorIndex,
    backends,
    create_index,
    load_index,
    open_index,
    register_backend,
)
from indexes.faiss_backend import FaissIndex
from indexes.milvus import MilvusIndex

__all__ = [
    "FaissIndex",
    "IndexCorruptError",
    "IndexSpecError",
    "MilvusIndex",
    "VectorIndex",
    "backends",
    "create_index",
    "load_index",
    "open_index",
    "register_backend",
]
