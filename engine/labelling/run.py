"""Bulk labelling: many subject features through one map, top-k atlas concepts each, in the DB.

Why a run can be killed at any point and resumed exactly: features are processed in batches of a
fixed size from feature 0, and each batch's rows are inserted *in the same transaction* that
advances the run's ``n_done`` (guarded by ``n_done`` still being the batch's start, so two
processes on one run cannot both advance it; see `engine.store.runs`, which owns the run's rows
and that transaction). A kill leaves a committed prefix ``[0, n_done)`` with every row of it and
none after; resume re-reads the source, checks that its fingerprint and the map's checksum are
those the run started with, and continues at ``n_done`` with the same batch boundaries, so it
computes exactly the rows an uninterrupted run computes.

Throughput: one float32 GEMM per batch projects the features (`engine.search.project`), the
atlas index is searched with the whole batch, and the rows go in with one ``executemany``; on a
100k-concept Flat atlas the search is nearly all of the time (benchmarks/bench_labelling.py).
"""

from __future__ import annotations

import os
import re
import socket

from engine.align.map import AlignmentMap
from engine.errors import AtlasError, NotFoundError, SourceChangedError
from engine.labelling.sources import FeatureSource, open_feature_source
from engine.progress import progress
from engine.search import project
from engine.store.runs import LabellingRun, RunConflictError
from engine.store.store import Store
from engine.util import MAX_NAME, check_k

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_K", "LabellingRun", "RunConflictError", "SourceChangedError", "check_source_site",
    "create_run", "default_run_name", "label_features", "run_labelling",
]

DEFAULT_K = 5
DEFAULT_BATCH = 4096  # features per transaction: a few seconds of search on a 100k atlas


# ---------------------------------------------------------------------- runs


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
    check_k(k)
    if batch_size < 1:
        raise AtlasError(f"--batch must be >= 1, got {batch_size}")
    amap = store.load_map(map_name)
    source = open_feature_source(features, key=key, store=store, amap=amap)
    check_source_site(store, amap, source, site_check)
    n_concepts = store.atlas(amap.atlas).n_concepts
    run = store.add_run(
        name or default_run_name(map_name, source.spec, k), map_name, feature_source=source.spec,
        fingerprint=source.fingerprint, n_features=source.n_features, k=min(k, n_concepts), batch_size=batch_size,
        params={"source_kind": source.kind, "site_check": site_check, "k_requested": k}, overwrite=overwrite,
    )
    return run, source


def check_source_site(store: Store, amap: AlignmentMap, source: FeatureSource, site_check: bool = True) -> None:
    """Width always; model, layer and hook where the source records them (and ``site_check``)."""
    model = source.model
    if model is not None:
        known: set[str | None] = {amap.subject_model}
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


def run_labelling(store: Store, name: str, *, quiet: bool = False, max_batches: int | None = None,
                  _source: FeatureSource | None = None) -> LabellingRun:
    """Carry out a run from ``n_done`` to the end (or for ``max_batches`` batches).

    Each batch is projected, searched and committed together with the advance of ``n_done``.
    Ctrl-C leaves the run ``interrupted``, an error ``failed`` (with its message); both resume.
    """
    run = store.run(name)
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
    run_id, atlas_id, vec_sha = store._run_keys(name)
    if vec_sha != run.params.get("atlas_vector_sha256"):
        raise SourceChangedError(f"atlas {run.atlas!r} was re-imported since run {name!r} started")
    concept_ids = store._concept_ids(atlas_id)  # ordinal -> concepts.id
    index = store.index(run.atlas)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    store._set_status(run_id, "running", error=None, params={**run.params, "worker": me})

    n, bs, k, done = run.n_features, run.batch_size, run.k, run.n_done
    bar = progress(total=n, initial=done, desc=f"labelling {name}", unit="feat", quiet=quiet)
    batches = 0
    try:
        while done < n and (max_batches is None or batches < max_batches):
            hi = min(n, done + bs)
            scores, ids = index.search(project(amap, source.vectors[done:hi]), k)  # (b, k) each
            store._commit_batch(run_id, done, hi, ids, scores, concept_ids, n)
            bar.update(hi - done)
            done, batches = hi, batches + 1
    except KeyboardInterrupt:
        store._set_status(run_id, "interrupted")
        raise
    except RunConflictError:
        raise  # the other worker owns the run's status
    except BaseException as e:
        store._set_status(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    if done < n:
        store._set_status(run_id, "interrupted")
    return store.run(name)
