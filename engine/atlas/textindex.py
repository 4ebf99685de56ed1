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

Kept in sync with the store by `engine.atlas.textindex_cache` (the process's built indexes, the
background rebuilds, the one-snapshot read of a lookup's hits).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from engine.store.sqlite_file import BUSY_TIMEOUT_S, readonly_mode

K1, B = 1.2, 0.75  # FTS5's bm25 constants (fts5_aux.c)
WEIGHTS = {"label": 4.0, "description": 1.0}  # the 4:1 of `lookup._SqliteFullText`
# FTS5's averages and structure records (``concepts_fts_data`` rows 1 and 10) and the common-word rule's
# total (`engine.atlas.lookup._SqliteFullText.count`): the state an index is built from
KEY_COLUMNS = ("(SELECT block FROM concepts_fts_data WHERE id = 1), (SELECT block FROM concepts_fts_data WHERE id = 10), "
               "(SELECT coalesce(sum(n_concepts), 0) FROM atlases)")
KEY_SQL = f"SELECT {KEY_COLUMNS}"
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


def key_of(row: Sequence[Any]) -> Key:
    """The key of a store's full-text state from `KEY_SQL`'s columns: FTS5's averages and structure records
    and the atlases' total of concepts (the common-word rule's total)."""
    avg, struct, total = row[:3]
    return bytes(avg or b""), bytes(struct or b""), int(total or 0)


def read_key(db: Path) -> Key:
    """The key (`key_of`) of the store's full-text state now, read on a connection of its own."""
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
