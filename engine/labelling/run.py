"""Bulk labelling: many subject features through one map, top-k atlas concepts each, in the DB.

Why a run can be killed at any point and resumed exactly: features are processed in batches of a
fixed size from feature 0, and each batch's rows are inserted *in the same transaction* that
advances the run's ``n_done`` (guarded by ``n_done`` still being the batch's start, so two
processes on one run cannot both advance it). A kill leaves a committed prefix ``[0, n_done)``
with every row of it and none after; resume re-reads the source, checks that its fingerprint and
the map's checksum are those the run started with, and continues at ``n_done`` with the same
batch boundaries, so it computes exactly the rows an uninterrupted run computes.

Throughput: one float32 GEMM per batch projects the features (`engine.search.project`), the
atlas index is searched with the whole batch, and the rows go in with one ``executemany``; on a
100k-concept Flat atlas the search is nearly all of the time (benchmarks/bench_labelling.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import socket
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from engine.errors import AtlasError, DuplicateError, NotFoundError
from engine.labelling.sources import FeatureSource, open_feature_source
from engine.progress import progress
from engine.search import project
from engine.store.schema import AlignmentMapRow, AtlasRow, ConceptRow, FeatureLabelRow, LabelRunRow
from engine.store.store import Store
from engine.util import MAX_NAME, check_name, utcnow

DEFAULT_K = 5
DEFAULT_BATCH = 4096  # features per transaction: a few seconds of search on a 100k atlas
RunStatus = Literal["pending", "running", "interrupted", "failed", "done"]


class SourceChangedError(AtlasError):
    """A run is resumed on features or a map that differ from those it started with."""


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


# ---------------------------------------------------------------------- runs


def _run_query():
    return (
        select(LabelRunRow, AlignmentMapRow.name, AtlasRow.name)
        .join(AlignmentMapRow, LabelRunRow.map_id == AlignmentMapRow.id)
        .join(AtlasRow, AlignmentMapRow.atlas_id == AtlasRow.id)
    )


def _info(row: LabelRunRow, map_name: str, atlas: str) -> LabellingRun:
    status = row.status
    worker = (row.params or {}).get("worker") or {}
    if status == "running" and worker.get("host") == socket.gethostname() and not _alive(worker.get("pid")):
        status = "interrupted"  # its process is gone (killed): resume it
    return LabellingRun(
        name=row.name, map=map_name, atlas=atlas, feature_source=row.feature_source,
        fingerprint=row.feature_fingerprint, n_features=row.n_features, k=row.k, batch_size=row.batch_size,
        status=status, n_done=row.n_done, error=row.error, params=dict(row.params or {}),
        created_at=row.created_at, updated_at=row.updated_at,
    )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is not running either
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def list_runs(store: Store) -> list[LabellingRun]:
    """Every labelling run of the store, oldest first."""
    with store.session() as s:
        return [_info(*r) for r in s.execute(_run_query().order_by(LabelRunRow.id))]


def get_run(store: Store, name: str) -> LabellingRun:
    with store.session() as s:
        r = s.execute(_run_query().where(LabelRunRow.name == name)).first()
        if r is None:
            raise NotFoundError(f"no labelling run named {name!r}; `atlas runs` lists them")
        return _info(*r)


def remove_run(store: Store, name: str) -> None:
    """Delete a run and its labels."""
    with store.session() as s:
        row = s.scalar(select(LabelRunRow).where(LabelRunRow.name == name))
        if row is None:
            raise NotFoundError(f"no labelling run named {name!r}; `atlas runs` lists them")
        s.execute(delete(FeatureLabelRow).where(FeatureLabelRow.run_id == row.id))
        s.delete(row)


def default_run_name(map_name: str, source: str, k: int) -> str:
    """``<map>.<source file stem>.k<k>``, the stem shortened so the name fits `check_name`'s limit."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", source.rstrip("/").replace("#", "-").rsplit("/", 1)[-1]).strip("._")
    tail = f".k{k}"
    room = MAX_NAME - len(map_name.encode("utf-8")) - 1 - len(tail)  # the stem is ASCII: chars are bytes
    stem = (stem or "features")[: max(room, 1)].rstrip(".") or "features"
    return f"{map_name}.{stem}{tail}"


def create_run(
    store: Store, map_name: str, features: str, *, k: int = DEFAULT_K, name: str | None = None,
    batch_size: int = DEFAULT_BATCH, key: str | None = None, site_check: bool = True, overwrite: bool = False,
) -> LabellingRun:
    """Record a new run labelling ``features`` (see `engine.labelling.sources`) through map ``map_name``.

    The features' width must be the map's subject width; where the source records its site
    (SAELens ``cfg.json``) the model and layer must be the map's too, unless ``site_check=False``.
    """
    return _create_run(store, map_name, features, k=k, name=name, batch_size=batch_size, key=key,
                       site_check=site_check, overwrite=overwrite)[0]


def _create_run(store: Store, map_name: str, features: str, *, k: int, name: str | None, batch_size: int,
                key: str | None, site_check: bool, overwrite: bool) -> tuple[LabellingRun, FeatureSource]:
    if k < 1:
        raise AtlasError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise AtlasError(f"--batch must be >= 1, got {batch_size}")
    amap = store.load_map(map_name)
    source = open_feature_source(features, key=key, store=store, amap=amap)
    check_source_site(store, amap, source, site_check)
    n_concepts = store.atlas(amap.atlas).n_concepts
    name = name or default_run_name(map_name, source.spec, k)
    check_name(name, "labelling run")
    with store.session() as s:
        old = s.scalar(select(LabelRunRow).where(LabelRunRow.name == name))
    if old is not None:
        if not overwrite:
            run = get_run(store, name)
            then = (f"`atlas export {name}` writes its labels" if run.status == "done"
                    else f"`atlas label --resume {name}` continues it")
            raise DuplicateError(
                f"a labelling run named {name!r} exists ({run.status}, {run.n_done}/{run.n_features}); "
                f"{then}, --name picks another, --overwrite replaces it"
            )
        remove_run(store, name)
    with store.session() as s:
        map_row = s.scalar(select(AlignmentMapRow).where(AlignmentMapRow.name == map_name))
        atlas_row = s.get(AtlasRow, map_row.atlas_id)
        s.add(LabelRunRow(
            name=name, map_id=map_row.id, feature_source=source.spec, feature_fingerprint=source.fingerprint,
            n_features=source.n_features, k=min(k, n_concepts), batch_size=batch_size, status="pending", n_done=0,
            params={"source_kind": source.kind, "map_sha256": store.map_info(map_name).sha256,
                    "atlas_vector_sha256": atlas_row.vector_sha256, "index_spec": atlas_row.index_spec,
                    "site_check": site_check, "k_requested": k},
        ))
    return get_run(store, name), source


def check_source_site(store: Store, amap: Any, source: FeatureSource, site_check: bool = True) -> None:
    """Width always; model, layer and hook where the source records them (and ``site_check``)."""
    model = source.model
    if model is not None:
        known = {amap.subject_model}
        try:
            known.add(store.get_model(amap.subject_model).source)
        except NotFoundError:
            pass
        model = None if model in known else model
    if site_check:
        amap.check_site(model, source.layer, source.dim, source.hook)
    else:
        amap.check_site(None, None, source.dim, None)


def label_features(
    store: Store, map_name: str, features: str, *, k: int = DEFAULT_K, name: str | None = None,
    batch_size: int = DEFAULT_BATCH, key: str | None = None, site_check: bool = True,
    overwrite: bool = False, quiet: bool = False,
) -> LabellingRun:
    """Create a run and carry it out to the end (see `create_run` and `run_labelling`)."""
    run, source = _create_run(store, map_name, features, k=k, name=name, batch_size=batch_size, key=key,
                              site_check=site_check, overwrite=overwrite)
    return run_labelling(store, run.name, quiet=quiet, _source=source)


def resume_run(store: Store, name: str, *, quiet: bool = False) -> LabellingRun:
    """Continue an interrupted, failed or pending run from its last committed batch."""
    return run_labelling(store, name, quiet=quiet)


def run_labelling(store: Store, name: str, *, quiet: bool = False, max_batches: int | None = None,
                  _source: FeatureSource | None = None) -> LabellingRun:
    """Carry out a run from ``n_done`` to the end (or for ``max_batches`` batches).

    Each batch is projected, searched and committed together with the advance of ``n_done``.
    Ctrl-C leaves the run ``interrupted``, an error ``failed`` (with its message); both resume.
    """
    run = get_run(store, name)
    if run.status == "done":
        return run
    worker = run.params.get("worker") or {}
    if run.status == "running" and worker.get("host") == socket.gethostname():
        # On another host the worker's liveness cannot be told; resuming there is still safe,
        # because every commit is conditional on n_done: of two workers only one advances.
        raise RunConflictError(
            f"labelling run {name!r} is running in process {worker.get('pid')}; wait for it or stop it first"
        )
    if store.map_info(run.map).sha256 != run.params.get("map_sha256"):
        raise SourceChangedError(
            f"map {run.map!r} was refitted since run {name!r} started; its labels would mix two maps. "
            f"Start a new run (`atlas label {run.map} --features ... --overwrite --name {name}`)"
        )
    amap = store.load_map(run.map)
    source = _source or open_feature_source(run.feature_source, store=store, amap=amap)
    if source.fingerprint != run.fingerprint or source.n_features != run.n_features:
        raise SourceChangedError(
            f"the features of run {name!r} ({run.feature_source}) changed since it started "
            f"({source.n_features} features, fingerprint {source.fingerprint[:12]}, was {run.n_features}, "
            f"{run.fingerprint[:12]}); restore them, or start a new run with --overwrite"
        )
    with store.session() as s:
        run_id = s.scalar(select(LabelRunRow.id).where(LabelRunRow.name == name))
        atlas_id, vec_sha = s.execute(
            select(AtlasRow.id, AtlasRow.vector_sha256).where(AtlasRow.name == run.atlas)).one()
    if vec_sha != run.params.get("atlas_vector_sha256"):
        raise SourceChangedError(f"atlas {run.atlas!r} was re-imported since run {name!r} started")
    concept_ids = _concept_ids(store, atlas_id)  # ordinal -> concepts.id
    index = store.index(run.atlas)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    _set_status(store, run_id, "running", error=None, params={**run.params, "worker": me})

    n, bs, k, done = run.n_features, run.batch_size, run.k, run.n_done
    bar = progress(total=n, initial=done, desc=f"labelling {name}", unit="feat", quiet=quiet)
    batches = 0
    try:
        while done < n and (max_batches is None or batches < max_batches):
            hi = min(n, done + bs)
            scores, ids = index.search(project(amap, source.vectors[done:hi]), k)  # (b, k) each
            _commit_batch(store, run_id, done, hi, ids, scores, concept_ids, n)
            bar.update(hi - done)
            done, batches = hi, batches + 1
    except KeyboardInterrupt:
        _set_status(store, run_id, "interrupted")
        raise
    except RunConflictError:
        raise  # the other worker owns the run's status
    except BaseException as e:
        _set_status(store, run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    if done < n:
        _set_status(store, run_id, "interrupted")
    return get_run(store, name)


def _concept_ids(store: Store, atlas_id: int) -> np.ndarray:
    with store.session() as s:
        rows = s.execute(select(ConceptRow.ordinal, ConceptRow.id).where(ConceptRow.atlas_id == atlas_id)).all()
    ords = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    out = np.full(int(ords.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
    out[ords] = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    return out


def _commit_batch(store: Store, run_id: int, lo: int, hi: int, ids: np.ndarray, scores: np.ndarray,
                  concept_ids: np.ndarray, n: int) -> None:
    """Advance n_done lo → hi and insert the rows of features [lo, hi), in one transaction.

    The conditional update comes first: it takes the run's row lock (the database's write lock
    on SQLite), so a second worker on the same run waits, then finds n_done moved and stops.
    """
    b, k = ids.shape
    valid = ids >= 0  # (b, k): an ANN index may return fewer than k
    feature = np.broadcast_to(np.arange(lo, hi, dtype=np.int64)[:, None], (b, k))[valid]
    rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int64)[None, :], (b, k))[valid]
    rows = list(zip([run_id] * len(feature), feature.tolist(), rank.tolist(), concept_ids[ids[valid]].tolist(),
                    scores[valid].astype(np.float64).tolist()))
    with store.engine.begin() as conn:
        res = conn.execute(
            update(LabelRunRow.__table__)
            .where(LabelRunRow.id == run_id, LabelRunRow.n_done == lo)
            .values(n_done=hi, status="done" if hi >= n else "running", updated_at=utcnow())
        )
        if res.rowcount != 1:
            raise RunConflictError(f"another process advanced this labelling run past feature {lo}; stopped")
        if rows:
            try:  # the driver's executemany on plain tuples: 500k rows in seconds, not tens
                conn.exec_driver_sql(_insert_sql(conn.dialect.paramstyle), rows)
            except IntegrityError:
                raise RunConflictError(f"another process wrote this run's features from {lo}; stopped") from None


_LABEL_COLUMNS = ("run_id", "feature_index", "rank", "concept_id", "score")


def _insert_sql(paramstyle: str) -> str:
    """INSERT of one feature_labels row with positional parameters in the driver's style."""
    n = len(_LABEL_COLUMNS)
    marks = {"qmark": ["?"] * n, "numeric": [f":{i + 1}" for i in range(n)],
             "format": ["%s"] * n, "pyformat": ["%s"] * n}.get(paramstyle)
    if marks is None:
        raise AtlasError(f"database driver paramstyle {paramstyle!r} is not supported for bulk label writes")
    table = FeatureLabelRow.__tablename__
    return f"INSERT INTO {table} ({', '.join(_LABEL_COLUMNS)}) VALUES ({', '.join(marks)})"


def _set_status(store: Store, run_id: int, status: str, **fields: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(LabelRunRow.__table__).where(LabelRunRow.id == run_id)
                     .values(status=status, updated_at=utcnow(), **fields))
