"""top contexts: context_runs and concept_contexts

Per concept, the top activating text windows of a corpus passed through an atlas's model (or a
map's subject model, mapped into the atlas): `engine.labelling.contexts`, rows in `engine.store.contexts`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "context_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("atlas_id", sa.Integer(), nullable=False),
        sa.Column("map_id", sa.Integer(), nullable=True),
        sa.Column("corpus", sa.Text(), nullable=False),
        sa.Column("corpus_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("top", sa.Integer(), nullable=False),
        sa.Column("n_texts", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("scoring", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["atlas_id"], ["atlases.id"], name=op.f("fk_context_runs_atlas_id_atlases"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["map_id"], ["alignment_maps.id"],
                                name=op.f("fk_context_runs_map_id_alignment_maps"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_context_runs")),
    )
    with op.batch_alter_table("context_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_context_runs_atlas_id"), ["atlas_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_context_runs_map_id"), ["map_id"], unique=False)

    op.create_table(
        "concept_contexts",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("activation", sa.Float(), nullable=False),
        sa.Column("text_index", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("window", sa.Text(), nullable=False),
        sa.Column("window_start", sa.Integer(), nullable=False),
        sa.Column("token_start", sa.Integer(), nullable=False),
        sa.Column("token_end", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["context_runs.id"], name=op.f("fk_concept_contexts_run_id_context_runs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "ordinal", "rank", name=op.f("pk_concept_contexts")),
    )


def downgrade() -> None:
    op.drop_table("concept_contexts")
    with op.batch_alter_table("context_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_context_runs_map_id"))
        batch_op.drop_index(batch_op.f("ix_context_runs_atlas_id"))
    op.drop_table("context_runs")
