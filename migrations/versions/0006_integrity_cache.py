"""integrity cache: size, mtime and head checksum of each atlas's vector and index files

Opening an atlas checks these (`engine.util.FileStamp`) instead of hashing whole files; the full
sha256 stays in ``vector_sha256`` / ``index_sha256`` and runs in `atlas index verify`. Null on
rows written before this revision: their first open checks the full sha256 and fills them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("vector", "index")


def upgrade() -> None:
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        for kind in COLUMNS:
            batch_op.add_column(sa.Column(f"{kind}_size", sa.BigInteger(), nullable=True))
            batch_op.add_column(sa.Column(f"{kind}_mtime_ns", sa.BigInteger(), nullable=True))
            batch_op.add_column(sa.Column(f"{kind}_head_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        for kind in reversed(COLUMNS):
            batch_op.drop_column(f"{kind}_head_sha256")
            batch_op.drop_column(f"{kind}_mtime_ns")
            batch_op.drop_column(f"{kind}_size")
