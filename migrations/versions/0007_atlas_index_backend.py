"""atlases.index_backend, atlases.index_uri: which backend holds an atlas's vectors

An atlas's index is a FAISS file in the store (``index_backend = 'faiss'``, ``index_file`` the
file, as before) or a Milvus collection (``'milvus'``: ``index_uri`` the Milvus Lite folder,
relative to the store root when it lies inside it, or a server's URI; ``index_file`` the
collection name). Existing atlases are FAISS files.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("index_backend", sa.String(length=20), nullable=False,
                                      server_default="faiss"))
        batch_op.add_column(sa.Column("index_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    # Milvus-held atlases cannot be described by the older schema: refuse rather than lose them.
    conn = op.get_bind()
    n = conn.execute(sa.text("SELECT count(*) FROM atlases WHERE index_backend != 'faiss'")).scalar()
    if n:
        raise RuntimeError(f"{n} atlas(es) keep their vectors in Milvus; `atlas index rebuild <atlas> "
                           "--index-uri faiss` moves them to FAISS files before a downgrade below 0007")
    with op.batch_alter_table("atlases", schema=None) as batch_op:
        batch_op.drop_column("index_uri")
        batch_op.drop_column("index_backend")
