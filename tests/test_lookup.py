"""Text lookup: FTS5 with bm25 over labels and descriptions; semantic fusion where installed."""

from __future__ import annotations

import numpy as np
import pytest

from engine.atlas.lookup import build_label_index, lookup, semantic_available
from engine.errors import BadValueError

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
    store.add_atlas("t", x, [a for a, _ in LABELS], [b for _, b in LABELS], model="m", layer=1)
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
def test_semantic_lookup_finds_paraphrase(labelled):
    assert build_label_index(labelled, "t", quiet=True) == len(LABELS)
    hits = lookup(labelled, "a feline pet", k=3)
    assert hits[0].label == "cats" and hits[0].semantic_rank == 1 and hits[0].text_rank is None
    both = lookup(labelled, "rain", k=3)
    assert both[0].text_rank is not None and both[0].semantic_rank is not None
