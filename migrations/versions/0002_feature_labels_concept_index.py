"""feature_labels.concept_id index

Removing concepts (an atlas) cascades to every label that names them; without an index on
``concept_id`` each cascade scans the whole label table. The index also serves "which subject
features carry this concept".

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 03:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feature_labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feature_labels_concept_id"), ["concept_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feature_labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feature_labels_concept_id"))
