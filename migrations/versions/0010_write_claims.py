"""write claims: a ``write_claims`` row per write in progress

A writer inserts a claim on its file token (`engine.store.layout.new_token`) before it writes its
first file and deletes it after its commit, so `atlas gc` (any grace) keeps the files of a write
still running, on this host or another. Rows of killed writers are removed by `atlas gc`. A
downgrade below this revision drops the table (only claims of running writes are lost).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 03:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "write_claims",
        sa.Column("token", sa.String(length=40), nullable=False),
        sa.Column("host", sa.String(length=8), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_write_claims")),
    )


def downgrade() -> None:
    op.drop_table("write_claims")
