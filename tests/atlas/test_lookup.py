"""Text lookup: FTS5 with bm25 over labels and descriptions; semantic fusion where installed."""

from __future__ import annotations

import numpy as np
import pytest

from engine.atlas.lookup import ENCODERS, MIN_COSINE, build_label_index, lookup, semantic_available
from engine.errors import BadValueError
from engine.store.store import AtlasSource

pytestmark = pytest.mark.backends("sqlite", "postgresql")

LABELS = [
    ("weather and rain", "rain, storms, clouds and the forecast"),
    ("cats", "house cats and kittens"),
    ("music", "songs, instruments and concerts"),
    ("rain gear", "umbrellas and raincoats for wet weather"),
    ("programming", "source code and compilers"),
    ("cooking", "recipes, kitchens and baking bread"),
]


@pytest.fixture
def labelled(store):
    x = np.random.default_rng(0).normal(size=(len(LABELS), 8))
    store.add_atlas(
        "t", x, [a for a, _ in LABELS], [b for _, b in LABELS], source=AtlasSource(model="m", layer=1),
    )
    return store


def test_query_syntax_is_text_and_function_words_only_count_alone(labelled):
    # FTS5 operators and quotes in a query are words, never query syntax
    assert [h.ref for h in lookup(labelled, 'weather AND "rain" NEAR(', k=2, semantic=False)] == ["t/0", "t/3"]
    for wordless in ("  ?! ", ""):  # no word: refused, never arbitrary concepts (semantic or not)
        with pytest.raises(BadValueError, match="no word"):
            lookup(labelled, wordless)
    assert lookup(labelled, "the and", semantic=False)[0].ref == "t/0"  # nothing else left: function words count


def test_text_lookup_ranks_label_matches_first(labelled):
    hits = lookup(labelled, "weather and rain", k=5, semantic=False)
    assert [h.ref for h in hits[:2]] == ["t/0", "t/3"]
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert lookup(labelled, "kittens", semantic=False)[0].label == "cats"  # description match
    assert lookup(labelled, "baking", semantic=False)[0].label == "cooking"
    assert lookup(labelled, "zebra", semantic=False) == []


def test_lookup_is_updated_when_atlases_change(labelled):
    labelled.remove_atlas("t")
    assert lookup(labelled, "rain", semantic=False) == []


@pytest.mark.skipif(not semantic_available(), reason="the `semantic` extra is not installed")
@pytest.mark.parametrize("encoder", ENCODERS)
def test_semantic_lookup_finds_paraphrase(labelled, encoder):
    assert build_label_index(labelled, "t", quiet=True, encoder=encoder) == len(LABELS)
    hits = lookup(labelled, "a feline pet", k=3)
    assert hits[0].label == "cats" and hits[0].semantic_rank == 1 and hits[0].text_rank is None
    both = lookup(labelled, "rain", k=3)
    assert both[0].text_rank is not None and both[0].semantic_rank is not None


@pytest.mark.skipif(not semantic_available(), reason="the `semantic` extra is not installed")
@pytest.mark.parametrize("encoder", ENCODERS)
def test_semantic_lookup_can_find_nothing_and_says_how_each_hit_matched(labelled, encoder):
    build_label_index(labelled, "t", quiet=True, encoder=encoder)
    assert lookup(labelled, "zzzqqq") == [] and lookup(labelled, "quantum chromodynamics") == []
    weather = lookup(labelled, "weather", k=6)
    assert {h.label for h in weather} <= {"weather and rain", "rain gear"} and weather[0].label == "weather and rain"
    assert all(h.similarity is None or h.similarity >= MIN_COSINE[encoder] for h in weather)
    assert "word in the label" in weather[0].match and "meaning" in weather[0].match
    cat = lookup(labelled, "a feline pet", k=3)[0]
    assert cat.text_rank is None and cat.match.endswith("in meaning")
    assert lookup(labelled, "kittens", k=3, semantic=False)[0].match == "word in the description"


# More labels, with words shared across concepts, stems ("rains", "raining") and long descriptions.
MORE_LABELS = LABELS + [
    ("heavy rains", "raining hard, floods after days of rain"),
    ("cat food", "what cats eat: fish, meat and dry food for pets"),
    ("weather forecast", "tomorrow's weather: sun, clouds or rain"),
    ("piano music", "the piano in classical music and jazz concerts"),
    ("python programming", "code in the Python programming language"),
    ("bread", "baking bread, flour, yeast and ovens"),
    ("storms", "thunder, lightning and storms at sea"),
    ("the", "the word 'the' itself, a function word"),
]
# Queries whose hits match every word: the same order on both databases. "rain music" matches no
# concept with both words; in its any-word ranking bm25 weighs the rarer word higher (IDF), ts_rank
# has no IDF, so there only the hits and the best one agree.
SAME_ORDER = ["rain", "raining", "weather and rain", "cats", "music concerts", "programming language",
              "baking bread", "storms thunder", "piano", "the", "zebra", "food for cats"]
QUERIES = [*SAME_ORDER, "rain music"]


def test_the_same_queries_rank_alike_on_both_databases(tmp_path, pg_admin):
    """SQLite (FTS5, bm25) and PostgreSQL (tsvector + GIN, ts_rank) answer the same queries with the
    same concepts, the same best hit, results of one shape, and (where every hit matches every word)
    the same order."""
    from engine.store.store import Store
    from tests.conftest import pg_database

    x = np.random.default_rng(0).normal(size=(len(MORE_LABELS), 8))
    answers = {}
    with pg_database(pg_admin) as url:
        for backend, db_url in (("sqlite", None), ("postgresql", url)):
            with Store.init(tmp_path / backend, db_url=db_url) as store:
                store.add_atlas(
                    "t", x, [a for a, _ in MORE_LABELS], [b for _, b in MORE_LABELS],
                    source=AtlasSource(model="m", layer=1),
                )
                answers[backend] = {q: lookup(store, q, k=20, semantic=False) for q in QUERIES}
    for q in QUERIES:
        lite, pg = answers["sqlite"][q], answers["postgresql"][q]
        assert {h.ref for h in lite} == {h.ref for h in pg}, q
        assert [h.ref for h in lite[:1]] == [h.ref for h in pg[:1]], q
        assert [(h.rank, h.text_rank, h.semantic_rank) for h in lite] == [(h.rank, h.text_rank, h.semantic_rank)
                                                                           for h in pg], q
        if q in SAME_ORDER:
            assert [(h.ref, h.label) for h in lite] == [(h.ref, h.label) for h in pg], q
    assert len(answers["sqlite"]["rain"]) == 4 and answers["sqlite"]["zebra"] == []


@pytest.mark.backends("postgresql")
def test_postgres_text_search_uses_the_gin_index(labelled):
    """The lookup's match condition is on the indexed column of migration 0008, so the plan can use it."""
    from sqlalchemy import text

    from engine.atlas.lookup import _PostgresFullText

    sql = _PostgresFullText.search(2, True, False)
    with labelled.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # six rows: without this a scan is cheaper
        plan = "\n".join(conn.execute(text("EXPLAIN " + sql), {"w0": "rain", "w1": "weather", "k": 5}).scalars())
    assert "concepts_fts_gin" in plan, plan
