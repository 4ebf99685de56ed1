"""Top contexts as the store records them: the ``context_runs`` and ``concept_contexts`` rows (`ContextsMixin`).

The pass that fills a run is `engine.labelling.contexts`; everything it reads or writes in the database goes
through the methods here, and these are the guarantees it builds on:

- One run per source: an atlas (its own model at its site) or a map (its subject model, mapped
  into the map's atlas). Removing the atlas or the map cascades to the run and its rows.
- Texts are processed in chunks of a fixed size from text 0. A chunk's changes to the top
  windows (the rows of every concept whose top changed in it) are written *in the same
  transaction* that advances ``n_done`` from the chunk's start to its end (`ContextPass.commit_chunk`),
  so the rows always hold the top windows of exactly the texts ``[0, n_done)``: a kill loses at
  most the chunk in flight, and a resume reloads the rows and continues at ``n_done``.
- The advance is conditional on ``n_done`` still being the chunk's start and comes first (it
  takes the database's write lock), so a second worker on the same run stops with
  `ContextConflictError` instead of writing a chunk twice.
- A run records, when created, the checksums of its atlas's vectors (and of its map), which a
  resume checks; a run left ``running`` by a process that is gone reads as ``interrupted``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.engine import Connection

from engine.errors import AtlasError, BadValueError, NotFoundError
from engine.store.base import StoreBase
from engine.store.passes import ResumablePass, worker_status
from engine.store.schema import AlignmentMapRow, AtlasRow, ConceptContextRow, ConceptRow, ContextRunRow

_RUNS = cast(Table, ContextRunRow.__table__)
_ROWS = cast(Table, ConceptContextRow.__table__)
ROW_FIELDS = ("ordinal", "rank", "activation", "text_index", "position", "window", "window_start", "token_start",
              "token_end")
_DELETE_CHUNK = 500  # ordinals per DELETE ... IN (...): well under every driver's parameter limit


class ContextConflictError(AtlasError):
    """Another process advanced the same context run (two workers on one run)."""


@dataclasses.dataclass(frozen=True)
class ContextRun:
    """A top-contexts run as the store records it; ``status`` accounts for killed workers."""

    id: int
    atlas: str
    map: str | None  # None: the atlas's own model
    model: str  # the model the corpus went through (the map's subject, or the atlas's model)
    corpus: str
    fingerprint: str
    top: int
    n_texts: int
    n_done: int
    chunk: int
    scoring: str  # encoder (the atlas SAE's activation) | projection (on the concept's unit direction)
    status: str
    error: str | None
    params: dict[str, Any]
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @property
    def source(self) -> str:
        return f"map {self.map}" if self.map else f"atlas {self.atlas}"

    @property
    def progress(self) -> float:
        return self.n_done / self.n_texts if self.n_texts else 1.0


@dataclasses.dataclass(frozen=True)
class ConceptContext:
    """One of a concept's top windows: the text around the token where it activates, the token's span in it."""

    rank: int
    activation: float
    text_index: int
    position: int
    window: str
    window_start: int  # the window's character offset in the text
    token_start: int  # the token's character span in ``window`` (-1 when the tokenizer gives no offsets)
    token_end: int

    @property
    def token(self) -> str:
        return self.window[self.token_start:self.token_end] if 0 <= self.token_start < self.token_end else ""


class ContextsMixin(StoreBase):
    """Store methods over top-contexts runs and their windows."""

    def context_runs(self, atlas: str | None = None) -> list[ContextRun]:
        """Every context run (into ``atlas`` only, if given), oldest first."""
        q = _run_query().order_by(ContextRunRow.id)
        if atlas is not None:
            q = q.where(AtlasRow.name == atlas)
        with self.session() as s:
            return [_info(*r) for r in s.execute(q)]

    def context_run(self, atlas: str, map_name: str | None = None) -> ContextRun | None:
        """The run of a source (an atlas's own model, or a map), or None if there is none."""
        q = _run_query().where(AtlasRow.name == atlas)
        q = q.where(ContextRunRow.map_id.is_(None)) if map_name is None else q.where(AlignmentMapRow.name == map_name)
        with self.session() as s:
            r = s.execute(q).first()
            return None if r is None else _info(*r)

    def context_run_by_id(self, run_id: int) -> ContextRun:
        with self.session() as s:
            r = s.execute(_run_query().where(ContextRunRow.id == run_id)).first()
            if r is None:
                raise NotFoundError(f"no context run {run_id}; `atlas contexts` starts one")
            return _info(*r)

    def add_context_run(
        self, atlas: str, map_name: str | None, *, corpus: str, fingerprint: str, top: int, n_texts: int,
        chunk: int, scoring: str, params: dict[str, Any] | None = None,
    ) -> ContextRun:
        """Record a new, pending run for a source that has none (`remove_context_run` first).

        Its ``params`` get the checksum of the atlas's vectors (and of the map), which a resume checks.
        """
        if top < 1 or chunk < 1:
            raise BadValueError(f"top and chunk must be >= 1, got top={top}, chunk={chunk}")
        with self.session() as s:
            atlas_row = s.scalar(select(AtlasRow).where(AtlasRow.name == atlas))
            if atlas_row is None:
                raise NotFoundError(f"no atlas named {atlas!r}; `atlas atlases` lists them")
            pins: dict[str, Any] = {"atlas_vector_sha256": atlas_row.vector_sha256}
            map_id = None
            if map_name is not None:
                map_row = s.scalar(select(AlignmentMapRow).where(AlignmentMapRow.name == map_name))
                if map_row is None:
                    raise NotFoundError(f"no map named {map_name!r}; `atlas maps` lists them")
                map_id, pins["map_sha256"] = map_row.id, map_row.sha256
            row = ContextRunRow(
                atlas_id=atlas_row.id, map_id=map_id, corpus=corpus, corpus_fingerprint=fingerprint, top=top,
                n_texts=n_texts, n_done=0, chunk=chunk, scoring=scoring, status="pending",
                params={**(params or {}), **pins},
            )
            s.add(row)
            s.flush()
            run_id = row.id
        return self.context_run_by_id(run_id)

    def remove_context_run(self, run_id: int) -> None:
        """Delete a run and its windows."""
        with self.session() as s:
            s.execute(delete(ConceptContextRow).where(ConceptContextRow.run_id == run_id))
            s.execute(delete(ContextRunRow).where(ContextRunRow.id == run_id))

    def context_rows(self, run_id: int) -> list[tuple[Any, ...]]:
        """Every window of a run as tuples of `ROW_FIELDS`, by concept ordinal then rank."""
        q = (select(*(getattr(ConceptContextRow, f) for f in ROW_FIELDS))
             .where(ConceptContextRow.run_id == run_id)
             .order_by(ConceptContextRow.ordinal, ConceptContextRow.rank))
        with self.session() as s:
            return [tuple(r) for r in s.execute(q)]

    def concept_contexts(self, atlas: str, ordinal: int, limit: int = 20) -> list[tuple[ContextRun, list[ConceptContext]]]:
        """A concept's top windows, per run into its atlas (the atlas's own model first, then maps by name),
        at most ``limit`` each, highest activation first."""
        if limit < 1:
            raise BadValueError(f"limit must be >= 1, got {limit}")
        with self.session() as s:
            found = s.scalar(select(ConceptRow.id).join(AtlasRow, ConceptRow.atlas_id == AtlasRow.id)
                             .where(AtlasRow.name == atlas, ConceptRow.ordinal == ordinal))
            if found is None:
                raise NotFoundError(f"no concept {atlas}/{ordinal}; `atlas atlases` lists the atlases")
        runs = sorted(self.context_runs(atlas), key=lambda r: (r.map is not None, r.map or ""))
        out = []
        with self.session() as s:
            for run in runs:
                q = (select(*(getattr(ConceptContextRow, f) for f in ROW_FIELDS[1:]))
                     .where(ConceptContextRow.run_id == run.id, ConceptContextRow.ordinal == ordinal)
                     .order_by(ConceptContextRow.rank).limit(limit))
                out.append((run, [ConceptContext(*r) for r in s.execute(q)]))
        return out

    # ------------------------------------------------------------------ the pass

    def context_pass(self, run: ContextRun) -> ContextPass:
        """``run`` as its worker drives it (`engine.store.passes.ResumablePass`): its steps are the
        run's chunks of texts, each committed with `ContextPass.commit_chunk`."""
        return ContextPass(self, run)


class ContextPass(ResumablePass):
    """A context run's pass: its chunks of texts, each committed with the windows it changed."""

    def __init__(self, store: ContextsMixin, run: ContextRun) -> None:
        super().__init__(store.engine, _RUNS, run.id, n=run.n_texts, done=run.n_done, step=run.chunk,
                         conflict=ContextConflictError, what="context run", unit="text", failpoints="contexts.chunk")
        self.store = store

    def commit_chunk(self, lo: int, hi: int, ordinals: Sequence[int], rows: Sequence[tuple[Any, ...]]) -> None:
        """Advance n_done lo → hi and replace the windows of ``ordinals`` by ``rows`` (tuples of
        `ROW_FIELDS`), in one transaction."""
        run_id = self.run_id

        def write(conn: Connection) -> None:
            ords = [int(o) for o in ordinals]
            for i in range(0, len(ords), _DELETE_CHUNK):
                conn.execute(delete(_ROWS).where(ConceptContextRow.run_id == run_id,
                                                 ConceptContextRow.ordinal.in_(ords[i:i + _DELETE_CHUNK])))
            if rows:
                conn.execute(insert(_ROWS), [dict(zip(("run_id", *ROW_FIELDS), (run_id, *r), strict=True))
                                             for r in rows])

        self.commit(lo, hi, write)

    def status(self) -> ContextRun:
        """The run as the store records it now."""
        return self.store.context_run_by_id(self.run_id)


def _run_query():
    return (
        select(ContextRunRow, AtlasRow.name, AlignmentMapRow.name)
        .join(AtlasRow, ContextRunRow.atlas_id == AtlasRow.id)
        .outerjoin(AlignmentMapRow, ContextRunRow.map_id == AlignmentMapRow.id)
    )


def _info(row: ContextRunRow, atlas: str, map_name: str | None) -> ContextRun:
    params = dict(row.params or {})
    status = worker_status(row.status, params)  # a killed run reads as interrupted: a re-run continues it
    return ContextRun(
        id=row.id, atlas=atlas, map=map_name, model=str(params.get("model", "")), corpus=row.corpus,
        fingerprint=row.corpus_fingerprint, top=row.top, n_texts=row.n_texts, n_done=row.n_done, chunk=row.chunk,
        scoring=row.scoring, status=status, error=row.error, params=params, created_at=row.created_at,
        updated_at=row.updated_at,
    )
