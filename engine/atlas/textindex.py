"""A score-bounded top-k over SQLite's full-text index: FTS5's bm25, without scoring every match.

Why: FTS5 ranks a MATCH by computing bm25 for every row that matches, so a query whose words are in
100,000 concepts costs 100,000 scorings although 50 are wanted (at 1M concepts: p95 67-75 ms CPU).
This module keeps, per word (FTS5's term, porter-stemmed), its postings twice: in order of their
bm25 impact and in concept order, and answers a query by Fagin's threshold algorithm (TA): read the
lists best impact first in growing blocks, score each newly seen concept in full by random access
(a binary search in the other words' concept-ordered lists), and stop as soon as the k-th score
exceeds the sum of the lists' next impacts, the most an unseen concept can reach.

The scores are FTS5's own, bit for bit: ``bm25(concepts_fts, 4.0, 1.0)`` (SQLite's fts5_aux.c) is
``sum_i idf_i * f_i * (k1 + 1) / (f_i + k1 * (1 - b + b * D / avgdl))`` over the query's phrases in
query order, with ``f_i`` the label hits times 4 plus the description hits, ``D`` the concept's
token count, ``avgdl`` the index's tokens per row, ``idf_i = log((N - n_i + 0.5) / (n_i + 0.5))``
(1e-6 where that is not positive), k1 1.2 and b 0.75; here the same doubles in the same order
(``math.log`` is the C library's), so ties in concept order come out as FTS5's ``ORDER BY bm25,
rowid``. The postings are read from FTS5 itself (``fts5vocab``), so the tokens are FTS5's.

In sync: the index is keyed by FTS5's structure and averages records (``concepts_fts_data`` rows 10
and 1), which every write to the full-text index changes in the same transaction as the concept
write (triggers of migration 0001: imports, label edits, atlas removal), and by the atlases' total
of concepts (the common-word rule's). A lookup never waits for the index: it searches the latest one
built and reads the hits' rows in one statement with the store's key and the atlas's id (`hit_rows`:
one read snapshot), so it uses the index's hits only where the index is at the state of those rows;
otherwise, and while none is built, FTS5 itself answers (`engine.atlas.lookup.text_search`, the same
ranking) and a rebuild is asked for (`refresh`). The rebuild runs in a background thread, one per
store at a time, reading one snapshot; it is swapped in whole, and built again if a write came
during it; one that fails is logged and recorded (`build_state`), and FTS5 answers until the next
write. At 1M concepts (+500,000) a rebuild takes ~20 s alone, ~50 s with lookups back to back
beside it, which then cost about twice FTS5's own time (`bench_lookup.py --after-write`). Nothing
is written to disk (a crash leaves nothing half-written); the indexes of the last few stores a
process looked up are kept (~350 MB at 1.5M concepts). No store builds in the lookup that needs the
index (`SYNC_BUILD_MAX`: a build never costs less than the FTS5 lookup it would spare). A one-shot
``atlas lookup`` does not build it (one query: FTS5 answers it faster than the build).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from engine.store import layout
from engine.store.reads import StoreReads
from engine.store.sqlite_file import BUSY_TIMEOUT_S, readonly_mode

K1, B = 1.2, 0.75  # FTS5's bm25 constants (fts5_aux.c)
WEIGHTS = {"label": 4.0, "description": 1.0}  # the 4:1 of `lookup._SqliteFullText`
# FTS5's averages and structure records (``concepts_fts_data`` rows 1 and 10) and the common-word rule's
# total (`engine.atlas.lookup._SqliteFullText.count`): the state an index is built from
_KEY_COLUMNS = ("(SELECT block FROM concepts_fts_data WHERE id = 1), (SELECT block FROM concepts_fts_data WHERE id = 10), "
                "(SELECT coalesce(sum(n_concepts), 0) FROM atlases)")
KEY_SQL = f"SELECT {_KEY_COLUMNS}"
Key = tuple[bytes, bytes, int]  # `key_of` those columns
_FIRST_BLOCK, _MAX_BLOCK = 512, 1 << 17
# Lists this long in all are scored whole (vectorised; ~1 ms per 100,000 postings), longer ones by
# sorted access in blocks until the bound stops it.
EXHAUSTIVE_MAX = 200_000


@dataclasses.dataclass
class TextIndex:
    """The postings of every FTS5 term, by impact and by concept id (CSR: term t's are [start[t], start[t+1]))."""

    key: Key  # `key_of` the snapshot it was built from
    n_rows: int
    avgdl: float
    terms: dict[str, int]
    start: np.ndarray  # int64, n_terms + 1
    by_impact: np.ndarray  # int32 concept ids, each term's best tf-part first (ties: smaller id first)
    impact_tf: np.ndarray  # float64, the tf-part f*(k1+1)/(f + k1*(1 - b + b*D/avgdl)) of by_impact
    by_id: np.ndarray  # int32 concept ids, ascending within each term
    id_tf: np.ndarray  # float64, the tf-part of by_id
    atlas_of: np.ndarray  # int64, concept id -> atlas id (-1: none)
    atlas_ids: dict[str, int]  # atlas name -> id
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _acc: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _mask: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def n_total(self) -> int:
        """The atlases' total of concepts (the common-word rule's), in the snapshot it was built from."""
        return self.key[2]

    def doc_count(self, term: str) -> int:
        t = self.terms.get(term)
        return 0 if t is None else int(self.start[t + 1] - self.start[t])

    def idf(self, term: str) -> float:
        n_hit = self.doc_count(term)
        idf = math.log((self.n_rows - n_hit + 0.5) / (n_hit + 0.5))
        return idf if idf > 0.0 else 1e-6

    def top_k(self, terms: list[str], every: bool, k: int, atlas_id: int | None = None) -> list[tuple[float, int]]:
        """The best ``k`` concepts for the terms (all of them with ``every``, else any): [(score, id)], best first.

        Sorted access runs on the rarest term's list with ``every`` (each match is in it), else on every
        term's list; each concept met there is scored in full. What an unmet concept can score is
        bounded, in query order, by the lists' next impacts (a list not read: its best impact)."""
        lists = [self._list(t) for t in terms]
        if every and any(len(lst[0]) == 0 for lst in lists):
            return []
        unique = {t: j for j, t in reversed(list(enumerate(terms)))}  # a repeated word reads one list
        scan = ([min(unique.values(), key=lambda j: len(lists[j][0]))] if every
                else [j for j in unique.values() if len(lists[j][0])])
        if not scan:
            return []
        pos = dict.fromkeys(scan, 0)
        seen = np.zeros(len(self.atlas_of), dtype=bool) if len(scan) > 1 else None
        top_s, top_d = np.zeros(0), np.zeros(0, dtype=np.int64)
        block = max(_FIRST_BLOCK, 2 * k)
        while True:
            for j in scan:
                ids = lists[j][0][pos[j]:pos[j] + block].astype(np.int64)
                pos[j] += len(ids)
                if seen is not None:
                    ids = ids[~seen[ids]]
                    seen[ids] = True
                if atlas_id is not None:
                    ids = ids[self.atlas_of[ids] == atlas_id]
                if not len(ids):
                    continue
                scores, present = self._scores(lists, ids)
                if every:
                    scores, ids = scores[present], ids[present]
                top_s, top_d = np.concatenate([top_s, scores]), np.concatenate([top_d, ids])
                best = np.lexsort((top_d, -top_s))[:k]
                top_s, top_d = top_s[best], top_d[best]
            if all(pos[j] >= len(lists[j][0]) for j in scan):  # every match was met
                break
            bound = 0.0  # summed as a score is, in query order
            for t in terms:
                j = unique[t]
                imp_tf, idf = lists[j][1], lists[j][4]
                at = pos[j] if j in pos else 0
                if at < len(imp_tf):
                    bound += idf * float(imp_tf[at])
            if len(top_s) >= k and (top_s[-1] > bound or (len(unique) == 1 and top_s[-1] >= bound)):
                break  # one list: its impact order is the final order, ties (smaller id first) included
            block = min(block * 4, _MAX_BLOCK)
        return list(zip(top_s.tolist(), top_d.tolist()))

    def search(self, terms: list[str], k: int, atlas_id: int | None = None) -> list[int]:
        """`engine.atlas.lookup.text_search`'s order: the best ``k`` concepts with every term, then of the best
        ``k`` with any term those not found yet (one word: its best ``k``); concept ids, at most ``k``."""
        found: list[int] = []
        lists = [self._list(t) for t in terms]
        unique = {t: j for j, t in reversed(list(enumerate(terms)))}
        if sum(len(lists[j][0]) for j in unique.values()) <= EXHAUSTIVE_MAX:
            with self._lock:
                return self._exhaustive(lists, terms, unique, k, atlas_id)
        for every in ([True, False] if len(terms) > 1 else [True]):
            if len(found) >= k:
                break
            seen = set(found)
            found += [d for _, d in self.top_k(terms, every, k, atlas_id) if d not in seen]
        return found[:k]

    def _exhaustive(self, lists, terms: list[str], unique: dict[str, int], k: int, atlas_id: int | None) -> list[int]:
        """`search` by scoring every concept of the lists at once (dense, in query order: the same doubles as
        FTS5), for lists short enough that reading them whole beats rounds of sorted access. Holds ``_lock``."""
        acc, mask = self._scratch()
        for t in terms:  # query order, a repeated word twice: FTS5's sum
            _, _, by_id, id_tf, idf = lists[unique[t]]
            acc[by_id] += idf * id_tf
        found: list[int] = []
        try:
            for every in ([True, False] if len(terms) > 1 else [True]):
                if len(found) >= k:
                    break
                if every:  # the rarest word's concepts that have all the others
                    cand = min((lists[j][2] for j in unique.values()), key=len)
                    for j in unique.values() if len(unique) > 1 else ():
                        mask[lists[j][2]] = True
                        cand = cand[mask[cand]]
                        mask[lists[j][2]] = False
                else:  # any word: each concept once
                    parts = []
                    for j in unique.values():
                        ids = lists[j][2]
                        parts.append(ids[~mask[ids]])
                        mask[ids] = True
                    cand = np.concatenate(parts)
                    mask[cand] = False
                seen = set(found)
                found += [d for d in self._best(acc, cand, k, atlas_id) if d not in seen]
        finally:
            for j in unique.values():
                acc[lists[j][2]] = 0.0
        return found[:k]

    def _best(self, acc: np.ndarray, cand: np.ndarray, k: int, atlas_id: int | None) -> list[int]:
        """The ``k`` best of ``cand`` by ``acc`` (ties: smaller id first)."""
        if atlas_id is not None:
            cand = cand[self.atlas_of[cand] == atlas_id]
        scores = acc[cand]
        if len(cand) > k:  # the k best, and everything tied with the k-th (broken by id below)
            cand = cand[scores >= scores[np.argpartition(-scores, k - 1)[:k]].min()]
            scores = acc[cand]
        return cand[np.lexsort((cand, -scores))[:k]].astype(np.int64).tolist()

    def _scratch(self) -> tuple[np.ndarray, np.ndarray]:
        """A zeroed score per concept id and a cleared mask, reused (callers hold ``_lock`` and clear them)."""
        if self._acc is None or self._mask is None:
            self._acc = np.zeros(len(self.atlas_of), dtype=np.float64)
            self._mask = np.zeros(len(self.atlas_of), dtype=bool)
        return self._acc, self._mask

    def _list(self, term: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        t = self.terms.get(term)
        if t is None:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty.astype(np.float64), empty, empty.astype(np.float64), self.idf(term)
        lo, hi = int(self.start[t]), int(self.start[t + 1])
        return self.by_impact[lo:hi], self.impact_tf[lo:hi], self.by_id[lo:hi], self.id_tf[lo:hi], self.idf(term)

    @staticmethod
    def _scores(lists, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full bm25 of ``ids`` (summed in query order, as FTS5 does) and whether each has every term."""
        score = np.zeros(len(ids), dtype=np.float64)
        present_all = np.ones(len(ids), dtype=bool)
        for _, _, by_id, id_tf, idf in lists:
            at = np.minimum(np.searchsorted(by_id, ids), max(len(by_id) - 1, 0))
            present = by_id[at] == ids if len(by_id) else np.zeros(len(ids), dtype=bool)
            score = score + np.where(present, idf * id_tf[at] if len(by_id) else 0.0, 0.0)
            present_all &= present
        return score, present_all


log = logging.getLogger(__name__)

# A store of at most this many concepts builds its index in the lookup that finds it missing or stale,
# a larger one in a background thread while FTS5 answers. None does: a build never costs less than the
# FTS5 lookup it would spare (measured, `bench_lookup.py`'s store at load ~4.5: 15 ms against 0.6 ms
# at 1,000 concepts, 104 ms against 0.7 ms at 10,000, 1.1 s against 1.6 ms at 100,000; 20-30 s at 1.5M).
# The tests set it to have the index answer at once.
SYNC_BUILD_MAX = 0


@dataclasses.dataclass
class _Slot:
    """One store's index: the latest built (``index``), the build running (``thread``: at most one), whether a
    lookup saw a newer key during it (``again``), the key whose build failed (not retried until a write)."""

    index: TextIndex | None = None
    thread: threading.Thread | None = None
    again: bool = False
    failed: Key | None = None
    error: str | None = None
    builds: int = 0
    build_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def building(self) -> bool:
        """Whether its build thread runs (one left behind by a fork does not)."""
        return self.thread is not None and self.thread.is_alive()


_lock = threading.Lock()  # guards _cache and every _Slot's fields but build_lock
_cache: dict[str, _Slot] = {}
_CACHED_STORES = 4


def _db(store: StoreReads) -> Path | None:
    """The SQLite file of a store with FTS5 (None: PostgreSQL keeps its tsvector path)."""
    if store.dialect != "sqlite":
        return None
    db = Path(store.path) / layout.DB_FILE
    return db if db.is_file() else None


def _slot(db: Path) -> _Slot:
    """The store's slot (callers hold ``_lock``); the last few stores' are kept, the oldest dropped first."""
    slot = _cache.get(str(db))
    if slot is None:
        while len(_cache) >= _CACHED_STORES:
            _cache.pop(next(iter(_cache)))
        slot = _cache[str(db)] = _Slot()
    return slot


def latest(store: StoreReads) -> TextIndex | None:
    """The store's latest built index, without waiting for a build: possibly stale (the caller compares its
    key with the one read in the snapshot of its hits' rows: `hit_rows`); None where none is built yet,
    after starting a build (in this call for a store of at most `SYNC_BUILD_MAX` concepts, else in the
    background), or where the store is not a SQLite file with FTS5."""
    db = _db(store)
    if db is None:
        return None
    with _lock:
        slot = _slot(db)
        if slot.index is not None or slot.building():
            return slot.index
    return refresh(store, None, key_of(store.read(KEY_SQL)[0]))


def refresh(store: StoreReads, used: TextIndex | None, key: Key) -> TextIndex | None:
    """A lookup read ``key`` (`key_of`) where its index ``used`` (or none) had another: the index for ``key``
    if one is built (or this call builds it: a store of at most `SYNC_BUILD_MAX` concepts), else None after
    asking for a build in the background (one at a time per store; one asked during a build runs after
    it). ``used`` is forgotten: it can never again be served."""
    db = _db(store)
    if db is None:
        return None
    with _lock:
        slot = _slot(db)
        if slot.index is not None and slot.index.key == key:
            return slot.index
        if slot.index is used:
            slot.index = None
        if slot.building():
            slot.again = True
            return None
        if key == slot.failed:  # this state's build failed: FTS5 answers until the next write
            return None
        if key[2] > SYNC_BUILD_MAX:
            slot.thread = threading.Thread(target=_build_in_background, args=(db, slot), daemon=True,
                                           name=f"textindex {db}")
            slot.thread.start()
            return None
    return _build(db, slot, key)


def _build(db: Path, slot: _Slot, wanted: Key | None = None) -> TextIndex | None:
    """Build the index (one at a time per store) and swap it in; None, logged and recorded, if the build fails."""
    with slot.build_lock:
        with _lock:
            if wanted is not None and slot.index is not None and slot.index.key == wanted:
                return slot.index  # another lookup built it meanwhile
        try:
            ix = build_index(db)
        except Exception as e:  # noqa: BLE001 - any failure leaves FTS5 answering, never fails a lookup
            failed: Key | None = wanted
            with contextlib.suppress(Exception):
                failed = _read_key(db)
            with _lock:
                slot.failed, slot.error = failed, f"{type(e).__name__}: {e}"
            log.warning("the full-text index of %s could not be built (FTS5 answers lookups until the next "
                        "write): %s", db, slot.error, exc_info=True)
            return None
        with _lock:
            slot.index, slot.error, slot.failed = ix, None, None
            slot.builds += 1
        return ix


def _build_in_background(db: Path, slot: _Slot) -> None:
    """The build thread: build and swap in, then again while the store's key is no longer the one built
    (a write during the build); it ends, under the lock a lookup asks for a build under, when it is."""
    me = threading.current_thread()
    try:
        while True:
            ix = _build(db, slot)
            if ix is None:
                return
            while True:
                current = _read_key(db)
                with _lock:
                    if current == ix.key and not slot.again:
                        slot.thread = None
                        return
                    slot.again = False
                if current != ix.key:
                    break  # a write since the build's snapshot: build again
    except Exception:  # noqa: BLE001 - e.g. the store's file removed meanwhile
        log.warning("the full-text index thread of %s stopped", db, exc_info=True)
    finally:
        with _lock:
            if slot.thread is me:
                slot.thread = None


def wait(store: StoreReads, timeout: float | None = None) -> bool:
    """Wait for the store's background build, if one runs (and those it asks for after it); whether none runs."""
    db = _db(store)
    deadline = None if timeout is None else time.monotonic() + timeout
    while db is not None:
        with _lock:
            thread = _cache[str(db)].thread if str(db) in _cache else None
        if thread is None:
            return True
        thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            return False
    return True


def build_state(store: StoreReads) -> dict[str, object]:
    """What the store's slot holds: ``built`` (an index is there; it may be stale), ``building``, ``error``
    (of the last failed build, until one succeeds), ``builds`` (how many succeeded in this process)."""
    db = _db(store)
    with _lock:
        slot = _cache.get(str(db)) if db is not None else None
        if slot is None:
            return {"built": False, "building": False, "error": None, "builds": 0}
        return {"built": slot.index is not None, "building": slot.building(), "error": slot.error,
                "builds": slot.builds}


def current_index(store: StoreReads) -> TextIndex | None:
    """The store's index at its current state, waiting for it (a build running first, then one if still
    stale): the benchmarks' and tests' way to have it; lookups never wait (`latest`, `refresh`). None where
    the store is not a SQLite file with FTS5, or the build failed."""
    db = _db(store)
    if db is None:
        return None
    wait(store)
    key = key_of(store.read(KEY_SQL)[0])
    with _lock:
        slot = _slot(db)
    return _build(db, slot, key)


def hit_rows(store: StoreReads, ix: TextIndex, found: list[int], atlas: str | None
             ) -> tuple[Key, list[tuple[str, int]] | None]:
    """The store's key (`key_of`) and, where it is ``ix``'s (and so is ``atlas``'s id), the (atlas, ordinal) of
    the concepts ``found`` in that order, read in one statement: one read snapshot, so hits from an index that
    is not at the rows' state are never returned (None then)."""
    marks = ", ".join(f":c{i}" for i in range(len(found))) or "NULL"  # `IN ()` would scan every concept
    rows = store.read(f"SELECT k.*, c.id, a.name, c.ordinal FROM (SELECT {_KEY_COLUMNS}, "
                      "(SELECT id FROM atlases WHERE name = :atlas)) k "
                      f"LEFT JOIN concepts c ON c.id IN ({marks}) LEFT JOIN atlases a ON a.id = c.atlas_id",
                      {"atlas": atlas, **{f"c{i}": d for i, d in enumerate(found)}})
    key = key_of(rows[0])
    if key != ix.key or rows[0][3] != (ix.atlas_ids.get(atlas) if atlas else None):
        return key, None
    where = {int(r[4]): (r[5], int(r[6])) for r in rows if r[4] is not None}
    return key, [where[d] for d in found if d in where]


def drop_cached(db: Path | None = None) -> None:
    """Forget the built indexes (all, or one database's); a build running goes on, for no one."""
    with _lock:
        if db is None:
            _cache.clear()
        else:
            _cache.pop(str(db), None)


def key_of(row: Sequence[Any]) -> Key:
    """The key of a store's full-text state from `KEY_SQL`'s columns: FTS5's averages and structure records
    and the atlases' total of concepts (the common-word rule's total)."""
    avg, struct, total = row[:3]
    return bytes(avg or b""), bytes(struct or b""), int(total or 0)


def _read_key(db: Path) -> Key:
    conn = _connect(db)
    try:
        return key_of(conn.execute(KEY_SQL).fetchone())
    finally:
        conn.close()


def _connect(db: Path) -> sqlite3.Connection:
    """A read-only connection, opened as the store's own read-only reader opens it (`readonly_mode`: ``mode=ro``,
    or ``immutable=1`` in a folder it cannot write, where ``mode=ro`` cannot create the ``-shm``)."""
    return sqlite3.connect(f"file:{quote(str(db.resolve()))}?{readonly_mode(db)}", uri=True, timeout=BUSY_TIMEOUT_S)


def _varints(blob: bytes) -> list[int]:
    """SQLite's varints (FTS5's averages record: rows, then tokens per column)."""
    out, i = [], 0
    while i < len(blob):
        v = 0
        for n in range(9):
            byte = blob[i]
            i += 1
            if n == 8:
                v = (v << 8) | byte
                break
            v = (v << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        out.append(v)
    return out


def _repeat_each(counts: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """``np.repeat(arange(len(counts)), counts)`` a few hundred thousand elements at a time: `np.repeat` holds
    the GIL throughout (0.9 s for 14M), which would stall the lookups of the process during a build."""
    ends = np.cumsum(counts)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    t = 0
    while t < len(counts):
        lo = int(ends[t - 1]) if t else 0
        u = max(t + 1, int(np.searchsorted(ends, lo + chunk, side="right")))
        out[lo:int(ends[u - 1])] = np.repeat(np.arange(t, u, dtype=np.int64), counts[t:u])
        t = u
    return out


def build_index(db: Path) -> TextIndex:
    """Read FTS5's postings of ``db`` (one read snapshot) into a `TextIndex`."""
    conn = _connect(db)
    try:
        conn.execute("BEGIN")
        key = key_of(conn.execute(KEY_SQL).fetchone())
        averages = _varints(key[0])
        n_rows, n_tokens = (averages[0], sum(averages[1:])) if averages else (0, 0)
        atlas_ids = {str(name): int(i) for name, i in conn.execute("SELECT name, id FROM atlases")}
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.atlas_fts_row USING fts5vocab(main, concepts_fts, row)")
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.atlas_fts_inst "
                     "USING fts5vocab(main, concepts_fts, instance)")
        vocab = conn.execute("SELECT term, cnt FROM temp.atlas_fts_row").fetchall()
        cur = conn.execute("SELECT doc, col = 'label' FROM temp.atlas_fts_inst")
        n_inst = sum(c for _, c in vocab)
        flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64, count=2 * n_inst)
        atlas_rows = np.fromiter(itertools.chain.from_iterable(conn.execute("SELECT id, atlas_id FROM concepts")),
                                 dtype=np.int64).reshape(-1, 2)
        conn.rollback()
    finally:
        conn.close()
    doc, is_label = flat[0::2], flat[1::2].astype(bool)
    term_of = _repeat_each(np.array([c for _, c in vocab], dtype=np.int64))
    max_id = int(max(doc.max(initial=0), atlas_rows[:, 0].max(initial=0) if len(atlas_rows) else 0))
    dl = np.bincount(doc, minlength=max_id + 1).astype(np.float64)
    if int(dl.sum()) != n_tokens:
        raise RuntimeError(f"FTS5's token count {n_tokens} differs from its postings' {int(dl.sum())}")
    first = np.flatnonzero(np.r_[True, (term_of[1:] != term_of[:-1]) | (doc[1:] != doc[:-1])])[:len(doc)]
    weight = np.where(is_label, WEIGHTS["label"], WEIGHTS["description"])
    f = np.add.reduceat(weight, first) if len(doc) else weight
    p_doc, p_term = doc[first], term_of[first]
    avgdl = float(n_tokens) / float(n_rows) if n_rows else 1.0
    tf = (f * (K1 + 1.0)) / (f + K1 * (1 - B + B * dl[p_doc] / avgdl))
    order = np.lexsort((p_doc, -tf, p_term))
    start = np.searchsorted(p_term, np.arange(len(vocab) + 1))
    atlas_of = np.full(max_id + 1, -1, dtype=np.int64)
    if len(atlas_rows):
        atlas_of[atlas_rows[:, 0]] = atlas_rows[:, 1]
    return TextIndex(key, n_rows, avgdl, {t: i for i, (t, _) in enumerate(vocab)}, start.astype(np.int64),
                     p_doc[order].astype(np.int32), tf[order], p_doc.astype(np.int32), tf, atlas_of, atlas_ids)


@functools.lru_cache(maxsize=65536)
def fts_terms(word: str) -> tuple[str, ...]:
    """FTS5's terms of one query word (``porter unicode61``, as migration 0001's table): usually one."""
    with _tok_lock:
        _tok.execute("INSERT INTO t(rowid, x) VALUES (1, ?)", (word,))
        try:
            return tuple(r[0] for r in _tok.execute("SELECT term FROM v ORDER BY offset"))
        finally:
            _tok.execute("DELETE FROM t")


_tok_lock = threading.Lock()
_tok = sqlite3.connect(":memory:", check_same_thread=False)
_tok.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61')")
_tok.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
