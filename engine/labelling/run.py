"""Bulk labelling: many subject features through one map, top-k atlas concepts each, in the DB.

Why a run can be killed at any point and resumed exactly: features are processed in batches of a
fixed size from feature 0, and each batch's rows are inserted *in the same transaction* that
advances the run's ``n_done`` (guarded by ``n_done`` still being the batch's start, so two
processes on one run cannot both advance it; see `engine.store.runs`, which owns the run's rows
and that transaction). A kill leaves a committed prefix ``[0, n_done)`` with every row of it and
none after; resume re-reads the source, checks that its fingerprint and the map's checksum are
those the run started with, and continues at ``n_done`` with the same batch boundaries, so it
computes exactly the rows an uninterrupted run computes.

On Ray (``run_labelling(..., ray=RayConfig(...))``, docs/design.md §9) tasks compute the rows of a
few batches each with `label_batch`, the function the loop here uses, and write nothing; this
process commits them in order through the same guarded commit, so the guarantees above hold as
they are and a retried task never writes a row twice.

Throughput: one float32 GEMM per batch projects the features (`engine.search.project`), the
atlas index is searched with the whole batch, and the rows go in with one ``executemany``; on a
100k-concept Flat atlas the search is nearly all of the time (benchmarks/bench_labelling.py).

Criteria (`engine.labelling.criteria`): ``nn`` ranks by cosine, as the index returns it. ``csls``
and ``isf`` need one statistic per atlas concept over *all* the run's features, so the run first
streams every batch through `project` into `AtlasSideStats` (O(n_atlas · csls_k) memory), which
from the same exact matrix products also gives each feature's `candidate_k` nearest concepts by
cosine (O(n_features · k') memory). Both are saved as files of the store (`Store.save_run_file`,
their sha256 in ``params["files"]``: ``stat`` and ``cand``) *before the first batch commits*; each
batch then re-ranks its recorded candidates (`rerank`) without searching again, so a csls run
costs one exact search, as an nn run does. A resumed run reads the recorded files back (never
recomputes them), so its rows are those of an uninterrupted run. (A run recorded before the
candidates file searches the index for its candidates, as it did then.)

Confidence (`engine.labelling.confidence`): every feature's rank-1 row gets the probability that
its first hit is right, from `label_signals` of the cosine candidates (score, margin; CSLS gap and
mutual nearest neighbour where the run has the atlas-side statistic) through a `ConfidenceModel`:
the one shipped in ``confidence_default.json`` (fitted on development worlds, see its meta) or one
given; the model is recorded in the run's params, so a resume scores with the same numbers. An
``nn`` run computes no atlas-side statistic (its speed is unchanged), so its confidence reads the
score and margin only (the ``map.nn`` model); ``csls`` / ``isf`` runs use all four signals.

Activation matching (``match="activations"``, `engine.labelling.matching`): the run's candidates
are the subject SAE latents' best-correlated atlas features over a corpus both models read, not
the index's cosines; the co-activation pass is saved as the run's files before its first batch
commits, and everything after (criteria, confidence, commits, resume, Ray) is the same.

Labelled concepts only (``labelled_only``): a run ranks only the atlas concepts that carry a label.
The ordinals it ranks are saved as its file (``labelled``) before the first batch commits, so a
relabelled atlas does not change a resumed run's rows; an activation run reads those columns of
its correlation table, a map run streams its features first (as csls / isf do) through an exact
search of those concepts' vectors, whose candidates and statistic it records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import socket
from collections.abc import Generator, Iterable
from typing import Any

import numpy as np

from engine.align.map import AlignmentMap, load_map
from engine.distributed.ray_exec import RayConfig, StoreLocation, cluster_cpus, map_ordered, ray_session
from engine.errors import SourceChangedError
from engine.labelling.confidence import ConfidenceModel
from engine.labelling.criteria import (
    CANDIDATE_FILE,
    DEFAULT_CRITERION,
    DEFAULT_CSLS_K,
    DEFAULT_ISF_BETA,
    STAT_FILE,
    AtlasSideStats,
    AtlasStat,
)
from engine.labelling.request import (
    DEFAULT_BATCH,
    DEFAULT_K,
    LabelRequest,
    PreparedRun,
    Ranking,
    check_source_site,
    create_run,
    default_confidence,
    default_run_name,
    prepare_run,
)
from engine.labelling.sources import FeatureSource, open_feature_source, source_plugins
from engine.progress import progress
from engine.search import project
from engine.store.runs import LabellingRun, LabelPass, RunConflictError
from engine.store.store import Store
from engine.util import failpoint
from indexes.base import VectorIndex
from indexes.faiss_backend import search_threads, set_search_threads

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_K", "LabelRequest", "LabellingRun", "PreparedRun", "Ranking", "RunConflictError", "SourceChangedError",
    "check_source_site", "create_run", "default_confidence", "default_run_name", "label_batch", "label_features",
    "label_shard", "prepare_run", "run_labelling",
]

LABELLED_FILE = "labelled"  # the kind of a labelled_only run's file: the ordinals of the concepts it ranks
RAY_SHARD_BATCHES = 8  # batches per Ray task at most: a killed worker recomputes that much


def label_features(store: Store, map_name: str, features: str, *, quiet: bool = False,
                   ray: RayConfig | None = None, **options: Any) -> LabellingRun:
    """Create a run of ``LabelRequest(map_name, features, **options)`` and carry it out to the end
    (see `prepare_run` and `run_labelling`)."""
    prepared = prepare_run(store, LabelRequest(map_name, features, **options))
    return run_labelling(store, prepared.run.name, quiet=quiet, ray=ray, prepared=prepared)


def label_batch(amap: AlignmentMap, index: VectorIndex, vectors: np.ndarray, k: int, ranking: Ranking | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The label rows of one batch of features: scores and atlas ordinals of the top ``k``
    concepts of each, (b, k) each (-1 where an ANN index returned fewer), and each feature's
    confidence (None without a model). ``ranking``: plain nearest neighbour, no confidence, if None."""
    ranking = ranking or Ranking()
    cand_s, cand_i = index.search(project(amap, vectors), ranking.candidates(k, index.count()))
    return ranking.rank(cand_s, cand_i, k)


@dataclasses.dataclass
class _RunInputs:
    """What a run's batches are computed from, checked against what the run started with."""

    amap: AlignmentMap
    source: FeatureSource
    index: VectorIndex
    job: LabelPass
    ranking: Ranking
    coact: Any = None  # an activation run's CoactivationStats (None: a map run, or before its pass)
    # a csls / isf run's recorded candidates (scores (n, k') float32, ordinals (n, k')); None: search the index
    cands: tuple[np.ndarray, np.ndarray] | None = None
    columns: np.ndarray | None = None  # a labelled_only run's recorded concept ordinals (None: all concepts)


def _open_inputs(store: Store, run: LabellingRun, prepared: PreparedRun | None = None) -> _RunInputs:
    """The map, features, index and pass of a run, each checked against what the run started with
    (the map and features of ``prepared`` where the run was just created: each is loaded once)."""
    name = run.name
    if store.map_info(run.map).sha256 != run.params.get("map_sha256"):
        raise SourceChangedError(
            f"map {run.map!r} was refitted since run {name!r} started; its labels would mix two maps. "
            f"Start a new run (`atlas label {run.map} --features ... --overwrite --name {name}`)"
        )
    if prepared is not None and prepared.run.name == name:
        amap, source = prepared.amap, prepared.source
    else:
        amap = load_map(store, run.map)
        source = open_feature_source(run.feature_source, store=store, amap=amap)
    if source.fingerprint != run.fingerprint or source.n_features != run.n_features:
        raise SourceChangedError(
            f"the features of run {name!r} ({run.feature_source}) changed since it started "
            f"({source.n_features} features, fingerprint {source.fingerprint[:12]}, was {run.n_features}, "
            f"{run.fingerprint[:12]}); restore them, or start a new run with --overwrite"
        )
    job = store.label_pass(name)
    if job.atlas_vector_sha256 != run.params.get("atlas_vector_sha256"):
        raise SourceChangedError(f"atlas {run.atlas!r} was re-imported since run {name!r} started")
    recorded = run.params.get("index")  # runs created before the index was recorded carry none
    if recorded is not None and store.index_identity(run.atlas) != recorded:
        raise SourceChangedError(
            f"the index of atlas {run.atlas!r} was rebuilt since run {name!r} started (it was {recorded['spec']}); "
            f"its labels would mix two indexes' answers. Rebuild it as it was, or start a new run with --overwrite")
    coact = None
    if run.params.get("method") == "activations":
        from engine.labelling.matching import load_pass

        coact = load_pass(store, name)
    data = store.read_run_file(name, CANDIDATE_FILE)
    cands = None
    if data is not None:
        with np.load(io.BytesIO(data)) as z:
            cands = (z["scores"], z["ids"])
    data = store.read_run_file(name, LABELLED_FILE)
    columns = None
    if data is not None:
        with np.load(io.BytesIO(data)) as z:
            columns = z["ordinals"]
    return _RunInputs(amap, source, store.index(run.atlas), job, recorded_ranking(store, run), coact, cands, columns)


def recorded_ranking(store: Store, run: LabellingRun) -> Ranking:
    """The ranking a run recorded: its criterion, its statistic file (read back and checked against
    its sha256; None until the driver saved it) and its confidence model."""
    p = run.params
    conf = p.get("confidence")
    data = store.read_run_file(run.name, STAT_FILE)
    stat = None if data is None else AtlasStat.load(io.BytesIO(data))
    return Ranking(p.get("criterion", DEFAULT_CRITERION), int(p.get("csls_k", DEFAULT_CSLS_K)), stat,
                   None if not conf else ConfidenceModel.from_json(json.dumps(conf)))


def _needs_stat(run: LabellingRun, ranking: Ranking) -> bool:
    """Whether a map run streams its features first: csls / isf (the statistic), or a
    ``labelled_only`` run (its candidates come from an exact search of the labelled concepts)."""
    return ranking.criterion != "nn" or _labelled_only(run)


def _labelled_only(run: LabellingRun) -> bool:
    return bool(run.params.get("labelled_only"))


def _save_columns(store: Store, run: LabellingRun) -> dict[str, dict[str, str]]:
    """A ``labelled_only`` run's concepts (the atlas's labelled ordinals now) saved as its file."""
    if not _labelled_only(run):
        return {}
    ordinals = np.asarray([c.ordinal for c in store.concepts(run.atlas) if c.labelled], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, ordinals=ordinals)
    return {LABELLED_FILE: store.save_run_file(run.name, LABELLED_FILE, buf.getvalue())}


def _columns(store: Store, files: dict[str, dict[str, str]]) -> np.ndarray | None:
    rec = files.get(LABELLED_FILE)
    if rec is None:
        return None
    with np.load(io.BytesIO((store.path / rec["file"]).read_bytes())) as z:
        return np.asarray(z["ordinals"])


def _activations(run: LabellingRun) -> bool:
    return run.params.get("method") == "activations"


def _save_coactivation(store: Store, run: LabellingRun, inputs: _RunInputs, quiet: bool) -> dict[str, Any]:
    """The co-activation pass of an activation run and its atlas-side statistic, saved as the run's
    files; returns the run's params with their records (recorded before the first batch commits)."""
    from engine.labelling.matching import coactivation_pass, save_pass

    stats = coactivation_pass(store, run.params, inputs.amap, inputs.source, quiet=quiet)
    if stats.n_x != run.n_features:
        raise SourceChangedError(f"the SAE's encoder has {stats.n_x} latents, its decoder {run.n_features}")
    files = {**save_pass(store, run.name, stats, inputs.ranking.csls_k), **_save_columns(store, run)}
    failpoint("label.stat_saved")
    return {**run.params, "files": {**(run.params.get("files") or {}), **files}}


def _save_stat(store: Store, run: LabellingRun, inputs: _RunInputs, quiet: bool) -> dict[str, Any]:
    """The pre-pass of a csls / isf run: every batch of its features through `project` into the
    atlas-side statistic, which also yields each feature's cosine candidates from the same
    products; both saved as the run's files. Returns the run's params with their records. Runs in
    the driver before the first batch commits (a worker only reads them back)."""
    atlas = np.asarray(store.atlas_vectors(run.atlas, normalized=True))
    files = _save_columns(store, run)
    cols = _columns(store, files)  # labelled_only: an exact search of those concepts, ordinals mapped back
    acc = AtlasSideStats(atlas if cols is None else atlas[cols], k=inputs.ranking.csls_k, beta=DEFAULT_ISF_BETA,
                         log_partition=inputs.ranking.criterion == "isf")
    kc = inputs.ranking.candidates(run.k, len(atlas) if cols is None else len(cols))
    cand_s = np.empty((run.n_features, kc), dtype=np.float32)
    cand_i = np.empty((run.n_features, kc), dtype=np.int32 if len(atlas) < 2**31 else np.int64)
    bar = progress(total=run.n_features, desc=f"statistic {run.name}", unit="feat", quiet=quiet)
    try:
        for lo, hi in inputs.job.steps(start=0):
            cand_s[lo:hi], ids = acc.update(project(inputs.amap, inputs.source.vectors[lo:hi]), kc)
            cand_i[lo:hi] = ids if cols is None else np.where(ids >= 0, cols[np.maximum(ids, 0)], -1)
            bar.update(hi - lo)
    finally:
        bar.close()
    buf = io.BytesIO()
    stat = AtlasStat.of(acc)
    (stat if cols is None else stat.scattered(cols, len(atlas))).save(buf)
    files[STAT_FILE] = store.save_run_file(run.name, STAT_FILE, buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, scores=cand_s, ids=cand_i)
    files[CANDIDATE_FILE] = store.save_run_file(run.name, CANDIDATE_FILE, buf.getvalue())
    failpoint("label.stat_saved")
    return {**run.params, "files": {**(run.params.get("files") or {}), **files}}


def run_labelling(store: Store, name: str, *, quiet: bool = False, max_batches: int | None = None,
                  ray: RayConfig | None = None, prepared: PreparedRun | None = None) -> LabellingRun:
    """Carry out a run from ``n_done`` to the end (or for ``max_batches`` batches).

    Each batch is projected, searched and committed together with the advance of ``n_done``.
    Ctrl-C leaves the run ``interrupted``, an error ``failed`` (with its message); both resume.
    With ``ray`` the batches are computed by Ray tasks (`label_shard`, several batches each) and
    committed here, in order, through the same guarded commit: the same rows, and a retried
    task never writes twice (tasks write nothing). ``prepared`` (`prepare_run`'s, for this run)
    saves loading the map and opening the features again.
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
    inputs = _open_inputs(store, run, prepared)
    job = inputs.job
    params = run.params
    if _activations(run):
        fresh = inputs.coact is None
        if fresh:
            params = _save_coactivation(store, run, inputs, quiet)  # recorded by `start`, before the first commit
    else:
        fresh = _needs_stat(run, inputs.ranking) and inputs.ranking.stat is None
        if fresh:
            params = _save_stat(store, run, inputs, quiet)
    job.start(params)
    if fresh:  # read back what a resume reads
        inputs = _open_inputs(store, store.run(name), prepared)
    stop = None if max_batches is None else run.n_done + max_batches * run.batch_size
    bar = progress(total=run.n_features, initial=run.n_done, desc=f"labelling {name}", unit="feat", quiet=quiet)
    try:
        with job.running():
            steps = list(job.steps(stop))
            batches = _batches_here(inputs, run.k, steps) if ray is None else _batches_on_ray(store, run, steps, ray)
            with contextlib.closing(batches):  # on an error too, Ray's session ends here, not when collected
                for lo, hi, scores, ids, conf in batches:
                    job.commit_batch(lo, hi, scores, ids, conf)
                    bar.update(hi - lo)
    finally:
        bar.close()
    return job.status()


# (lo, hi, scores (b, k), ordinals (b, k), confidence (b,) or None) of features [lo, hi)
Batch = tuple[int, int, np.ndarray, np.ndarray, "np.ndarray | None"]


def _batches_here(inputs: _RunInputs, k: int, steps: Iterable[tuple[int, int]]) -> Generator[Batch, None, None]:
    """The run's batches ``steps`` (``(lo, hi)`` each), computed in this process one at a time."""
    for lo, hi in steps:
        if inputs.coact is not None:  # activation matching: the latents' best correlations are the candidates
            n_y = inputs.coact.n_y if inputs.columns is None else len(inputs.columns)
            cand_s, cand_i = inputs.coact.top_matches(inputs.ranking.candidates(k, n_y), lo, hi,
                                                      columns=inputs.columns)
            scores, ids, conf = inputs.ranking.rank(cand_s, cand_i, k)
        elif inputs.cands is not None:  # csls / isf: the pre-pass's recorded cosine candidates
            scores, ids, conf = inputs.ranking.rank(inputs.cands[0][lo:hi], inputs.cands[1][lo:hi], k)
        else:
            scores, ids, conf = label_batch(inputs.amap, inputs.index, inputs.source.vectors[lo:hi], k, inputs.ranking)
        yield lo, hi, scores, ids, conf


def _batches_on_ray(store: Store, run: LabellingRun, steps: list[tuple[int, int]], config: RayConfig
                    ) -> Generator[Batch, None, None]:
    """The same batches, from Ray tasks of up to `RAY_SHARD_BATCHES` batches each, in order."""
    bs = run.batch_size
    lo, stop = (steps[0][0], steps[-1][1]) if steps else (run.n_done, run.n_done)
    where = StoreLocation.of(store)
    with ray_session(config) as r:
        cpus = cluster_cpus(r)
        n_batches = -(-(stop - lo) // bs)
        per = max(1, min(RAY_SHARD_BATCHES, -(-n_batches // cpus)))  # batches per task
        plugins, threads = source_plugins(), search_threads()
        shards = [(where, run.name, a, min(stop, a + per * bs), plugins, threads)
                  for a in range(lo, stop, per * bs)]
        for part in map_ordered(r, label_shard, shards, window=2 * cpus, max_retries=config.max_retries):
            yield from part


_STORES: dict[StoreLocation, Store] = {}  # a Ray worker's opened stores: its index stays loaded across tasks


def label_shard(where: StoreLocation, name: str, lo: int, hi: int, plugins: tuple[str, ...] = (),
                threads: int | None = None) -> list[Batch]:
    """One Ray task of a run: the label rows of features ``[lo, hi)`` in the run's batches.

    The worker imports the driver's feature-source ``plugins`` (`source_plugins`), searches with
    the driver's FAISS ``threads`` (the scores' last bits depend on the count: with it they are the
    in-process scores bit for bit), opens the store at ``where`` and checks the map, features and
    atlas against the run, as a resume does; it writes nothing (the driver commits).
    """
    for module in plugins:
        importlib.import_module(module)
    if threads is not None:
        set_search_threads(threads)
    store = _STORES.get(where)
    if store is None:
        store = _STORES[where] = where.open()
    run = store.run(name)
    inputs = _open_inputs(store, run)
    failpoint("label.shard")
    return list(_batches_here(inputs, run.k, inputs.job.steps(hi, start=lo)))
