"""The process's built full-text indexes (`engine.atlas.textindex`), kept in sync with their stores.

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
import logging
import threading
import time
from pathlib import Path

from engine.atlas.textindex import KEY_COLUMNS, KEY_SQL, Key, TextIndex, build_index, key_of, read_key
from engine.store import layout
from engine.store.reads import StoreReads

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
                failed = read_key(db)
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
                current = read_key(db)
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
    rows = store.read(f"SELECT k.*, c.id, a.name, c.ordinal FROM (SELECT {KEY_COLUMNS}, "
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
