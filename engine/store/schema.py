"""SQLAlchemy models of the metadata database (docs/design.md §3).

The schema is created only by Alembic revisions in ``migrations/``; a test checks that these
models and the migrations agree. The MetaData has a naming convention so constraints can be
altered later under SQLite's batch mode. The full-text objects over concept labels live outside
the ORM (they differ by database): on SQLite an FTS5 table kept in sync by triggers (migration
0001), on PostgreSQL a generated column ``concepts.fts_vector`` with a GIN index (migration 0008).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine.util import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Prefix of the objects that exist in the database but not in the ORM: FTS5's table and its shadow
# tables (SQLite), the GIN index (PostgreSQL); and PostgreSQL's generated tsvector column of concepts.
FTS_TABLE = "concepts_fts"
FTS_COLUMN = "fts_vector"


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic filter: the full-text objects are created by hand in the migrations."""
    if type_ == "column" and name == FTS_COLUMN:
        return False
    return not (type_ in ("table", "index") and name and name.startswith(FTS_TABLE))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """A language model known to the store (foundation or subject)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str | None] = mapped_column(Text)  # local path or hub id
    source_kind: Mapped[str | None] = mapped_column(String(10))  # store (relative to the root) | path | hub
    revision: Mapped[str | None] = mapped_column(String(200))
    architecture: Mapped[str | None] = mapped_column(String(200))
    d_model: Mapped[int | None] = mapped_column(Integer)
    n_layers: Mapped[int | None] = mapped_column(Integer)
    tokenizer_fingerprint: Mapped[str | None] = mapped_column(String(64))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AtlasRow(Base):
    """A set of labelled concept directions at one foundation site, with its index."""

    __tablename__ = "atlases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    hook: Mapped[str] = mapped_column(String(50), default="resid_post")
    dim: Mapped[int] = mapped_column(Integer)
    n_concepts: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(20), default="cosine")
    raw_residuals: Mapped[bool] = mapped_column(Boolean, default=True)
    source_kind: Mapped[str] = mapped_column(String(50))  # saelens, gemmascope, matrix, world, ...
    source_ref: Mapped[str | None] = mapped_column(Text)
    # file names relative to the store root, claimed by this row alone (migration 0003)
    vector_file: Mapped[str] = mapped_column(Text, unique=True, index=True)
    vector_sha256: Mapped[str] = mapped_column(String(64))
    # the FAISS file, or with index_backend "milvus" the collection name at index_uri (0007)
    index_file: Mapped[str] = mapped_column(Text, unique=True, index=True)
    index_backend: Mapped[str] = mapped_column(String(20), default="faiss", server_default="faiss")
    index_uri: Mapped[str | None] = mapped_column(Text)  # Milvus: a Lite folder (store-relative) or a server
    index_spec: Mapped[str] = mapped_column(String(100), default="Flat")
    index_sha256: Mapped[str | None] = mapped_column(String(64))
    index_count: Mapped[int | None] = mapped_column(Integer)
    # the integrity cache (migration 0006): each file's `engine.util.FileStamp` (size, mtime in ns,
    # sha256 of its head and tail), checked on open instead of the full sha256 (`atlas index verify`)
    vector_size: Mapped[int | None] = mapped_column(BigInteger)
    vector_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    vector_head_sha256: Mapped[str | None] = mapped_column(String(64))
    index_size: Mapped[int | None] = mapped_column(BigInteger)
    index_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    index_head_sha256: Mapped[str | None] = mapped_column(String(64))
    # the XXH3-64 hash of each 1 MiB block of each file (migration 0011: `engine.store.blocksums`), checked
    # by reads before they use a block; null on rows written before (`atlas index verify --fix` adds them).
    # Deferred: loaded only by the reads that check blocks (a 3 GB file has 24 KB of them).
    vector_blocks: Mapped[str | None] = mapped_column(Text, deferred=True)
    index_blocks: Mapped[str | None] = mapped_column(Text, deferred=True)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ConceptRow(Base):
    """One labelled direction; ``ordinal`` is its row in the vector file and its FAISS id."""

    __tablename__ = "concepts"
    __table_args__ = (UniqueConstraint("atlas_id", "ordinal", name="uq_concepts_atlas_ordinal"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    atlas_id: Mapped[int] = mapped_column(ForeignKey("atlases.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    labelled: Mapped[bool] = mapped_column(Boolean, default=True)
    source_kind: Mapped[str | None] = mapped_column(String(50))
    source_ref: Mapped[str | None] = mapped_column(Text)
    density: Mapped[float | None] = mapped_column(Float)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AlignmentMapRow(Base):
    """A stored affine map from a subject site to an atlas site (tensors in ``maps/``)."""

    __tablename__ = "alignment_maps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    subject_model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    subject_layer: Mapped[int] = mapped_column(Integer)
    subject_hook: Mapped[str] = mapped_column(String(50), default="resid_post")
    atlas_id: Mapped[int] = mapped_column(ForeignKey("atlases.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(50))
    pairing: Mapped[str | None] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    file: Mapped[str] = mapped_column(Text, unique=True, index=True)  # claimed by this row alone (0003)
    sha256: Mapped[str] = mapped_column(String(64))
    d_subject: Mapped[int] = mapped_column(Integer)
    d_atlas: Mapped[int] = mapped_column(Integer)
    n_pairs: Mapped[int] = mapped_column(Integer)
    corpus_fingerprint: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LabelRunRow(Base):
    """A bulk labelling run of many subject features through one map; resumable."""

    __tablename__ = "label_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    map_id: Mapped[int] = mapped_column(ForeignKey("alignment_maps.id", ondelete="CASCADE"), index=True)
    feature_source: Mapped[str] = mapped_column(Text)
    feature_fingerprint: Mapped[str] = mapped_column(String(64))
    n_features: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer, default=1024)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|running|done|failed
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class FeatureLabelRow(Base):
    """One hit of one feature in a labelling run; (run, feature, rank) is unique."""

    __tablename__ = "feature_labels"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("label_runs.id", ondelete="CASCADE"), primary_key=True
    )
    feature_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    # indexed: removing concepts cascades here, and "which features carry this concept" reads it
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    score: Mapped[float] = mapped_column(Float)
    # the probability that the feature's first hit is right (rank-1 rows; null elsewhere and on older runs)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)


class ContextRunRow(Base):
    """A pass of a corpus through an atlas's model (or a map's subject model) that keeps, per concept,
    the top activating text windows (`engine.labelling.contexts`); resumable, one per atlas or map."""

    __tablename__ = "context_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    atlas_id: Mapped[int] = mapped_column(ForeignKey("atlases.id", ondelete="CASCADE"), index=True)
    # None: the atlas's own model at its site; else the map's subject model, mapped into the atlas
    map_id: Mapped[int | None] = mapped_column(ForeignKey("alignment_maps.id", ondelete="CASCADE"), index=True)
    corpus: Mapped[str] = mapped_column(Text)  # the corpus file as given
    corpus_fingerprint: Mapped[str] = mapped_column(String(64))
    top: Mapped[int] = mapped_column(Integer)
    n_texts: Mapped[int] = mapped_column(Integer)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    chunk: Mapped[int] = mapped_column(Integer)  # texts per commit: the unit of resume
    scoring: Mapped[str] = mapped_column(String(20))  # encoder | projection
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|running|done|failed|interrupted
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ConceptContextRow(Base):
    """One of a concept's top text windows in a context run; (run, ordinal, rank) is unique."""

    __tablename__ = "concept_contexts"

    run_id: Mapped[int] = mapped_column(ForeignKey("context_runs.id", ondelete="CASCADE"), primary_key=True)
    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True)  # the concept's row in its atlas
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1 = highest activation
    activation: Mapped[float] = mapped_column(Float)
    text_index: Mapped[int] = mapped_column(Integer)  # the text's row in the corpus
    position: Mapped[int] = mapped_column(Integer)  # the token's position in the model's input
    window: Mapped[str] = mapped_column(Text)  # the text around the token
    window_start: Mapped[int] = mapped_column(Integer)  # character offset of the window in the text
    token_start: Mapped[int] = mapped_column(Integer)  # the token's character span in the window (-1: unknown)
    token_end: Mapped[int] = mapped_column(Integer)


class WriteClaimRow(Base):
    """A write in progress: the files named with ``token`` (`engine.store.layout.new_token`) belong
    to it until it commits or fails. Written (committed) before its first file, deleted after its
    commit; `Store.gc` keeps the files of a claim whose writer is alive, or of another host."""

    __tablename__ = "write_claims"

    token: Mapped[str] = mapped_column(String(40), primary_key=True)
    host: Mapped[str] = mapped_column(String(8))  # `layout.host_tag` of the writer's host
    pid: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
