"""full-text search over concept labels on PostgreSQL (tsvector + GIN)

SQLite's full text lives in the FTS5 table of 0001 (porter stemmer, no stop words, bm25 over
label and description weighted 4:1). On PostgreSQL the same search is a GIN index over a stored
generated column ``concepts.fts_vector``, a weighted tsvector: the label weighted 'A', the
description 'B' (`engine.atlas.lookup` ranks with ``ts_rank`` at weights 1.0 and 0.25, the same
4:1). Stored, not an expression index: ranking and filtering read each row's vector instead of
parsing its text again (at 5,000 concepts, when the planner chose to filter rows rather than use
the index, a query took 126 ms over an expression index and under 1 ms over the stored column). The column is outside the ORM, like FTS5's table:
the database fills it on every insert and update. The text search configuration
``atlas_english`` is ``english`` with a Snowball stemmer that keeps stop words (a query of
function words alone must still match, as on FTS5). Nothing changes on SQLite: the revision
chain is the same on both databases.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TSVECTOR = ("(setweight(to_tsvector('atlas_english'::regconfig, label), 'A') || "
             "setweight(to_tsvector('atlas_english'::regconfig, coalesce(description, '')), 'B'))")
_TOKENS = "asciiword, word, numword, asciihword, hword, numhword, hword_asciipart, hword_part, hword_numpart"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE TEXT SEARCH DICTIONARY atlas_english_stem (TEMPLATE = snowball, Language = english)")
    op.execute("CREATE TEXT SEARCH CONFIGURATION atlas_english (COPY = english)")
    op.execute(f"ALTER TEXT SEARCH CONFIGURATION atlas_english ALTER MAPPING FOR {_TOKENS} WITH atlas_english_stem")
    op.execute(f"ALTER TABLE concepts ADD COLUMN fts_vector tsvector GENERATED ALWAYS AS {_TSVECTOR} STORED")
    op.execute("CREATE INDEX concepts_fts_gin ON concepts USING gin (fts_vector)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS concepts_fts_gin")
    op.execute("ALTER TABLE concepts DROP COLUMN IF EXISTS fts_vector")
    op.execute("DROP TEXT SEARCH CONFIGURATION IF EXISTS atlas_english")
    op.execute("DROP TEXT SEARCH DICTIONARY IF EXISTS atlas_english_stem")
