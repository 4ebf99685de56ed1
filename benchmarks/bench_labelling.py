"""Labelling throughput: a whole `label_features` run against the bare FAISS search inside it.

Setup (not timed): a store with a 100,000-concept atlas (d=768, Flat), a map from a d=512
subject site (a random semi-orthogonal matrix: the map's values do not change the cost), and
100,000 subject features in a ``.npy``. Then, timed:

- ``bare``: the engine's atlas index searching the already projected, unit-norm queries, in the
  run's batch size: the floor any labelling run has to pay;
- ``labelling``: `engine.labelling.run.label_features` end to end from a freshly opened store:
  load and check the map, read and fingerprint the features, load and verify the index, project
  (one GEMM per batch), search, and commit every batch's rows with the run's progress.

The target is ``labelling / bare <= 1.3``: projection and database writes must not dominate.

The labelling moonshot (issue 14, part 3) is this benchmark with ``--structured`` (an SAE-like
atlas and subject features that are mapped atlas directions perturbed to cosine 0.9 plus fresh
sparse combinations, never uniform noise: `bench_ann_scale.sae_like`), an ANN ``--spec`` and
``-k 10``: the index build (the atlas's one-time cost) is timed separately with its RAM, the run
is timed from its start to its last commit, and recall@10 is measured on ``--recall-sample``
features of the run against exact search. ``--sweep`` first tries search parameters on
validation features (another seed), so the spec's parameter is chosen on features the report
does not use::

    python benchmarks/bench_labelling.py --structured --concepts 1000000 --features 1000000 -k 10 \
        --no-bare --batch 65536 --spec "HNSW32|efSearch=128" --sweep 64,128,256

At 1M the atlas's index is built once (an HNSW32 build took 683 s on two shared cores) by
`bench_import_scale.py --keep`, which reports its build time and RAM; ``--store``/``--atlas`` then
label against that atlas (its SAE-like base is regenerated from the same seed)::

    python benchmarks/bench_import_scale.py --n 1000000 --spec HNSW32 --work /tmp/big1m --keep
    python benchmarks/bench_labelling.py --structured --store /tmp/big1m/store --atlas big \
        --features 1000000 -k 10 --no-bare --batch 65536 --sweep 256,512 --recall-sample 2000

``bare`` is timed before and after the run and averaged, because the machine is shared; the run
is also split from inside (time in the index's search vs the rest), two figures taken in one
time window and so under the same load.

    python benchmarks/bench_labelling.py                       # the full 100k x 100k run
    python benchmarks/bench_labelling.py --features 10000 --concepts 10000   # quick check
    python benchmarks/bench_labelling.py --features 10000 --concepts 10000 --criterion csls  # its cost vs nn

A comma list of criteria (``--criterion nn,csls``) times whole runs of each on the same store,
alternated ``--reps`` times (nn, csls, nn, csls, ...) so each pair sees the same machine load, and
reports per criterion the median wall and CPU seconds and each later criterion's median ratio to
the first (pair by pair; issue 25's target: csls within 1.5x of nn)::

    python benchmarks/bench_labelling.py --features 20000 --concepts 20000 --criterion nn,csls,isf --reps 5 --no-bare
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ann_scale import HARD_BASE, perturb, recall_at, sae_hard, sae_like  # noqa: E402

import indexes  # noqa: E402
from engine.align.map import AlignmentMap, save_map  # noqa: E402
from engine.labelling import run as labelling  # noqa: E402
from engine.search import project  # noqa: E402
from engine.store.store import AtlasSource, IndexPlacement, Store  # noqa: E402
from engine.util import unit_rows  # noqa: E402
from indexes.exact import topk_inner_product  # noqa: E402

Fresh = Callable[[int, np.random.Generator], np.ndarray]  # m fresh unit directions of the atlas's process


def structured_atlas(path: Path, n: int, d: int, rng: np.random.Generator, generator: str = "structured",
                     chunk: int = 50_000) -> Fresh:
    """Atlas directions of ``generator`` (`bench_ann_scale.generate`: ``structured``, SAE-like over
    4,096 atoms; ``hard``, `bench_ann_scale.sae_hard` with heavy-tailed norms) written to a ``.npy``
    a chunk at a time; returns the process's fresh directions."""
    base = rng.normal(size=(4096, d)).astype(np.float32)
    if generator == "hard":
        base = unit_rows(rng.normal(size=(HARD_BASE, d)).astype(np.float32))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        out[lo : lo + m] = sae_hard(m, base, rng) if generator == "hard" else sae_like(m, base, 3, 0.3, rng)
    out.flush()
    if generator == "hard":
        return lambda m, r: unit_rows(sae_hard(m, base, r))
    return lambda m, r: sae_like(m, base, 3, 0.3, r)


def structured_features(atlas: np.ndarray, fresh: Fresh, w: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Subject features: half mapped atlas directions perturbed to cosine 0.9, half fresh sparse
    combinations, taken into the subject space through the map's transpose (d_subject)."""
    rng = np.random.default_rng(1000 + seed)
    n_pert = n // 2
    rows = np.sort(rng.choice(len(atlas), n_pert, replace=False))
    a = np.concatenate([perturb(unit_rows(np.asarray(atlas[rows])), 0.9, rng), fresh(n - n_pert, rng)])
    return (a @ w.T).astype(np.float32)  # (n, d_subject): x ↦ x @ w takes them back to the atlas


def exact_top(atlas_unit_rows, queries: np.ndarray, k: int) -> np.ndarray:
    return topk_inner_product(queries, atlas_unit_rows, k)[1]


class SearchClock:
    """Wall time spent inside the index's search during the run (the rest is the run's own work)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.params: dict[str, int] = {}  # search parameters set on the index before each search
        self._real = indexes.FaissIndex.search

    def __enter__(self) -> SearchClock:
        clock, real = self, self._real

        def timed(index, queries, k):
            if clock.params:
                import faiss

                for name, value in clock.params.items():
                    faiss.ParameterSpace().set_index_parameter(index._index, name, value)
            t0 = time.perf_counter()
            try:
                return real(index, queries, k)
            finally:
                clock.seconds += time.perf_counter() - t0

        indexes.FaissIndex.search = timed
        return self

    def __exit__(self, *exc) -> None:
        indexes.FaissIndex.search = self._real


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def index_file_gb(store: Store, atlas: str) -> float:
    return (store.path / store.atlas_files(atlas)["index"]).stat().st_size / 2**30


def bare_search(index, queries: np.ndarray, k: int, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(queries), batch):
        index.search(queries[lo : lo + batch], k)
    return time.perf_counter() - t0


def compare_criteria(store_dir: Path, map_name: str, features: Path, criteria: list[str], args) -> None:
    """Whole runs under each criterion, alternated ``args.reps`` times on one store: medians and
    each criterion's median ratio to the first, pair by pair (the same machine load in each pair)."""
    import statistics

    wall: dict[str, list[float]] = {c: [] for c in criteria}
    cpu: dict[str, list[float]] = {c: [] for c in criteria}
    for rep in range(args.reps):
        for c in criteria:
            t0, c0 = time.perf_counter(), time.process_time()
            with Store.open(store_dir) as fresh:
                run = labelling.label_features(fresh, map_name, str(features), k=args.k, batch_size=args.batch,
                                               name=f"cmp-{c}-{rep}", quiet=True, criterion=c)
                assert run.status == "done" and run.n_done == args.features
            wall[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)
            print(f"rep {rep} {c}: {wall[c][-1]:.2f}s wall, {cpu[c][-1]:.2f}s CPU", flush=True)
            with Store.open(store_dir) as fresh:
                fresh.remove_run(run.name)
    base = criteria[0]
    out = {"features": args.features, "concepts": args.concepts, "d_subject": args.d_subject,
           "d_atlas": args.d_atlas, "k": args.k, "batch": args.batch, "spec": args.spec, "reps": args.reps,
           "wall_s": {c: wall[c] for c in criteria}, "cpu_s": {c: cpu[c] for c in criteria},
           "median_wall_s": {c: statistics.median(wall[c]) for c in criteria},
           "median_cpu_s": {c: statistics.median(cpu[c]) for c in criteria},
           "ratio_to_" + base: {c: {"wall": statistics.median([a / b for a, b in zip(wall[c], wall[base])]),
                                    "cpu": statistics.median([a / b for a, b in zip(cpu[c], cpu[base])])}
                                for c in criteria[1:]}}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--concepts", type=int, default=100_000)
    ap.add_argument("--d-subject", type=int, default=512)
    ap.add_argument("--d-atlas", type=int, default=768)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=labelling.DEFAULT_BATCH)
    ap.add_argument("--spec", default="Flat", help="index spec of the atlas (an ANN spec for the moonshot)")
    ap.add_argument("--structured", action="store_true", help="SAE-like atlas and features (see the doc)")
    ap.add_argument("--generator", choices=["structured", "hard"], help="the structured atlas's generator "
                    "(implies --structured; hard: bench_ann_scale.sae_hard, which k-means lists cannot align with)")
    ap.add_argument("--recall-sample", type=int, default=2000, help="features whose labels are checked "
                    "against exact search (recall@k)")
    ap.add_argument("--no-bare", action="store_true", help="skip the two bare searches (the moonshot: at 1M "
                    "each costs as much as the run)")
    ap.add_argument("--sweep", default="", help="efSearch / nprobe values tried on validation features first")
    ap.add_argument("--store", type=Path, help="label against an atlas already in this store (built by "
                    "bench_import_scale.py --keep) instead of importing one")
    ap.add_argument("--atlas", default="big", help="the atlas in --store")
    ap.add_argument("--ef", type=int, help="the efSearch / nprobe of the run (default: with --sweep, the smallest "
                    "swept value reaching --target-recall on the validation features; else the spec's own)")
    ap.add_argument("--target-recall", type=float, default=0.95, help="what --sweep chooses for")
    ap.add_argument("--criterion", default="nn",
                    help="the run's criterion: nn, csls or isf (csls/isf: the atlas-side statistic's pre-pass, "
                         "then a re-rank), or a comma list of them to compare (see the doc)")
    ap.add_argument("--reps", type=int, default=3, help="with a list of criteria: alternated runs of each")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    criteria = [c.strip() for c in args.criterion.split(",") if c.strip()]
    if not criteria or any(c not in ("nn", "csls", "isf") for c in criteria):
        ap.error(f"--criterion: nn, csls, isf or a comma list of them, got {args.criterion!r}")
    args.criterion = criteria[0]
    if args.generator:
        args.structured = True
    elif args.structured:
        args.generator = "structured"
    if args.store and args.generator == "hard":
        ap.error("--generator hard builds its own atlas (no --store)")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-labelling-") as tmp:
        root = Path(tmp)
        q, _ = np.linalg.qr(rng.normal(size=(args.d_atlas, args.d_subject)))  # (d_atlas, d_subject)
        w = q.T.astype(np.float32)  # (d_subject, d_atlas), orthonormal rows
        tag = f"{int(time.time())}"  # names of this run's model, map and label run in a kept store
        if args.store:
            store_dir, atlas_name = args.store, args.atlas
            store = Store.open(store_dir)
            atlas = store.atlas_vectors(atlas_name)  # a memory map; SAE-like rows are unit already
            args.concepts, args.d_atlas = atlas.shape
            args.spec = store.atlas(atlas_name).index_spec
            # bench_import_scale.write_matrix's base: the first draw of default_rng(0)
            base = np.random.default_rng(0).normal(size=(4096, args.d_atlas)).astype(np.float32)
            fresh_dirs: Fresh = lambda m, r: sae_like(m, base, 3, 0.3, r)  # noqa: E731
            if w.shape[1] != args.d_atlas:  # the atlas's width, not --d-atlas
                q, _ = np.linalg.qr(rng.normal(size=(args.d_atlas, args.d_subject)))
                w = q.T.astype(np.float32)
            t_build = build_rss = float("nan")
            index_gb = index_file_gb(store, atlas_name)
            print(f"atlas {args.concepts}x{args.d_atlas} {args.spec} from {store_dir}: index file {index_gb:.2f} GB "
                  "(its build: bench_import_scale.py)", flush=True)
        else:
            store_dir, atlas_name = root / "store", "atlas"
            store = Store.init(store_dir)
            if args.structured:
                fresh_dirs = structured_atlas(root / "atlas.npy", args.concepts, args.d_atlas, rng, args.generator)
                atlas = np.load(root / "atlas.npy", mmap_mode="r")
            else:
                atlas = rng.normal(size=(args.concepts, args.d_atlas)).astype(np.float32)
            t0 = time.perf_counter()
            store.add_atlas(
                atlas_name, atlas, [f"concept {i}" for i in range(args.concepts)],
                source=AtlasSource(model="foundation", layer=12), index=IndexPlacement(spec=args.spec),
            )
            t_build = time.perf_counter() - t0
            build_rss = peak_rss_gb()
            index_gb = index_file_gb(store, atlas_name)
            print(f"atlas {args.concepts}x{args.d_atlas} {args.spec}: imported and indexed in {t_build:.0f}s, "
                  f"peak RSS {build_rss:.2f} GB, index file {index_gb:.2f} GB", flush=True)
        t0 = time.perf_counter()
        subject, map_name, run_name = f"subject-{tag}", f"map-{tag}", f"bench-{tag}"
        store.add_model(subject, d_model=args.d_subject)
        amap = AlignmentMap(w, w.T, np.zeros(args.d_subject), np.zeros(args.d_atlas), "procrustes",
                            subject_model=subject, subject_layer=20, atlas=atlas_name)
        save_map(store, amap, map_name)
        if args.structured:
            feats = structured_features(atlas, fresh_dirs, w, args.features, seed=2)
            val = structured_features(atlas, fresh_dirs, w, min(args.recall_sample, args.features), seed=1)
        else:
            feats = rng.normal(size=(args.features, args.d_subject)).astype(np.float32)
            val = None
        np.save(root / "features.npy", feats)
        t_setup = time.perf_counter() - t0
        print(f"setup {t_setup:.0f}s: map, {args.features} features d={args.d_subject}", flush=True)
        atlas_unit = None
        if args.recall_sample:  # exact search's rows: unit already when SAE-like (no 3 GB copy at 1M)
            unit_already = args.structured and args.generator != "hard"
            atlas_unit = atlas if unit_already else store.atlas_vectors(atlas_name, normalized=True)

        swept = []
        if args.sweep and val is not None and atlas_unit is not None:
            import faiss

            vq = project(amap, val)
            exact_v = exact_top(atlas_unit, vq, args.k)
            vindex = store.index(atlas_name)
            name = "efSearch" if "HNSW" in args.spec else "nprobe"
            for value in [int(v) for v in args.sweep.split(",")]:
                faiss.ParameterSpace().set_index_parameter(vindex._index, name, value)
                t0 = time.perf_counter()
                got = vindex.search(vq, args.k)[1]
                dt = time.perf_counter() - t0
                swept.append({name: value, f"recall_at_{args.k}": recall_at(got, exact_v), "qps": len(vq) / dt})
                print(f"validation {name}={value}: {swept[-1]}", flush=True)
            vindex._apply_search_params()  # the spec's own parameter for the run
            if args.ef is None:  # chosen on the validation features, never on the run's
                key = f"recall_at_{args.k}"
                good = [r[name] for r in swept if r[key] >= args.target_recall]
                args.ef = min(good) if good else max(r[name] for r in swept)
                print(f"chosen on validation: {name}={args.ef}", flush=True)

        index = store.index(atlas_name)
        queries = np.concatenate([project(amap, feats[lo : lo + args.batch])
                                  for lo in range(0, args.features, args.batch)])
        t_bare_1 = float("nan") if args.no_bare else bare_search(index, queries, args.k, args.batch)
        print(f"bare search: {t_bare_1:.1f}s", flush=True)
        store.close()
        if len(criteria) > 1:
            compare_criteria(store_dir, map_name, root / "features.npy", criteria, args)
            return

        t0, c0 = time.perf_counter(), time.process_time()
        with SearchClock() as clock, Store.open(store_dir) as fresh:
            if args.ef:  # the value chosen on validation features, for the index the run opens
                clock.params = {"efSearch" if "HNSW" in args.spec else "nprobe": args.ef}
            run = labelling.label_features(fresh, map_name, str(root / "features.npy"), k=args.k,
                                           batch_size=args.batch, name=run_name, quiet=True,
                                           criterion=args.criterion)
            assert run.status == "done" and run.n_done == args.features
            t_label, cpu_label = time.perf_counter() - t0, time.process_time() - c0
            n_rows = fresh.count_run_labels(run_name)
            recall = None
            if args.recall_sample and atlas_unit is not None:
                pick = np.sort(np.random.default_rng(3).choice(args.features, min(args.recall_sample,
                                                                                  args.features), replace=False))
                got = np.full((len(pick), args.k), -1, dtype=np.int64)
                for i, f in enumerate(pick.tolist()):  # (feature, rank, score, ordinal, label, labelled)
                    rows = sorted(fresh.run_label_rows(run_name, f, f + 1), key=lambda r: r[1])[: args.k]
                    got[i, : len(rows)] = [r[3] for r in rows]
                recall = recall_at(got, exact_top(atlas_unit, queries[pick], args.k))
        print(f"labelling end to end: {t_label:.1f}s ({n_rows} rows), recall@{args.k} {recall}", flush=True)

        t_bare_2 = float("nan") if args.no_bare else bare_search(index, queries, args.k, args.batch)
        print(f"bare search again: {t_bare_2:.1f}s", flush=True)
        t0 = time.perf_counter()
        for lo in range(0, args.features, args.batch):
            project(amap, feats[lo : lo + args.batch])
        t_project = time.perf_counter() - t0

    t_bare = (t_bare_1 + t_bare_2) / 2
    print(f"search inside the run: {clock.seconds:.1f}s, the rest: {t_label - clock.seconds:.1f}s", flush=True)
    out = {
        "features": args.features, "concepts": args.concepts, "d_subject": args.d_subject,
        "d_atlas": args.d_atlas, "k": args.k, "batch": args.batch, "rows": n_rows, "criterion": args.criterion,
        "bare_search_s": t_bare, "bare_search_runs_s": [t_bare_1, t_bare_2], "labelling_s": t_label,
        "ratio": t_label / t_bare, "projection_s": t_project,
        # the same run seen from inside, one time window: search vs everything else
        "search_in_run_s": clock.seconds, "rest_of_run_s": t_label - clock.seconds,
        "ratio_in_run": t_label / clock.seconds, "labelling_cpu_s": cpu_label,
        "features_per_s": args.features / t_label,
        "spec": args.spec, "run_search_param": args.ef, "store": str(args.store) if args.store else None,
        "structured": args.structured, "generator": args.generator, f"recall_at_{args.k}": recall,
        "recall_sample": args.recall_sample, "validation_sweep": swept,
        "index_build_s": t_build, "index_build_peak_rss_gb": build_rss, "index_file_gb": index_gb,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
