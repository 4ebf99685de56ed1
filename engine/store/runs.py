"""Labelling runs as the store records them: the ``label_runs`` and ``feature_labels`` rows (`RunsMixin`).

The resumable loop that fills a run is `engine.labelling.run`; everything it reads or writes in
the database goes through the methods here, and these are the guarantees it builds on:

- A batch's rows are inserted *in the same transaction* that advances the run's ``n_done``
  (`LabelPass.commit_batch`, over the shared `engine.store.passes.ResumablePass`), so the
  database always holds a committed prefix ``[0, n_done)`` of the features with every row of it
  and none after: a kill at any point loses at most the batch in flight, and resuming at
  ``n_done`` recomputes exactly that.
- The advance is conditional on ``n_done`` still being the batch's start, and comes first in
  the transaction: it takes the run's row lock (the database's write lock on SQLite), so a
  second worker on the same run waits, then finds ``n_done`` moved and stops with
  `RunConflictError` instead of writing the batch twice.
- A run records, when created, the checksums of its map and of its atlas's vectors and the
  fingerprint of its features, so a resume can refuse inputs that changed since.
- A run left ``running`` by a process that is gone (killed) reads as ``interrupted``.
- What a run ranks with besides the map and the atlas (its atlas-side statistic, its co-activation
  statistics) is a file of the store's ``runs/`` folder (`save_run_file`), written before the
  run's first batch commits and recorded, with its sha256, in ``params["files"]``: a resume reads
  the same bytes back (`read_run_file`) or refuses, so its rows are those of an uninterrupted run.

Rows are inserted with the driver's ``executemany`` on plain tuples (hundreds of thousands of
rows in seconds, where ORM objects take tens).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, and_, case, delete, func, or_, select, true
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from engine.errors import AtlasError, BadValueError, DuplicateError, NotFoundError, SourceChangedError
from engine.store import layout
from engine.store.atlases import index_identity
from engine.store.base import StoreBase, bulk_page_cache
from engine.store.passes import ResumablePass, worker_status
from engine.store.schema import AlignmentMapRow, AtlasRow, ConceptRow, FeatureLabelRow, LabelRunRow
from engine.util import check_name, sha256_bytes, write_store_file

RUN_ORDERS: tuple[str, ...] = ("feature", "score", "margin", "confidence")  # orders of `RunsMixin.run_label_page`
_RUNS = cast(Table, LabelRunRow.__table__)  # Core UPDATEs on the run row (the batch commit, status)


class RunConflictError(AtlasError):
    """Another process advanced the same labelling run (two workers on one run)."""


@dataclasses.dataclass(frozen=True)
class LabellingRun:
    """A labelling run as the store records it; ``status`` accounts for killed workers."""

    name: str
    map: str
    atlas: str
    feature_source: str
    fingerprint: str
    n_features: int
    k: int
    batch_size: int
    status: str
    n_done: int
    error: str | None
    params: dict[str, Any]
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @property
    def progress(self) -> float:
        return self.n_done / self.n_features if self.n_features else 1.0


class RunsMixin(StoreBase):
    """Store methods over labelling runs and their labels."""

    def runs(self) -> list[LabellingRun]:
        """Every labelling run of the store, oldest first."""
        with self.read_session() as s:
            return [_info(*r) for r in s.execute(_run_query().order_by(LabelRunRow.id))]

    def run(self, name: str) -> LabellingRun:
        with self.read_session() as s:
            r = s.execute(_run_query().where(LabelRunRow.name == name)).first()
            if r is None:
                raise NotFoundError(f"no labelling run named {name!r}; `atlas runs` lists them")
            return _info(*r)

    def remove_run(self, name: str) -> None:
        """Delete a run and its labels (two set-based statements, one transaction)."""
        self.check_writable()
        with self.session() as s:
            run_id = s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name))
            if run_id is None:
                raise NotFoundError(f"no labelling run named {name!r}; `atlas runs` lists them")
            params = s.scalar(select(LabelRunRow.params).where(LabelRunRow.id == run_id))
            s.execute(delete(FeatureLabelRow).where(FeatureLabelRow.run_id == run_id))
            s.execute(delete(LabelRunRow).where(LabelRunRow.id == run_id))
        for rel in layout.run_files(params):  # after the commit: a kill before this leaves a leftover for gc
            (self.path / rel).unlink(missing_ok=True)

    def save_run_file(self, name: str, kind: str, data: bytes) -> dict[str, str]:
        """Write ``data`` as a new file of run ``name`` (``runs/<name>@<token>.<kind>.npz``, atomically)
        and return its record ``{"file", "sha256"}``; the caller records it in the run's
        ``params["files"][kind]``. Until this store closes, the file's token stays claimed (`claim_token`):
        `gc` keeps it while this process lives, and removes it once its writer is gone unrecorded."""
        self.check_writable()
        rel = layout.run_file(name, self.claim_token(hold=True), kind)
        write_store_file(self.path / rel, data)
        return {"file": rel, "sha256": sha256_bytes(data)}

    def read_run_file(self, name: str, kind: str) -> bytes | None:
        """The bytes of run ``name``'s file ``kind`` as recorded (None where the run records none);
        a missing or changed file is a `SourceChangedError` (its rows could not be reproduced)."""
        rec = (self.run(name).params.get("files") or {}).get(kind)
        if not rec:
            return None
        try:
            data = (self.path / rec["file"]).read_bytes()
        except FileNotFoundError:
            raise SourceChangedError(f"the {kind} file of run {name!r} ({rec['file']}) is gone; "
                                     f"start the run again with --overwrite") from None
        if sha256_bytes(data) != rec["sha256"]:
            raise SourceChangedError(f"the {kind} file of run {name!r} ({rec['file']}) changed since the run "
                                     f"started; start the run again with --overwrite")
        return data

    def add_run(
        self, name: str, map_name: str, *, feature_source: str, fingerprint: str, n_features: int, k: int,
        batch_size: int, params: dict[str, Any] | None = None, overwrite: bool = False,
    ) -> LabellingRun:
        """Record a new, pending run of ``n_features`` features through map ``map_name``.

        Its ``params`` get the checksums of the map and of the atlas's vectors and the atlas's
        index spec and identity (`index_identity`), which a resume checks. An existing run of that name is an error, unless
        ``overwrite`` (then it and its labels are removed first).
        """
        self.check_writable()
        check_name(name, "labelling run")
        try:
            old = self.run(name)
        except NotFoundError:
            old = None
        if old is not None:
            if not overwrite:
                then = (f"`atlas export {name}` writes its labels" if old.status == "done"
                        else f"`atlas label --resume {name}` continues it")
                raise DuplicateError(
                    f"a labelling run named {name!r} exists ({old.status}, {old.n_done}/{old.n_features}); "
                    f"{then}, --name picks another, --overwrite replaces it"
                )
            self.remove_run(name)
        try:
            with self.session() as s:
                if s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name)) is not None:
                    raise DuplicateError(f"a labelling run named {name!r} was created while this one was; "
                                         "--name picks another")
                map_row = s.scalar(select(AlignmentMapRow).where(AlignmentMapRow.name == map_name))
                if map_row is None:
                    raise NotFoundError(f"no map named {map_name!r}; `atlas maps` lists them")
                atlas_row = s.get(AtlasRow, map_row.atlas_id)
                assert atlas_row is not None  # a foreign key: the map's atlas exists
                s.add(LabelRunRow(
                    name=name, map_id=map_row.id, feature_source=feature_source, feature_fingerprint=fingerprint,
                    n_features=n_features, k=k, batch_size=batch_size, status="pending", n_done=0,
                    params={**(params or {}), "map_sha256": map_row.sha256,
                            "atlas_vector_sha256": atlas_row.vector_sha256, "index_spec": atlas_row.index_spec,
                            "index": index_identity(atlas_row)},
                ))
        except IntegrityError:  # another database than SQLite: the unique name decides
            raise DuplicateError(f"a labelling run named {name!r} was created while this one was; "
                                 "--name picks another") from None
        return self.run(name)

    def run_label_rows(self, name: str, start: int, stop: int) -> list[tuple[Any, ...]]:
        """The labels of features ``[start, stop)`` of a run, in order of feature then rank, as
        ``(feature, rank, score, concept ordinal, concept label, labelled, confidence)`` (confidence: on
        rank 1, None elsewhere and on runs written without one)."""
        q = (
            select(FeatureLabelRow.feature_index, FeatureLabelRow.rank, FeatureLabelRow.score,
                   ConceptRow.ordinal, ConceptRow.label, ConceptRow.labelled, FeatureLabelRow.confidence)
            .join(ConceptRow, FeatureLabelRow.concept_id == ConceptRow.id)
            .join(LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id)
            .where(LabelRunRow.name == name, FeatureLabelRow.feature_index >= start,
                   FeatureLabelRow.feature_index < stop)
            .order_by(FeatureLabelRow.feature_index, FeatureLabelRow.rank)
        )
        with self.read_session() as s:
            return [tuple(r) for r in s.execute(q)]

    def run_label_page(self, name: str, order: str = "feature", *, descending: bool = False, offset: int = 0,
                       limit: int = 100) -> list[tuple[Any, ...]]:
        """One page of a run's features, ordered by ``order``: the rows of `run_label_rows` for the
        features ``offset .. offset+limit`` of that order.

        ``order`` is ``feature`` (index), ``score`` (the top hit's), ``margin`` (top score minus the
        second; a feature with one hit has none and sorts last) or ``confidence`` (the label's; none
        sorts last). The order is computed in the
        database over the rank-1 and rank-2 rows, so a page of a million-feature run reads one page.
        """
        if order not in RUN_ORDERS:
            raise BadValueError(f"order must be one of {RUN_ORDERS}, got {order!r}")
        if offset < 0 or limit < 1:
            raise BadValueError(f"offset must be >= 0 and limit >= 1, got offset={offset}, limit={limit}")
        run_id = self._run_id(name)
        top = aliased(FeatureLabelRow)
        second = aliased(FeatureLabelRow)
        margin = top.score - second.score
        key = {"feature": top.feature_index, "score": top.score, "margin": margin, "confidence": top.confidence}[order]
        q = (select(top.feature_index)
             .outerjoin(second, and_(second.run_id == top.run_id, second.feature_index == top.feature_index,
                                     second.rank == 2))
             .where(top.run_id == run_id, top.rank == 1)
             .order_by(key.is_(None), key.desc() if descending else key.asc(), top.feature_index)
             .offset(offset).limit(limit))
        with self.session() as s:
            features = [int(f) for f in s.scalars(q)]
            if not features:
                return []
            rows = s.execute(
                select(FeatureLabelRow.feature_index, FeatureLabelRow.rank, FeatureLabelRow.score,
                       ConceptRow.ordinal, ConceptRow.label, ConceptRow.labelled, FeatureLabelRow.confidence)
                .join(ConceptRow, FeatureLabelRow.concept_id == ConceptRow.id)
                .where(FeatureLabelRow.run_id == run_id, FeatureLabelRow.feature_index.in_(features))
            ).all()
        place = {f: i for i, f in enumerate(features)}
        return sorted((tuple(r) for r in rows), key=lambda r: (place[r[0]], r[1]))

    def concept_labels(self, atlas: str, ordinal: int, limit: int = 50, *, top_only: bool = False,
                       min_confidence: float | None = None) -> list[tuple[Any, ...]]:
        """Which subject features carry a concept: ``(run, map, feature, rank, score)`` rows of every
        labelling run that named it, best score first (at most ``limit``). ``top_only``: only the
        features whose label it is (rank 1); ``min_confidence``: only labels of at least that confidence
        (rows of runs that recorded none are kept)."""
        if limit < 1:
            raise BadValueError(f"limit must be >= 1, got {limit}")
        with self.session() as s:
            concept_id = s.scalar(select(ConceptRow.id).join(AtlasRow, ConceptRow.atlas_id == AtlasRow.id)
                                  .where(AtlasRow.name == atlas, ConceptRow.ordinal == ordinal))
            if concept_id is None:
                raise NotFoundError(f"no concept {atlas}/{ordinal}; `atlas atlases` lists the atlases")
            q = (select(LabelRunRow.name, AlignmentMapRow.name, FeatureLabelRow.feature_index, FeatureLabelRow.rank,
                        FeatureLabelRow.score)
                 .join(LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id)
                 .join(AlignmentMapRow, LabelRunRow.map_id == AlignmentMapRow.id)
                 .where(FeatureLabelRow.concept_id == concept_id)
                 .where(FeatureLabelRow.rank == 1 if top_only else true())
                 .where(or_(FeatureLabelRow.confidence.is_(None), FeatureLabelRow.confidence >= min_confidence)
                        if min_confidence is not None else true())
                 .order_by(FeatureLabelRow.score.desc(), LabelRunRow.name, FeatureLabelRow.feature_index)
                 .limit(limit))
            return [tuple(r) for r in s.execute(q)]

    def run_confidence(self, name: str, min_confidence: float | None = None) -> dict[str, Any]:
        """A run's label confidence in one query over its rank-1 rows: ``{"n_features", "n_with"
        (features with a confidence), "mean", "min_confidence", "n_matched" (at or above it)}``."""
        run_id = self._run_id(name)
        conf = FeatureLabelRow.confidence
        passed = func.sum(case((conf >= min_confidence, 1), else_=0)) if min_confidence is not None else None
        cols = [func.count(), func.count(conf), func.avg(conf), *([passed] if passed is not None else [])]
        with self.read_session() as s:
            row = s.execute(select(*cols).where(FeatureLabelRow.run_id == run_id, FeatureLabelRow.rank == 1)).one()
        out = {"n_features": int(row[0]), "n_with": int(row[1]), "mean": None if row[2] is None else float(row[2]),
               "min_confidence": min_confidence}
        if passed is not None:
            out["n_matched"] = int(row[3] or 0)
        return out

    def _run_id(self, name: str) -> int:
        with self.read_session() as s:
            run_id = s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name))
        if run_id is None:
            raise NotFoundError(f"no labelling run named {name!r}; `atlas runs` lists them")
        return int(run_id)

    def count_run_labels(self, name: str) -> int:
        """How many label rows (feature, rank) a run holds; 0 for an unknown run."""
        with self.read_session() as s:
            q = (select(func.count()).select_from(FeatureLabelRow)
                 .join(LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id).where(LabelRunRow.name == name))
            return int(s.scalar(q) or 0)

    # ------------------------------------------------------------------ the labelling loop

    def label_pass(self, name: str) -> LabelPass:
        """The run ``name`` as its worker drives it (`engine.store.passes.ResumablePass`): its steps are
        the run's batches, each committed with `LabelPass.commit_batch`."""
        run = self.run(name)
        with self.read_session() as s:
            run_id, atlas_id, vec_sha = s.execute(
                select(LabelRunRow.id, AtlasRow.id, AtlasRow.vector_sha256)
                .join(AlignmentMapRow, AlignmentMapRow.atlas_id == AtlasRow.id)
                .join(LabelRunRow, LabelRunRow.map_id == AlignmentMapRow.id)
                .where(LabelRunRow.name == name)
            ).one()
        return LabelPass(self, run_id, atlas_id, vec_sha, run)

    def concept_ids(self, atlas_id: int) -> np.ndarray:
        """``concepts.id`` of each ordinal of an atlas (-1 where none)."""
        with self.read_session() as s:
            rows = s.execute(select(ConceptRow.ordinal, ConceptRow.id).where(ConceptRow.atlas_id == atlas_id)).all()
        ords = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out = np.full(int(ords.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
        out[ords] = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        return out


class LabelPass(ResumablePass):
    """A labelling run's pass: its batches of features, each committed with its label rows."""

    def __init__(self, store: RunsMixin, run_id: int, atlas_id: int, atlas_vector_sha256: str,
                 run: LabellingRun) -> None:
        super().__init__(store.engine, _RUNS, run_id, n=run.n_features, done=run.n_done, step=run.batch_size,
                         conflict=RunConflictError, what="labelling run", unit="feature", failpoints="label.batch")
        self.store, self.name = store, run.name
        self.atlas_id, self.atlas_vector_sha256 = atlas_id, atlas_vector_sha256
        self._concept_ids: np.ndarray | None = None

    def status(self) -> LabellingRun:
        """The run as the store records it now."""
        return self.store.run(self.name)

    def commit_batch(self, lo: int, hi: int, scores: np.ndarray, ids: np.ndarray,
                     confidence: np.ndarray | None = None) -> None:
        """Advance n_done lo → hi and insert the label rows of features [lo, hi) (``ids``: atlas
        ordinals (b, k), -1 where an ANN index returned fewer; ``scores`` alike; ``confidence`` (b,)
        on each feature's rank-1 row), in one transaction."""
        if self._concept_ids is None:
            self._concept_ids = self.store.concept_ids(self.atlas_id)  # ordinal -> concepts.id
        b, k = ids.shape
        valid = ids >= 0  # (b, k): an ANN index may return fewer than k
        feature = np.broadcast_to(np.arange(lo, hi, dtype=np.int64)[:, None], (b, k))[valid]
        rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int64)[None, :], (b, k))[valid]
        conf: list[float | None] = [None] * len(feature)
        if confidence is not None:
            c = np.full((b, k), np.nan)
            c[:, 0] = np.asarray(confidence, dtype=np.float64).reshape(b)
            conf = [None if v != v else v for v in c[valid].tolist()]  # NaN (ranks > 1) -> NULL
        rows = list(zip([self.run_id] * len(feature), feature.tolist(), rank.tolist(),
                        self._concept_ids[ids[valid]].tolist(), scores[valid].astype(np.float64).tolist(), conf))

        def write(conn: Connection) -> None:
            if rows:
                try:  # the driver's executemany on plain tuples: 500k rows in seconds, not tens
                    with bulk_page_cache(conn):
                        conn.exec_driver_sql(label_insert_sql(conn.dialect.paramstyle), rows)
                except IntegrityError:
                    raise RunConflictError(f"another process wrote this run's features from {lo}; stopped") from None

        self.commit(lo, hi, write)


def _run_query():
    return (
        select(LabelRunRow, AlignmentMapRow.name, AtlasRow.name)
        .join(AlignmentMapRow, LabelRunRow.map_id == AlignmentMapRow.id)
        .join(AtlasRow, AlignmentMapRow.atlas_id == AtlasRow.id)
    )


def _info(row: LabelRunRow, map_name: str, atlas: str) -> LabellingRun:
    status = worker_status(row.status, row.params)
    return LabellingRun(
        name=row.name, map=map_name, atlas=atlas, feature_source=row.feature_source,
        fingerprint=row.feature_fingerprint, n_features=row.n_features, k=row.k, batch_size=row.batch_size,
        status=status, n_done=row.n_done, error=row.error, params=dict(row.params or {}),
        created_at=row.created_at, updated_at=row.updated_at,
    )


_LABEL_COLUMNS = ("run_id", "feature_index", "rank", "concept_id", "score", "confidence")


def label_insert_sql(paramstyle: str) -> str:
    """INSERT of one feature_labels row with positional parameters in the driver's style."""
    n = len(_LABEL_COLUMNS)
    marks = {"qmark": ["?"] * n, "numeric": [f":{i + 1}" for i in range(n)],
             "format": ["%s"] * n, "pyformat": ["%s"] * n}.get(paramstyle)
    if marks is None:
        raise AtlasError(f"database driver paramstyle {paramstyle!r} is not supported for bulk label writes")
    table = FeatureLabelRow.__tablename__
    return f"INSERT INTO {table} ({', '.join(_LABEL_COLUMNS)}) VALUES ({', '.join(marks)})"
