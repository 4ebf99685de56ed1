"""The schema revisions this version knows, read without Alembic or SQLAlchemy.

The revision ids come from the migration files' own ``revision`` / ``down_revision`` lines
(importing Alembic and loading its script directory costs more than the rest of a lookup). Used by
`engine.store.migrate` (every store open) and by the plain SQLite reader (`engine.store.reader`),
which checks a database's revision without SQLAlchemy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import migrations

SCRIPT_LOCATION = str(Path(migrations.__file__).parent)
VERSION_TABLE = "alembic_version"  # Alembic's default; env.py keeps it
_HEADER = re.compile(r"""^(down_revision|revision)\b[^=]*=\s*(?:['"]([^'"]+)['"]|None)""", re.M)


@functools.lru_cache(maxsize=1)
def revision_graph() -> dict[str, str | None]:
    """Each known revision and the one it follows (None for the first), read from the headers of
    ``migrations/versions/*.py``."""
    graph: dict[str, str | None] = {}
    for path in sorted((Path(SCRIPT_LOCATION) / "versions").glob("*.py")):
        fields = {m.group(1): m.group(2) for m in _HEADER.finditer(path.read_text(encoding="utf-8"))}
        if "revision" in fields and fields["revision"]:
            graph[fields["revision"]] = fields.get("down_revision")
    return graph


def head_revision() -> str:
    """The newest revision: the one no other revision follows."""
    graph = revision_graph()
    heads = set(graph) - {down for down in graph.values() if down}
    if len(heads) != 1:
        raise RuntimeError(f"the migrations must form one chain; heads: {sorted(heads)}")
    return heads.pop()


def known_revisions() -> set[str]:
    return set(revision_graph())
