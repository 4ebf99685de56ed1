"""unique file names: a store file is claimed by one row at most

Files are written under names their writer owns (``<name>@<pid>-<token>``) and claimed by the
commit of the row that records them; these unique indexes make the database refuse a second
claim on one file (an atlas's vectors or index, a map's tensors). Indexes, not table
constraints: SQLite adds them without rebuilding the tables (a rebuild's DROP TABLE would cascade
through the foreign keys).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 05:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = (
    ("atlases", "vector_file"),
    ("atlases", "index_file"),
    ("alignment_maps", "file"),
)


def upgrade() -> None:
    for table, column in _INDEXES:
        op.create_index(f"ix_{table}_{column}", table, [column], unique=True)


def downgrade() -> None:
    for table, column in reversed(_INDEXES):
        op.drop_index(f"ix_{table}_{column}", table_name=table)
