"""Where an atlas's index lives: a FAISS file in the store, or a Milvus collection (docs/design.md §3).

``--index-uri`` says which: ``faiss`` (the default: a file in ``indexes/``), a Milvus Lite folder
(a path ending in ``.db``: embedded, one process at a time), or a Milvus server or cluster
(``http://host:19530``, ``https://...``, ``tcp://...``). The store records the backend and the
URI per atlas (migration 0007). A Lite folder inside the store is recorded relative to the store
root, so a moved or copied store keeps its vectors; a relative Lite path given on the command line
is relative to the store root, not the working directory (the same behaviour from anywhere).
Credentials never go into the URI (the database would keep them): `indexes.milvus.TOKEN_ENV`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

from engine.errors import BadValueError

FAISS, MILVUS = "faiss", "milvus"
URI_HINT = ("use faiss (a FAISS file in the store), a Milvus Lite folder ending in .db (e.g. milvus.db, "
            "relative to the store root) or a Milvus server URI such as http://host:19530")


@dataclasses.dataclass(frozen=True)
class IndexLocation:
    """An atlas index's backend and, for Milvus, its URI as the store records it."""

    backend: str  # "faiss" | "milvus"
    uri: str | None = None  # Milvus: a Lite folder (relative to the store root where inside it) or a server

    @property
    def is_lite(self) -> bool:
        return self.backend == MILVUS and bool(self.uri) and str(self.uri).endswith(".db")

    def connect_uri(self, root: Path) -> str:
        """The URI pymilvus connects to: a recorded relative Lite folder resolved against ``root``."""
        if self.uri is None:
            raise BadValueError("a FAISS index has no URI")
        if self.is_lite and not Path(self.uri).is_absolute():
            return str(root / self.uri)
        return self.uri


def parse_index_uri(text: str, root: Path) -> IndexLocation:
    """``--index-uri`` → the location the store records (see the module docstring)."""
    value = str(text).strip()
    if value.lower() == FAISS:
        return IndexLocation(FAISS)
    if value.endswith(".db"):
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else root / p).resolve()
        if p.exists() and not p.is_dir():
            raise BadValueError(f"--index-uri {value!r}: {p} is a file; a Milvus Lite URI names a folder "
                                "(made on first use)")
        if not p.parent.is_dir():
            raise BadValueError(f"--index-uri {value!r}: the folder {p.parent} does not exist")
        try:
            return IndexLocation(MILVUS, p.relative_to(root.resolve()).as_posix())
        except ValueError:
            return IndexLocation(MILVUS, str(p))
    parts = urlsplit(value)
    if parts.scheme.lower() in ("http", "https", "tcp"):
        if parts.username or parts.password:
            raise BadValueError(f"--index-uri: put credentials in $ATLAS_MILVUS_TOKEN, not in the URI "
                                f"(the store records the URI); got {parts.scheme}://...@{parts.hostname}")
        if not parts.hostname:
            raise BadValueError(f"--index-uri {value!r} names no host; {URI_HINT}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise BadValueError(f"--index-uri {value!r} has a bad port; {URI_HINT}") from None
        return IndexLocation(MILVUS, value.rstrip("/"))
    raise BadValueError(f"--index-uri {value[:80]!r} is not understood; {URI_HINT}")
