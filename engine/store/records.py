"""The plain records the store's reads return (`engine.store.reads.StoreReads`): an atlas as
`AtlasInfo` and as its row (`AtlasRecord`), a `Concept`, a search `Hit`, and what reads a row's
columns (`cached_stamp`, `row_location`) or a concept id (`parse_concept_ref`). No SQLAlchemy here:
the one-shot commands' plain ``sqlite3`` reader builds them too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from engine.errors import NotFoundError
from engine.store.index_location import FAISS, IndexLocation
from engine.util import FileStamp

MAX_ORDINAL = 2**63 - 1  # concept ordinals are SQLite INTEGERs


@dataclasses.dataclass(frozen=True)
class AtlasInfo:
    name: str
    model: str
    layer: int
    hook: str
    dim: int
    n_concepts: int
    n_labelled: int
    metric: str
    source_kind: str
    source_ref: str | None
    index_spec: str
    raw_residuals: bool
    revision: str | None = None
    has_encoder: bool = False
    vector_sha256: str = ""  # checksum of the vector file: what a run or a plan pins
    index_backend: str = FAISS  # "faiss" (a file in the store) or "milvus" (a collection at index_uri)
    index_uri: str | None = None

    @property
    def site(self) -> str:
        return site_name(self.model, self.layer, self.hook)


def site_name(model: str, layer: int, hook: str) -> str:
    """How a site reads: ``<model>@<layer>/<hook>``."""
    return f"{model}@{layer}/{hook}"


@dataclasses.dataclass(frozen=True)
class AtlasRecord:
    """An atlas's row as the reads use it: the columns of ``atlases`` under their names (so the
    helpers that take a row, `cached_stamp` and `row_location`, take either) and its model's name."""

    id: int
    name: str
    model: str  # "?" where the row's model is gone
    layer: int
    hook: str
    dim: int
    n_concepts: int
    metric: str
    source_kind: str
    source_ref: str | None
    index_spec: str
    raw_residuals: bool
    vector_file: str
    vector_sha256: str
    index_file: str
    index_backend: str | None
    index_uri: str | None
    index_sha256: str | None
    index_count: int | None
    vector_size: int | None
    vector_mtime_ns: int | None
    vector_head_sha256: str | None
    index_size: int | None
    index_mtime_ns: int | None
    index_head_sha256: str | None
    extra: dict[str, Any]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AtlasRecord:
        values = list(row)
        values[2] = values[2] or "?"
        values[11] = bool(values[11])
        values[-1] = json_value(values[-1])
        return cls(*values)

    @property
    def site(self) -> str:
        return site_name(self.model, self.layer, self.hook)

    def info(self, n_labelled: int) -> AtlasInfo:
        extra = self.extra or {}
        return AtlasInfo(
            name=self.name, model=self.model, layer=self.layer, hook=self.hook, dim=self.dim,
            n_concepts=self.n_concepts, n_labelled=n_labelled, metric=self.metric, source_kind=self.source_kind,
            source_ref=self.source_ref, index_spec=self.index_spec, raw_residuals=self.raw_residuals,
            revision=extra.get("revision"), has_encoder=bool(extra.get("has_encoder")),
            vector_sha256=self.vector_sha256, index_backend=self.index_backend or FAISS, index_uri=self.index_uri,
        )


@dataclasses.dataclass(frozen=True)
class Concept:
    atlas: str
    ordinal: int
    label: str
    description: str | None
    labelled: bool
    source_kind: str | None = None
    source_ref: str | None = None
    density: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The concept's id on the command line: ``<atlas>/<ordinal>``."""
        return f"{self.atlas}/{self.ordinal}"


@dataclasses.dataclass(frozen=True)
class Hit:
    """A search result: a concept, its cosine score and its 1-based rank."""

    ref: str
    atlas: str
    ordinal: int
    label: str
    score: float
    rank: int
    labelled: bool = True


def json_value(value: Any) -> dict[str, Any]:
    """A JSON column as read by a plain query: text on SQLite, already decoded on PostgreSQL."""
    if value is None or value == "":
        return {}
    return value if isinstance(value, dict) else json.loads(value)


def row_location(row: Any) -> IndexLocation:
    """Where an atlas row's (or `AtlasRecord`'s) index lives."""
    return IndexLocation(row.index_backend or FAISS, row.index_uri)


def cached_stamp(row: Any, kind: str) -> FileStamp | None:
    """The stamp an atlas row (or `AtlasRecord`) caches for its ``kind`` file (None: none cached)."""
    size, mtime, head = (getattr(row, f"{kind}_{c}") for c in ("size", "mtime_ns", "head_sha256"))
    return None if size is None or mtime is None or head is None else FileStamp(size, mtime, head)


def parse_concept_ref(ref: str | int, atlas: str | None = None) -> tuple[str | None, int]:
    """``"atlas/12"`` → ("atlas", 12); ``"12"`` or ``12`` → (atlas, 12)."""
    text = str(ref).strip()
    head, sep, ordinal = text.rpartition("/")
    name = head if sep else atlas
    if not ordinal.isascii() or not ordinal.lstrip("-").isdigit():
        raise NotFoundError(f"bad concept id {text[:80]!r}; use <atlas>/<ordinal>, e.g. my-atlas/12")
    value = int(ordinal)
    if not 0 <= value <= MAX_ORDINAL:
        raise NotFoundError(f"bad concept id {text[:80]!r}: an ordinal is a row number from 0 "
                            "(`atlas atlases` shows each atlas's size)")
    return (name or atlas), value
