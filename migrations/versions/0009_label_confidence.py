"""label confidence: a nullable ``feature_labels.confidence`` column

The probability that a feature's first hit is right (`engine.labelling.confidence`), on the rank-1
row of each feature; null on the other ranks and on every row of runs written before this
revision (they carry no confidence: `--min-confidence` on such a run is refused). A downgrade below this
revision drops the column and with it the confidences; every other field of the rows stays.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 01:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feature_labels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feature_labels", schema=None) as batch_op:
        batch_op.drop_column("confidence")
