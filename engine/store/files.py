"""The store's files as a whole: which ones rows claim, leftovers of interrupted writes, `gc`, `verify`.

Every file in ``vectors/``, ``indexes/`` and ``maps/`` is claimed by a database row (its name is
in the row) or is a leftover: a temporary file or an unclaimed file of a write that was killed or
failed before its commit, or an old file a replacement was killed before removing. File names say
which process wrote them (`engine.store.layout`), so a leftover can be told from a file a running
writer has not committed yet:

- *in progress*: its write has claimed it (a ``write_claims`` row on the file's token, committed
  before the file was written and deleted after the write's commit: `Store.claim_token`) and that
  writer is alive on this host or runs on another host; or its writer is alive on this host and the
  file is younger than the grace period (24 hours by default). Never removed, whatever the grace
  (the write may still commit). A temporary file is in progress while its process holds a live claim;
- *orphan*: its writer is gone, so nothing can claim it any more; removed by `gc`;
- *stale*: its writer is alive but has no claim on it and the file is older than the grace period
  (an old file a long-lived process wrote and a later replacement, killed, did not remove); removed
  by `gc`;
- *unknown*: the name does not say (older stores, foreign files); removed by `gc` once it is
  older than the grace period.

Why the order in `leftovers` matters: the folders are listed and each writer's liveness read
*before* the database's claims are read, and the write claims are read before the rows. A writer
found dead cannot commit afterwards; a file listed was claimed by its write before it existed, and
that claim is deleted only after the row that claims the file is committed; so a file is never
called an orphan or stale while a commit could still claim it (on PostgreSQL too, where each
statement reads its own snapshot). `gc` also deletes the claims of this host's writers that are gone.

Milvus collections are owned the same way (`layout.collection_name`): at each Milvus URI the
atlases use, and each Milvus Lite folder (``*.db``) in the store root, a collection named like an
atlas index that no row claims is a leftover, reported as ``<uri>#<collection>``. Milvus keeps no
creation time a client can read everywhere, so only the writer's liveness decides: a writer of
this host that is gone makes an *orphan* (dropped by `gc`), a live one *in progress*; a writer of
another host (a shared server) is *unknown* and kept (run `gc` on that host). Collections not
named like an atlas index are not the store's and are never touched.
"""

from __future__ import annotations

import dataclasses
import os
import time

from sqlalchemy import delete, select

from engine.store import layout
from engine.store.atlases import AtlasesMixin, IndexStatus
from engine.store.base import StoreBase
from engine.store.index_location import FAISS, MILVUS, IndexLocation
from engine.store.maps import MapsMixin
from engine.store.passes import process_alive
from engine.store.schema import AlignmentMapRow, AtlasRow, LabelRunRow, WriteClaimRow
from engine.util import sha256_bytes
from indexes.milvus import collections, drop_collection

GC_GRACE_S = 24 * 3600.0  # files whose writer cannot be told are kept this long


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A file in an owned folder that no database row claims."""

    file: str  # relative to the store root; a collection: "<uri as recorded>#<collection>"
    size: int
    age_s: float  # 0 for a collection (Milvus does not say)
    writer_pid: int | None
    state: str  # "in progress" | "orphan" | "stale" | "unknown"
    removable: bool
    uri: str | None = None  # a leftover Milvus collection: its URI as recorded (else None)
    collection: str | None = None


@dataclasses.dataclass(frozen=True)
class MapFileStatus:
    map: str
    ok: bool
    problem: str | None


@dataclasses.dataclass(frozen=True)
class StoreReport:
    """What `Store.verify` found: each atlas's files, each map's file, and leftover files."""

    atlases: list[IndexStatus]
    maps: list[MapFileStatus]
    leftovers: list[Leftover]

    @property
    def problems(self) -> list[str]:
        out = [f"{a.atlas}: {a.problem}" for a in self.atlases if not a.ok]
        out += [f"map {m.map}: {m.problem}" for m in self.maps if not m.ok]
        stale = [x for x in self.leftovers if x.state != "in progress"]
        if stale:
            out.append(f"{len(stale)} leftover file(s) of interrupted writes, claimed by no row "
                       f"({', '.join(x.file for x in stale[:3])}{', ...' if len(stale) > 3 else ''}); "
                       "`atlas gc` removes them")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


class FilesMixin(AtlasesMixin, MapsMixin, StoreBase):
    """Store methods over the store's files as a whole."""

    def claimed_files(self) -> set[str]:
        """Every file (relative to the root) a database row claims."""
        out: set[str] = set()
        with self.read_session() as s:
            for name, vec, idx, backend, extra in s.execute(
                select(AtlasRow.name, AtlasRow.vector_file, AtlasRow.index_file, AtlasRow.index_backend,
                       AtlasRow.extra)
            ):
                out.update([vec, *([idx] if backend in (None, FAISS) else []), *layout.label_index_files(name, extra)])
            out.update(s.scalars(select(AlignmentMapRow.file)))
            for params in s.scalars(select(LabelRunRow.params)):
                out.update(layout.run_files(params))
        return out

    def write_claims(self) -> dict[str, tuple[str, int]]:
        """Each claimed token of a write in progress: (its writer's host tag, pid)."""
        with self.read_session() as s:
            return {t: (h, p) for t, h, p in s.execute(select(WriteClaimRow.token, WriteClaimRow.host,
                                                              WriteClaimRow.pid))}

    def claimed_collections(self) -> set[tuple[str, str]]:
        """Every (Milvus URI as recorded, collection) an atlas row claims."""
        with self.read_session() as s:
            return {(uri or "", c) for uri, c in s.execute(select(AtlasRow.index_uri, AtlasRow.index_file)
                                                     .where(AtlasRow.index_backend == MILVUS))}

    def milvus_uris(self) -> list[str]:
        """The Milvus URIs (as recorded) the store's atlases use, and the Lite folders in its root."""
        uris = {uri for uri, _ in self.claimed_collections()}
        uris.update(p.name for p in self.path.glob("*.db") if p.is_dir())
        return sorted(uris)

    def leftover_collections(self) -> list[Leftover]:
        """Owned collections no row claims (see the module doc). A URI that cannot be read is skipped:
        `verify_index` reports it for each atlas there."""
        seen = []
        here = layout.host_tag()
        for uri in self.milvus_uris():
            try:
                names = collections(IndexLocation(MILVUS, uri).connect_uri(self.path))
            except Exception:  # noqa: BLE001 - unreachable, refused, busy: nothing to list there now
                continue
            for c in names:
                owner = layout.collection_owner(c)
                if owner is None:
                    continue
                local = owner.host == here
                seen.append((uri, c, owner.pid, local, local and process_alive(owner.pid)))
        claimed = self.claimed_collections()  # after the listing and the liveness checks (module doc)
        out = []
        for uri, c, pid, local, alive in seen:
            if (uri, c) in claimed:
                continue
            state = ("in progress" if alive else "orphan") if local else "unknown"
            out.append(Leftover(f"{uri}#{c}", 0, 0.0, pid, state, state == "orphan", uri=uri, collection=c))
        return out

    def leftovers(self, grace_s: float = GC_GRACE_S) -> list[Leftover]:
        """Files of ``vectors/``, ``indexes/``, ``maps/`` and ``runs/`` that no row claims (see the module doc),
        and leftover Milvus collections."""
        now = time.time()
        seen = []
        for folder in layout.OWNED_DIRS:
            try:
                entries = list(os.scandir(self.path / folder))
            except FileNotFoundError:
                continue
            for e in entries:
                if not e.is_file(follow_symlinks=False):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                owner = layout.file_owner(e.name)
                alive = owner.pid is not None and process_alive(owner.pid)
                seen.append((f"{folder}/{e.name}", st.st_size, now - st.st_mtime, owner, alive))
        writes = self.write_claims()  # after the listing, before the rows: see the module doc
        claimed = self.claimed_files()
        here = layout.host_tag()
        live = {t for t, (host, pid) in writes.items() if host != here or process_alive(pid)}
        live_pids = {writes[t][1] for t in live if writes[t][0] == here}
        out = []
        for rel, size, age, owner, alive in seen:
            if rel in claimed:
                continue
            pid = owner.pid
            if owner.token in live or (owner.temporary and alive and pid in live_pids):
                state, removable = "in progress", False
            elif alive:
                state, removable = ("stale", True) if age > grace_s else ("in progress", False)
            elif pid is not None:
                state, removable = "orphan", True
            else:
                state, removable = "unknown", age > grace_s
            out.append(Leftover(rel, size, round(age, 1), pid, state, removable))
        if self.milvus_uris():
            out.extend(self.leftover_collections())
        return sorted(out, key=lambda x: x.file)

    def gc(self, grace_s: float = GC_GRACE_S, dry_run: bool = False) -> list[Leftover]:
        """Remove leftover files no row claims and no running writer owns; returns those removed
        (or, with ``dry_run``, those that would be)."""
        if not dry_run:
            self.check_writable()
        gone = [x for x in self.leftovers(grace_s) if x.removable]
        if not dry_run:
            here = layout.host_tag()
            dead = [t for t, (host, pid) in self.write_claims().items() if host == here and not process_alive(pid)]
            if dead:  # claims of killed writers of this host: their files are orphans (removed below)
                with self.session() as s:
                    s.execute(delete(WriteClaimRow).where(WriteClaimRow.token.in_(dead)))
            for x in gone:
                if x.collection is not None and x.uri is not None:
                    drop_collection(IndexLocation(MILVUS, x.uri).connect_uri(self.path), x.collection)
                else:
                    (self.path / x.file).unlink(missing_ok=True)
        return gone

    def verify(self, atlas: str | None = None, grace_s: float = GC_GRACE_S, fix: bool = False) -> StoreReport:
        """Check atlases' vector files and indexes, map files, and look for leftover files; with ``fix``,
        record the block checksums of atlas files written before they were kept (`verify_index`)."""
        if fix:
            self.check_writable()
        names = [atlas] if atlas else [a.name for a in self.atlases()]
        statuses = [self.verify_index(n, fix=fix) for n in names]
        maps: list[MapFileStatus] = []
        if atlas is None:  # map files against their checksums (without loading them: no torch)
            for m in self.maps():
                repair = "refit it with `atlas align`, or `atlas map remove` it"
                try:
                    ok = sha256_bytes((self.path / m.file).read_bytes()) == m.sha256
                    problem = None if ok else f"the file of map {m.name!r} ({m.file}) does not match its checksum; {repair}"
                except FileNotFoundError:
                    problem = f"the file of map {m.name!r} is missing ({m.file}); {repair}"
                maps.append(MapFileStatus(m.name, problem is None, problem))
        return StoreReport(statuses, maps, self.leftovers(grace_s) if atlas is None else [])
