"""The score-bounded full-text top-k (engine.atlas.textindex) against FTS5's own bm25 ranking and an
exhaustive scoring, on real SQLite stores: ties, AND/OR, stopwords, the common-word rule, writes."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete, update

from engine.atlas import textindex
from engine.atlas.lookup import lookup, text_search
from engine.store.schema import ConceptRow
from engine.store.store import AtlasSource

pytestmark = pytest.mark.backends("sqlite")

# few words, so that many concepts share the same words and lengths: exact ties everywhere
VOCAB = ["rain", "rains", "raining", "storm", "cat", "cats", "dog", "sun", "moon", "tree", "river", "sea"]


def _random_atlas(store, name: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(VOCAB, size=int(rng.integers(lo, hi))))

    labels = [text(1, 4) for _ in range(n)]
    descriptions = [text(1, 7) if rng.random() < 0.8 else None for _ in range(n)]
    store.add_atlas(name, rng.normal(size=(n, 4)).astype(np.float32), labels, descriptions,
                    source=AtlasSource(model="m", layer=0))


@pytest.fixture
def random_store(store):
    _random_atlas(store, "a", 900, 1)
    _random_atlas(store, "b", 300, 2)
    return store


QUERIES = ["rain", "cats storm", "the moon and the sea", "dog rain sun tree", "raining", "zzz", "sun sun",
           "river cat zzz", "the", "storm storm dog"]


@pytest.fixture(params=["sorted access", "whole lists"])
def strategy(request, monkeypatch):
    """Both of `TextIndex.top_k`'s ways: rounds of sorted access (the bound stops them), or whole lists."""
    monkeypatch.setattr(textindex, "EXHAUSTIVE_MAX", 0 if request.param == "sorted access" else 10**9)
    return request.param


@pytest.mark.parametrize("k", [1, 7, 50])
def test_same_ranking_as_fts5(random_store, k, strategy):
    for q in QUERIES:
        for atlas in (None, "a", "b"):
            assert text_search(random_store, q, k, atlas) == text_search(random_store, q, k, atlas, indexed=False), q


def test_top_k_equals_exhaustive_scoring(random_store, strategy):
    ix = textindex.current_index(random_store)
    assert ix is not None
    rng = np.random.default_rng(3)
    for _ in range(60):
        terms = [textindex.fts_terms(w)[0] for w in rng.choice(VOCAB, size=int(rng.integers(1, 5)))]
        every, k = bool(rng.integers(2)), int(rng.integers(1, 40))
        lists = [ix._list(t) for t in terms]
        ids = np.unique(np.concatenate([lst[2] for lst in lists])).astype(np.int64)
        scores, present = ix._scores(lists, ids)
        keep = present if every else np.ones(len(ids), dtype=bool)
        brute = sorted(zip(scores[keep].tolist(), ids[keep].tolist()), key=lambda sd: (-sd[0], sd[1]))[:k]
        assert ix.top_k(terms, every, k) == brute, (terms, every, k)


def test_tf_part_is_bm25_of_the_texts(store):
    store.add_atlas("t", np.eye(3, dtype=np.float32), ["rain rain", "rain", "sun"], ["rain storm", None, "rain"],
                    source=AtlasSource(model="m", layer=0))
    ix = textindex.current_index(store)
    assert ix.n_rows == 3 and ix.avgdl == 7 / 3  # tokens: 4 + 1 + 2
    lo, hi = ix.start[ix.terms["rain"]], ix.start[ix.terms["rain"] + 1]
    tf = dict(zip(ix.by_id[lo:hi].tolist(), ix.id_tf[lo:hi].tolist()))
    ids = [int(r[0]) for r in store.read("SELECT id FROM concepts ORDER BY ordinal")]
    for cid, f, dl in ((ids[0], 4 + 4 + 1, 4), (ids[1], 4, 1), (ids[2], 1, 2)):
        assert tf[cid] == pytest.approx(f * 2.2 / (f + 1.2 * (0.25 + 0.75 * dl / (7 / 3))), rel=1e-12)
    assert ix.idf("rain") == 1e-6  # in all 3 rows: log(0.5 / 3.5) < 0, FTS5's floor


def test_common_word_is_left_out_like_fts5(store, strategy):
    n = 1200  # "common" in every concept: over COMMON_MIN_DOCS (500) and 5 % of them
    labels = [f"common {'rare' if i % 97 == 0 else 'other'}" for i in range(n)]
    store.add_atlas("c", np.ones((n, 2), dtype=np.float32), labels, source=AtlasSource(model="m", layer=0))
    for q in ("common rare", "common", "common zzz"):
        assert text_search(store, q, 20) == text_search(store, q, 20, indexed=False), q
    assert {o % 97 for _, o in text_search(store, "common rare", 20)} == {0}


def test_label_edits_and_atlas_removal_show_at_once(random_store, strategy):
    before = textindex.current_index(random_store)
    assert text_search(random_store, "zebra", 5) == []
    with random_store.session() as s:
        s.execute(update(ConceptRow).where(ConceptRow.ordinal == 17).values(label="zebra crossing"))
    assert textindex.current_index(random_store) is not before  # the write changed FTS5's records
    found = text_search(random_store, "zebra", 5)
    assert found and {o for _, o in found} == {17}
    with random_store.session() as s:  # a rolled-back edit leaves the index as it was
        s.execute(update(ConceptRow).values(label="zebra"))
        s.rollback()
    assert len(text_search(random_store, "zebra", 5)) == len(found)
    random_store.remove_atlas("b")
    assert all(a == "a" for a, _ in text_search(random_store, "rain storm", 200))
    assert text_search(random_store, "rain storm", 50) == text_search(random_store, "rain storm", 50, indexed=False)
    with random_store.session() as s:
        s.execute(delete(ConceptRow))
    assert text_search(random_store, "rain", 5) == []


def test_phrase_words_and_lookup_hits_match_fts5(random_store):
    assert textindex.fts_terms("Raining") == ("rain",) and textindex.fts_terms("sea_cat") == ("sea", "cat")
    for q in ("sea_cat", "rain cats", "storm"):  # a word of two tokens is a phrase: FTS5 answers it
        assert lookup(random_store, q, k=10, semantic=False) == lookup(random_store, q, k=10, semantic=False,
                                                                        indexed=False)
