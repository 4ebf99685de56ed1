"""block checksums: the XXH3-64 hash of each 1 MiB block of each atlas's vector and index files

Reads check the blocks they use against these (`engine.store.blocksums`), so a byte that flips in
the middle of a file (its size, mtime, head and tail unchanged) is refused instead of read. Null on
rows written before this revision: their files are read as before (checked by their stamp) until
`atlas index verify --fix` adds the sums, once each file still matches its recorded sha256.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 09:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("vector", "index")


def upgrade() -> None:
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        for kind in COLUMNS:
            batch_op.add_column(sa.Column(f"{kind}_blocks", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        for kind in reversed(COLUMNS):
            batch_op.drop_column(f"{kind}_blocks")
