"""File and folder names of a store, in one place (docs/design.md §3).

Every file a writer creates is named so that no other writer and no other name can produce it:
``<folder>/<name>@<pid>-<12 hex>[.labels].<ext>``. Names never contain ``@`` (`engine.util.check_name`),
so what precedes the first ``@`` is the whole name (``X.labels`` cannot reach atlas ``X``'s files);
the random part makes the file this write's own (two imports of one name write two files and the
database row, committed last, claims one of them); the pid says which process wrote it, so
`Store.gc` can tell a running writer's file from a killed one's. The database row records the
file name; nothing derives a file name from an object's name.

Temporary files (`indexes.base.write_atomic`) are ``.<pid>.<random>.tmp`` beside their target.

Milvus collections (an atlas's index on the milvus backend) are owned the same way, in the
letters, digits and underscores Milvus allows: ``atlas_<name>__<host>_<pid>_<12 hex>``, the name
with every other byte written ``_<2 hex>`` (so ``__`` only ever ends it; a name too long for Milvus
becomes ``_h<16 hex>`` of its hash) and ``<host>`` 8 hex
digits of this host's name (a shared server sees writers of many hosts; only this host's pids can
be checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

DB_FILE = "atlas.db"
# Where the metadata lives when it is not DB_FILE: {"url": <SQLAlchemy URL, no password>}, written by
# `atlas init --db-url` so later commands on the folder find the database without the flag.
DB_URL_FILE = "database.json"
VECTORS_DIR = "vectors"  # <atlas>@<token>.safetensors: the source of truth for directions
INDEXES_DIR = "indexes"  # <atlas>@<token>.faiss (derived, rebuildable), <atlas>@<token>.labels.faiss
MAPS_DIR = "maps"  # <map>@<token>.safetensors: alignment-map tensors
MODELS_DIR = "models"  # models the store built itself (ConceptWorld)
ACTIVATIONS_DIR = "activations"  # optional activation caches
RUNS_DIR = "runs"  # <run>@<token>.<kind>.npz: what a labelling run ranks with (its atlas-side statistic, ...)
STORE_DIRS = (VECTORS_DIR, INDEXES_DIR, MAPS_DIR, MODELS_DIR, ACTIVATIONS_DIR, RUNS_DIR)
# Folders whose files are all claimed by database rows (`Store.gc` looks for leftovers there).
OWNED_DIRS = (VECTORS_DIR, INDEXES_DIR, MAPS_DIR, RUNS_DIR)

# Tensor names inside an atlas vector file.
DIRECTIONS_KEY = "directions"  # (n_concepts, d): decoder rows / concept directions, as imported
ENCODER_KEYS = ("W_enc", "b_enc", "b_dec", "threshold", "k")  # kept when an SAE carries them (k: TopK)

OWNER_SEP = "@"  # never in a name (check_name), so it ends the name part of every file name


def new_token() -> str:
    """A file token this process owns: ``<pid>-<12 random hex digits>``."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def vector_file(name: str, token: str) -> str:
    return f"{VECTORS_DIR}/{name}{OWNER_SEP}{token}.safetensors"


def index_file(name: str, token: str) -> str:
    return f"{INDEXES_DIR}/{name}{OWNER_SEP}{token}.faiss"


def label_index_file(name: str, token: str) -> str:
    return f"{INDEXES_DIR}/{name}{OWNER_SEP}{token}.labels.faiss"


def map_file(name: str, token: str) -> str:
    return f"{MAPS_DIR}/{name}{OWNER_SEP}{token}.safetensors"


def run_file(name: str, token: str, kind: str) -> str:
    """A file of labelling run ``name`` (``kind``: ``stat``, ``coact``; letters only)."""
    return f"{RUNS_DIR}/{name}{OWNER_SEP}{token}.{kind}.npz"


def run_files(params: dict[str, Any] | None) -> list[str]:
    """The files a labelling run's ``params`` claim (``params["files"]``: kind -> {file, sha256})."""
    return [rec["file"] for rec in ((params or {}).get("files") or {}).values() if rec.get("file")]


def legacy_label_index_file(name: str) -> str:
    """Where stores written before owned file names kept an atlas's label index (read, never written)."""
    return f"{INDEXES_DIR}/{name}.labels.faiss"


_OWNED = re.compile(r"^(?P<name>[^@/]+)@(?P<token>(?P<pid>\d+)-[0-9a-f]{12})((\.labels)?\.(faiss|safetensors)|\.[a-z]+\.npz)$")
_TEMP = re.compile(r"^\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def label_index_files(name: str, extra: dict[str, Any] | None, legacy: bool = True) -> list[str]:
    """The label-embedding index file an atlas row claims (and the name older stores used)."""
    meta = (extra or {}).get("label_index") or {}
    out = [meta["file"]] if meta.get("file") else []
    if legacy and meta and not meta.get("file"):
        out.append(legacy_label_index_file(name))
    return out


@dataclasses.dataclass(frozen=True)
class FileOwner:
    """What a store file's name says about it: the object it was written for and its writer."""

    name: str | None  # the atlas or map name (None for temporary and unknown files)
    pid: int | None  # the writing process (None where the name does not say)
    temporary: bool
    token: str | None = None  # the write's token (`new_token`; None for temporary and unknown files)


COLLECTION_PREFIX = "atlas_"
_COLLECTION_NAME_MAX = 160  # escaped names longer than this become a hash (Milvus allows 255 in all)
_OWNED_COLLECTION = re.compile(
    r"^atlas_(?P<name>(?:[A-Za-z0-9]|_[0-9a-f]{2})*|_h[0-9a-f]{16})__(?P<host>[0-9a-f]{8})_(?P<pid>\d+)_[0-9a-f]{12}$")


def host_tag() -> str:
    """8 hex digits naming this host in collection names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def collection_name(name: str, token: str) -> str:
    """The Milvus collection of atlas ``name`` written under ``token`` (`new_token`)."""
    esc = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in name.encode())
    if len(esc) > _COLLECTION_NAME_MAX:
        esc = "_h" + hashlib.sha256(name.encode()).hexdigest()[:16]
    pid, _, rand = token.partition("-")
    return f"{COLLECTION_PREFIX}{esc}__{host_tag()}_{pid}_{rand}"


@dataclasses.dataclass(frozen=True)
class CollectionOwner:
    """What an owned collection's name says: the atlas (None when hashed), host tag and writer pid."""

    name: str | None
    host: str
    pid: int


def collection_owner(collection: str) -> CollectionOwner | None:
    """Parse an owned collection name; ``None`` for collections the store did not name."""
    m = _OWNED_COLLECTION.match(collection)
    if not m:
        return None
    esc = m.group("name")
    name = None
    if not esc.startswith("_h"):  # "_h" never starts an escaped name: a hashed (long) one
        raw = re.sub(rb"_([0-9a-f]{2})", lambda g: bytes([int(g.group(1), 16)]), esc.encode())
        name = raw.decode(errors="replace")
    return CollectionOwner(name, m.group("host"), int(m.group("pid")))


def file_owner(filename: str) -> FileOwner:
    """Parse a file name of a store folder (see the module docstring)."""
    m = _OWNED.match(filename)
    if m:
        return FileOwner(m.group("name"), int(m.group("pid")), False, m.group("token"))
    m = _TEMP.match(filename)
    if m:
        return FileOwner(None, int(m.group("pid")), True)
    return FileOwner(None, None, filename.startswith(".") and filename.endswith(".tmp"))


def sqlite_url(root: Path) -> str:
    return f"sqlite:///{(root / DB_FILE).resolve()}"
