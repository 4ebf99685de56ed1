"""The score-bounded full-text top-k (engine.atlas.textindex) against FTS5's own bm25 ranking and an
exhaustive scoring, on real SQLite stores: ties, AND/OR, stopwords, the common-word rule, writes; and
its rebuild after a write, in the background while FTS5 answers (never stale, threads, a failed build)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy import delete, update

from engine.atlas import textindex, textindex_cache
from engine.atlas.lookup import _indexed_search, lookup, text_search
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


@pytest.fixture(autouse=True)
def sync_builds(monkeypatch):
    """The index built in the lookup that needs it (the store's size under the threshold): it answers every
    lookup here; the tests of the background build set the threshold to 0 (`background`)."""
    monkeypatch.setattr(textindex_cache, "SYNC_BUILD_MAX", 10**9)


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
    ix = textindex_cache.current_index(random_store)
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
    ix = textindex_cache.current_index(store)
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
    before = textindex_cache.current_index(random_store)
    assert text_search(random_store, "zebra", 5) == []
    with random_store.session() as s:
        s.execute(update(ConceptRow).where(ConceptRow.ordinal == 17).values(label="zebra crossing"))
    assert textindex_cache.current_index(random_store) is not before  # the write changed FTS5's records
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


# ---------------------------------------------------------------- the rebuild after a write, in the background


@pytest.fixture
def background(monkeypatch, random_store):
    """Every build in the background (as a large store's), and a gate that holds each one after it read its
    snapshot until the test opens it (the real build, only delayed); the threads are waited for after."""
    monkeypatch.setattr(textindex_cache, "SYNC_BUILD_MAX", 0)
    real, gate = textindex.build_index, threading.Event()
    gate.set()
    gate.snapshots = []  # the key each build read, as it reads it

    def held(db):
        ix = real(db)
        gate.snapshots.append(ix.key)
        assert gate.wait(30), "the test never opened the gate"
        return ix

    monkeypatch.setattr(textindex_cache, "build_index", held)
    yield gate
    gate.set()
    assert textindex_cache.wait(random_store, 60)


def _relabel(store, ordinal: int, label: str) -> None:
    """A label edit of concept ``a/<ordinal>``: one write, which changes FTS5's records."""
    (cid,), = store.read("SELECT c.id FROM concepts c JOIN atlases a ON a.id = c.atlas_id "
                         "WHERE a.name = 'a' AND c.ordinal = :o", {"o": ordinal})
    with store.session() as s:
        s.execute(update(ConceptRow).where(ConceptRow.id == cid).values(label=label))


def _fast(store, q: str, k: int = 10, atlas: str | None = None):
    """The index's answer (None: no index at the store's state, FTS5 answers)."""
    return _indexed_search(store, [textindex.fts_terms(w)[0] for w in q.split()], k, atlas)


def test_first_lookup_after_a_write_is_answered_by_fts5_then_by_the_rebuilt_index(random_store, background):
    assert text_search(random_store, "rain", 5) == text_search(random_store, "rain", 5, indexed=False)
    assert textindex_cache.wait(random_store, 30) and _fast(random_store, "rain") is not None  # the first build
    before = textindex_cache.build_state(random_store)["builds"]
    background.clear()
    _relabel(random_store, 17, "zebra crossing")
    found = text_search(random_store, "zebra", 5)  # at once, from FTS5: the build is held
    assert found == [("a", 17)] and found == text_search(random_store, "zebra", 5, indexed=False)
    state = textindex_cache.build_state(random_store)
    assert state["building"] and not state["built"]  # the stale index was dropped, never served
    assert _fast(random_store, "zebra") is None
    for q in QUERIES:
        assert text_search(random_store, q, 20) == text_search(random_store, q, 20, indexed=False), q
    background.set()
    assert textindex_cache.wait(random_store, 30)
    assert textindex_cache.build_state(random_store)["builds"] == before + 1
    assert _fast(random_store, "zebra", 5) == found
    for q in ("zebra", "rain storm", "cats", "moon sea tree"):
        for atlas in (None, "a", "b"):
            assert _fast(random_store, q, 20, atlas) == text_search(random_store, q, 20, atlas, indexed=False), q


def test_a_write_during_a_rebuild_is_never_served_stale_and_builds_again(random_store, background):
    textindex_cache.current_index(random_store)
    background.clear()
    _relabel(random_store, 17, "zebra")
    assert text_search(random_store, "zebra", 5) == [("a", 17)]  # starts a build
    while len(background.snapshots) < 2:  # it read its snapshot ("zebra" at 17) and is held
        threading.Event().wait(0.005)
    _relabel(random_store, 17, "rain")
    _relabel(random_store, 23, "zebra")  # now only 23 has it
    assert text_search(random_store, "zebra", 5) == [("a", 23)]  # the build held: FTS5
    background.set()  # the stale index lands, the thread sees the writes since and builds again
    assert textindex_cache.wait(random_store, 30)
    assert len(background.snapshots) == 3 and background.snapshots[1] != background.snapshots[2]
    assert _fast(random_store, "zebra", 5) == [("a", 23)]
    assert _fast(random_store, "rain", 50) == text_search(random_store, "rain", 50, indexed=False)


def test_an_index_older_than_the_rows_is_never_served(random_store, background):
    ix = textindex_cache.current_index(random_store)
    _relabel(random_store, 23, "zebra")  # no lookup: the index stays as it was
    assert textindex_cache.latest(random_store) is ix
    key, hits = textindex_cache.hit_rows(random_store, ix, ix.search(["zebra"], 5), None)
    assert hits is None and key != ix.key
    assert text_search(random_store, "zebra", 5) == [("a", 23)]  # FTS5, and a build asked for
    assert textindex_cache.latest(random_store) is not ix
    assert textindex_cache.wait(random_store, 30) and _fast(random_store, "zebra", 5) == [("a", 23)]


def test_lookups_in_threads_during_a_rebuild_are_correct(random_store, background):
    textindex_cache.current_index(random_store)
    _relabel(random_store, 5, "zebra storm")
    queries = QUERIES + ["zebra", "zebra storm"]
    want = {(q, atlas): text_search(random_store, q, 20, atlas, indexed=False)
            for q in queries for atlas in (None, "a")}
    background.clear()
    errors: list[str] = []

    def lookups() -> None:
        for _ in range(3):
            for (q, atlas), hits in want.items():
                got = text_search(random_store, q, 20, atlas)
                if got != hits:
                    errors.append(f"{q!r} {atlas}: {got} != {hits}")

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(0.05)
    background.set()  # the build lands while they run
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert textindex_cache.wait(random_store, 30)
    assert all(_fast(random_store, q, 20, atlas) == hits for (q, atlas), hits in want.items())


def test_a_failing_rebuild_leaves_fts5_answering(random_store, background, monkeypatch, caplog):
    textindex_cache.current_index(random_store)
    real = textindex.build_index
    calls = []

    def broken(db):
        calls.append(db)
        raise MemoryError("injected")

    monkeypatch.setattr(textindex_cache, "build_index", broken)
    _relabel(random_store, 17, "zebra")
    for _ in range(2):  # the failed state is not built again until the next write
        assert text_search(random_store, "zebra", 5) == [("a", 17)]
        assert textindex_cache.wait(random_store, 30)
    state = textindex_cache.build_state(random_store)
    assert len(calls) == 1 and state["error"] == "MemoryError: injected" and not state["built"]
    assert "could not be built" in caplog.text
    assert all(text_search(random_store, q, 20) == text_search(random_store, q, 20, indexed=False) for q in QUERIES)
    monkeypatch.setattr(textindex_cache, "build_index", real)
    _relabel(random_store, 17, "zebra crossing")
    text_search(random_store, "zebra", 5)
    assert textindex_cache.wait(random_store, 30)
    assert textindex_cache.build_state(random_store)["error"] is None
    assert _fast(random_store, "zebra crossing", 5) == text_search(random_store, "zebra crossing", 5, indexed=False)


def test_a_fast_lookup_reads_the_store_once(random_store, monkeypatch):
    textindex_cache.current_index(random_store)
    statements = []
    read = type(random_store).read
    monkeypatch.setattr(type(random_store), "read", lambda self, sql, params=None: statements.append(sql)
                        or read(self, sql, params))
    for atlas in (None, "a"):
        statements.clear()
        assert text_search(random_store, "rain storm", 10, atlas)
        assert len(statements) == 1, statements
    statements.clear()
    hits = lookup(random_store, "rain storm", k=10, semantic=False)  # the ranking, then the hits' concepts
    assert {h.atlas for h in hits} == {"a", "b"} and len(statements) == 2, statements
