"""Text lookup latency over a large atlas (issue: `atlas lookup` over 100,000 concepts < 50 ms/query).

Builds a store with N concepts whose labels and descriptions are drawn from a Zipf-distributed
vocabulary of content words (the Zipf ranks start at 100: the 100 most frequent ranks of real
text are function words, which lookup drops as stopwords), then times `lookup()` through the
public API on queries of 1-4 words: half drawn like labels (common words more often), half
uniformly from the vocabulary. A last line times the degenerate case of a one-word query whose
word is in a large share of all concepts.

With ``--pg-url`` the same atlas and queries run on SQLite (FTS5) and on PostgreSQL (tsvector +
GIN, migration 0008), one after the other, and a last table compares them. The URL names a server
and a user that may create databases: a throw-away database is created there and dropped after.

``--store DIR`` keeps the SQLite store in DIR and reuses it on the next run with the same ``--n``
(at 1M concepts the import takes minutes). ``--semantic`` also times lookups fused with the
semantic model, once per encoder of ``--encoders`` (the labels embedded with it first, as
`atlas index embed --encoder`: the sentence model takes tens of CPU-minutes at 1M, the static
encoder about a minute); ``--serve`` also times
the same queries through ``atlas serve`` (its own process, uvicorn on loopback; one keep-alive
client, one request at a time), against ``/api/lookup``.

``--after-write S`` times instead what a write costs the lookups of a warm process (`atlas serve`'s
case): in a child process per code (this code, then that of git revision ``--write-previous``), the
index built, the steady state timed, then one label edit, then lookups back to back for up to S
seconds until the score-bounded index is back, then the queries once more: the first lookup after the write, all
of those until the index is back (p50 / p95 / max), and the time until it is back. The edited label
is restored after.

``--oneshot R`` also times ``atlas show``, ``neighbors`` and ``lookup`` on the store as whole
processes (`/usr/bin/time`), R runs each, in turn with the same commands run by the code of git
revision ``--previous`` (extracted with ``git archive``), and prints the median wall and CPU seconds.

    python benchmarks/bench_lookup.py [--n 100000] [--queries 200]
    python benchmarks/bench_lookup.py --n 1000000 --store /tmp/lookup-1m --semantic --encoders static
    python benchmarks/bench_lookup.py --quality
    python benchmarks/bench_lookup.py --n 1000000 --store /tmp/lookup-1m --serve --oneshot 7
    python benchmarks/bench_lookup.py --n 1000000 --store /tmp/lookup-1m --after-write 300
    eval "$(.ci/postgres.sh start)"
    python benchmarks/bench_lookup.py --n 100000 --pg-url "$ATLAS_TEST_PG_URL"
    .ci/postgres.sh stop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    from engine.atlas import textindex_cache
except ImportError:  # code before textindex_cache was split out of textindex (an A/B run against it)
    from engine.atlas import textindex as textindex_cache  # type: ignore[no-redef]
from engine.atlas.lookup import ENCODERS, build_label_index, lookup
from engine.store.store import AtlasSource, Store
from indexes.policy import choose_label_index_spec

TARGET_P95_MS, TARGET_MAX_MS = 5.0, 20.0  # issue 26, at 1M concepts in a warm process


def make_labels(n: int, rng: np.random.Generator, vocab_size: int = 8000):
    syll = ["ra", "in", "to", "ne", "ma", "lo", "ti", "ce", "sa", "ve", "ko", "du", "pe", "li", "mo", "an"]
    vocab = sorted({"".join(rng.choice(syll, size=rng.integers(2, 5))) for _ in range(vocab_size * 2)})[:vocab_size]
    p = 1.0 / np.arange(101, len(vocab) + 101) ** 1.07
    p /= p.sum()

    vocab = np.array(vocab)
    words = vocab[rng.choice(len(vocab), size=(n, 20), p=p)]
    n_label, n_desc = rng.integers(2, 6, size=n), rng.integers(6, 16, size=n)
    labels = [" ".join(w[:a]) for w, a in zip(words, n_label)]
    descriptions = [" ".join(w[a : a + b]) for w, a, b in zip(words, n_label, n_desc)]
    return vocab, p, labels, descriptions


@contextlib.contextmanager
def scratch_database(server_url: str):
    """A new PostgreSQL database on the server of ``server_url`` (its URL), dropped on exit."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"atlas_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def prepared_store(root: Path, db_url: str | None, args, labels, descriptions) -> tuple[Store, float | None]:
    """The store at ``root`` with atlas ``big`` (``--n`` labelled concepts) and ``common`` (``--n``/2 concepts
    labelled "zzcommon": the degenerate case), built unless an earlier run left it; (store, import seconds
    of ``big``, None when reused)."""
    rng = np.random.default_rng(1)
    if (root / "atlas.db").is_file() and db_url is None:
        store = Store.open(root)
        if {a.name: a.n_concepts for a in store.atlases()} == {"big": args.n, "common": args.n // 2}:
            return store, None
        raise SystemExit(f"{root} holds another benchmark store; give another --store or remove it")
    store = Store.init(root, db_url=db_url)
    t0 = time.perf_counter()
    store.add_atlas(
        "big", rng.normal(size=(args.n, args.dim)).astype(np.float32), labels, descriptions,
        source=AtlasSource(model="bench", layer=0),
    )
    build = time.perf_counter() - t0
    extra = rng.normal(size=(args.n // 2, args.dim)).astype(np.float32)
    store.add_atlas("common", extra, ["zzcommon"] * (args.n // 2), source=AtlasSource(model="bench", layer=0))
    return store, build


def timed(fn: Callable[[str], int], queries: list[str]) -> tuple[np.ndarray, float, np.ndarray]:
    """Wall milliseconds of ``fn(q)`` for each query after one warm-up call, the mean number of hits, and
    the CPU milliseconds of this process (a server's own CPU is not in them)."""
    fn(queries[0])  # warm the connection, the page cache, a model
    times, cpu, n_hits = [], [], 0
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        n_hits += fn(q)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return np.array(times) * 1000, n_hits / len(queries), np.array(cpu) * 1000


def report(what: str, ms: np.ndarray, hits: float, cpu: np.ndarray | None = None) -> dict[str, float]:
    p95, worst = float(np.percentile(ms, 95)), float(ms.max())
    ok = "PASS" if p95 < TARGET_P95_MS and worst < TARGET_MAX_MS else "FAIL"
    print(f"{what:24} mean {ms.mean():6.2f}  p50 {np.median(ms):6.2f}  p95 {p95:6.2f}  max {worst:6.2f} ms "
          f"({hits:.1f} hits/query; target p95 < {TARGET_P95_MS:g}, max < {TARGET_MAX_MS:g}: {ok})", flush=True)
    if cpu is not None:
        print(f"{'':24} CPU p50 {np.median(cpu):6.2f}  p95 {np.percentile(cpu, 95):6.2f}  max {cpu.max():6.2f} ms",
              flush=True)
    return {f"{what} p50 ms": float(np.median(ms)), f"{what} p95 ms": p95, f"{what} max ms": worst}


def run(backend: str, db_url: str | None, args, labels, descriptions, queries) -> dict[str, float]:
    """Build (or reuse) the store on ``db_url`` (None: SQLite), time the queries; print as it goes."""
    with contextlib.ExitStack() as stack:
        if args.store is not None and db_url is None:
            root = args.store
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "store"
        store, build = prepared_store(root, db_url, args, labels, descriptions)
        stack.callback(store.close)
        print(f"[{backend}] {args.n:,} concepts (+ {args.n // 2:,} in 'common'), {len(queries)} queries, "
              + (f"import {build:.1f} s" if build is not None else f"store reused from {root}"), flush=True)
        t0 = time.perf_counter()
        if textindex_cache.current_index(store) is not None:
            print(f"score-bounded index built in {time.perf_counter() - t0:.1f} s", flush=True)
        out = report("bm25", *timed(lambda q: len(lookup(store, q, k=10, semantic=False)), queries))
        out |= report("bm25, FTS5 (previous)",
                      *timed(lambda q: len(lookup(store, q, k=10, semantic=False, indexed=False)), queries))
        same = sum(lookup(store, q, k=10, semantic=False) == lookup(store, q, k=10, semantic=False, indexed=False)
                   for q in queries)
        print(f"the same hits as FTS5's ranking for {same} of {len(queries)} queries", flush=True)
        for encoder in args.encoders if args.semantic else []:
            meta = store.atlas_record("big").extra.get("label_index") or {}
            spec = choose_label_index_spec(store.atlas_record("big").n_concepts)
            if not meta or meta.get("encoder", "sentence") != encoder or meta["spec"].split("|")[0] != spec:
                t0, c0 = time.perf_counter(), time.process_time()
                build_label_index(store, "big", quiet=True, encoder=encoder)
                meta = store.atlas_record("big").extra["label_index"]
                print(f"labels embedded ({encoder}) in {time.perf_counter() - t0:.0f} s, "
                      f"CPU {time.process_time() - c0:.0f} s", flush=True)
            print(f"label index: {encoder} encoder, {meta['spec']}, {meta['count']:,} labels"
                  + (f", recall@10 {meta['recall_at_10']} on held-out queries" if "recall_at_10" in meta else ""),
                  flush=True)
            out |= report(f"bm25 + {encoder}", *timed(lambda q: len(lookup(store, q, k=10, semantic=True)), queries))
            lookup_cache_clear()
            out |= report(f"bm25 + {encoder}, FTS5",
                          *timed(lambda q: len(lookup(store, q, k=10, semantic=True, indexed=False)), queries))
        worst = []
        for _ in range(10):
            t = time.perf_counter()
            lookup(store, "zzcommon", k=10, semantic=False)
            worst.append(time.perf_counter() - t)
        print(f"one word in {args.n // 2:,} concepts: {np.median(worst) * 1000:.1f} ms (median of 10)")
        t = time.perf_counter()
        lookup(store, "zzcommon", k=10, semantic=False, indexed=False)
        print(f"the same by FTS5 (previous): {(time.perf_counter() - t) * 1000:.1f} ms (one run)")
        out["common word ms"] = float(np.median(worst)) * 1000
        if args.oneshot and db_url is None:
            out |= time_oneshot(root, args.oneshot, args.previous, queries[1])
        if args.serve and db_url is None:
            fused = bool(store.atlas_record("big").extra.get("label_index"))
            out |= report("serve, bm25 + semantic" if fused else "serve, bm25", *timed_over_http(root, queries)[:2])
    return out


def lookup_cache_clear() -> None:
    """Forget the query embeddings a timed pass kept (`engine.atlas.lookup.QUERY_CACHE`), so that the
    next pass embeds each query again (the figures are of unseen queries)."""
    from engine.atlas.lookup import _query_vector

    _query_vector.cache_clear()


# Paraphrase queries for the tests' labels (tests/atlas/test_lookup.py) and for the ConceptWorld
# concepts: (query, the label it means). Words chosen to be in no label or description.
TEST_PARAPHRASES = [("a feline pet", "cats"), ("downpour", "weather and rain"), ("kitten", "cats"),
                    ("a song", "music"), ("software development", "programming"), ("umbrella", "rain gear"),
                    ("baking a cake", "cooking"), ("a piano recital", "music")]
WORLD_PARAPHRASES = [("downpour", "Weather"), ("physician", "Medicine"), ("melody", "Music"),
                     ("galaxy", "Outer space"), ("trousers", "Clothing"), ("ocean beach", "The sea shore"),
                     ("laptop", "Computing"), ("crimson", "Colours")]
NO_MATCH = ["zzzqqq", "hello world", "blorf", "asdf jkl", "the", "of the"]  # ("table" means Furniture)


def quality(encoders: list[str]) -> None:
    """How each encoder's semantic ranking (`semantic_search`, the floor included: what a lookup fuses)
    finds the meant label: the tests' labels with paraphrases, and ConceptWorld's hand-written
    concepts (`engine.world.concepts`) with each member word and each pair of the first member words
    as a query (the demo's "Text lookup" queries); and how often a query near no label finds one."""
    from engine.atlas.lookup import semantic_search
    from engine.world.concepts import _generated_concepts, concept_table

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.atlas.test_lookup import LABELS

    generated = set(_generated_concepts())
    world = [c for c in concept_table(256) if c not in generated]
    sets = {
        "tests' labels, paraphrases": ([a for a, _ in LABELS], [b for _, b in LABELS], TEST_PARAPHRASES),
        "world, member words": ([c.label for c in world], [c.description for c in world],
                                [(m, c.label) for c in world for m in c.members]),
        "world, demo pairs": ([c.label for c in world], [c.description for c in world],
                              [(" ".join(c.members[:2]), c.label) for c in world]),
        "world, paraphrases": ([c.label for c in world], [c.description for c in world], WORLD_PARAPHRASES),
    }
    print(f"{'':30}" + "".join(f"{e + ': top-1 / MRR@10 / none':>34}" for e in encoders))
    no_match: dict[str, int] = {}
    for name, (labels, descriptions, queries) in sets.items():
        row = f"{name + f' ({len(queries)})':30}"
        for encoder in encoders:
            with tempfile.TemporaryDirectory() as tmp, Store.init(Path(tmp) / "s") as store:
                x = np.random.default_rng(0).normal(size=(len(labels), 8)).astype(np.float32)
                store.add_atlas("q", x, labels, descriptions, source=AtlasSource(model="m", layer=0))
                build_label_index(store, "q", quiet=True, encoder=encoder)
                rr, top1, none = [], 0, 0
                for q, want in queries:
                    found = [labels[i] for _, i, _ in semantic_search(store, q, 10, "q")]
                    rr.append(1 / (found.index(want) + 1) if want in found else 0.0)
                    top1 += found[:1] == [want]
                    none += not found
                if name.startswith("world, member"):
                    no_match[encoder] = sum(bool(semantic_search(store, q, 10, "q")) for q in NO_MATCH)
            row += f"{f'{top1 / len(queries):.2f} / {np.mean(rr):.3f} / {none}':>34}"
        print(row, flush=True)
    print(f"{f'queries near no label ({len(NO_MATCH)})':30}"
          + "".join(f"{f'{no_match[e]} found a label':>34}" for e in encoders))


PREVIOUS = "272f0ec"  # the base of issue 26's one-shot work
WRITE_PREVIOUS = "f3f1a84"  # the score-bounded index rebuilt in the first lookup after a write
WRITTEN = "zzwritten"  # the word the timed write puts into a label


def time_after_write(root: Path, previous: str, queries: list[str], window: float) -> dict[str, float]:
    """`after_write` in a child process per code (this, then ``previous``: `git archive`); prints a line each."""
    repo = Path(__file__).resolve().parents[1]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as old:
        trees = {"this": repo}
        if previous:
            archive = subprocess.run(["git", "-C", str(repo), "archive", previous], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
            trees[f"previous ({previous})"] = Path(old)
        for tree, path in trees.items():
            env = {**os.environ, "PYTHONPATH": str(path), "ATLAS_QUIET": "1"}
            res = subprocess.run([sys.executable, __file__, "--write-child", str(root), "--after-write", str(window)],
                                 input=json.dumps(queries), env=env, capture_output=True, text=True, cwd=path)
            if res.returncode != 0:
                raise SystemExit(f"{tree}: the after-write run failed: {res.stderr[-2000:]}")
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"[{tree}] index built in {fig['build s']:.1f} s; steady state p50 {fig['steady p50 ms']:.2f}  "
                  f"p95 {fig['steady p95 ms']:.2f}  max {fig['steady max ms']:.2f} ms (FTS5 itself: p50 "
                  f"{fig['fts5 p50 ms']:.2f}  p95 {fig['fts5 p95 ms']:.2f}  max {fig['fts5 max ms']:.1f} ms)\n"
                  f"[{tree}] after one label edit: first lookup {fig['first ms']:.1f} ms (its hits right: "
                  f"{bool(fig['first right'])}); the index back after {fig['back s']:.1f} s; the {fig['n']:.0f} "
                  f"lookups until then: p50 {fig['p50 ms']:.2f}  p95 {fig['p95 ms']:.2f}  max {fig['max ms']:.1f} ms; "
                  f"after it p50 {fig['after p50 ms']:.2f}  p95 {fig['after p95 ms']:.2f}  max "
                  f"{fig['after max ms']:.2f} ms", flush=True)
            out |= {f"{tree} {key}": value for key, value in fig.items()}
    return out


def after_write(root: Path, queries: list[str], window: float) -> dict[str, float]:
    """Run by the child process of `time_after_write` (with the code under test on its path): the figures."""
    from sqlalchemy import update

    from engine.store.schema import ConceptRow

    store = Store.open(root)
    t0 = time.perf_counter()
    textindex_cache.current_index(store)
    fig = {"build s": time.perf_counter() - t0}
    ms = timed(lambda q: len(lookup(store, q, k=10, semantic=False)), queries)[0]
    fts = timed(lambda q: len(lookup(store, q, k=10, semantic=False, indexed=False)), queries)[0]
    fig |= {"steady p50 ms": float(np.median(ms)), "steady p95 ms": float(np.percentile(ms, 95)),
            "steady max ms": float(ms.max()), "fts5 p50 ms": float(np.median(fts)),
            "fts5 p95 ms": float(np.percentile(fts, 95)), "fts5 max ms": float(fts.max())}
    state = getattr(textindex_cache, "build_state", None)  # this code's; the previous rebuilt in the first lookup
    builds = state(store)["builds"] if state else 0
    (cid, label), = store.read("SELECT c.id, c.label FROM concepts c JOIN atlases a ON a.id = c.atlas_id "
                               "WHERE a.name = 'big' AND c.ordinal = 5")
    try:
        with store.session() as s:
            s.execute(update(ConceptRow).where(ConceptRow.id == cid).values(label=f"{WRITTEN} {label}"))
        start, times, back = time.perf_counter(), [], None
        first = lookup(store, WRITTEN, k=10, semantic=False)
        times.append(time.perf_counter() - start)
        fig["first right"] = float([h.ref for h in first] == ["big/5"])
        if state is None:
            back = time.perf_counter() - start
        i = 0
        while back is None and time.perf_counter() - start < window:
            t = time.perf_counter()
            lookup(store, queries[i % len(queries)], k=10, semantic=False)
            times.append(time.perf_counter() - t)
            i += 1
            if state is not None and state(store)["builds"] > builds:
                back = time.perf_counter() - start
        after = timed(lambda q: len(lookup(store, q, k=10, semantic=False)), queries)[0] / 1000
    finally:
        with store.session() as s:
            s.execute(update(ConceptRow).where(ConceptRow.id == cid).values(label=label))
    w, a = np.array(times) * 1000, np.array(after) * 1000
    return fig | {"first ms": float(w[0]), "n": float(len(w)), "p50 ms": float(np.median(w)),
                  "p95 ms": float(np.percentile(w, 95)), "max ms": float(w.max()),
                  "back s": float("nan") if back is None else back, "after p50 ms": float(np.median(a)),
                  "after p95 ms": float(np.percentile(a, 95)), "after max ms": float(a.max())}


def time_oneshot(root: Path, runs: int, previous: str, query: str) -> dict[str, float]:
    """Median wall and CPU seconds of one-shot commands as whole processes, this code against ``previous``."""
    repo = Path(__file__).resolve().parents[1]
    commands = {"show": ["show", "big/5"], "neighbors": ["neighbors", "big/5"],
                "lookup": ["lookup", query, "--no-semantic"]}
    with tempfile.TemporaryDirectory() as old:
        trees = {"this": repo}
        if previous:
            archive = subprocess.run(["git", "-C", str(repo), "archive", previous], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
            trees["previous"] = Path(old)
        out: dict[str, float] = {}
        for name, cmd in commands.items():
            figures: dict[str, list[tuple[float, float]]] = {tree: [] for tree in trees}
            for _ in range(runs + 1):  # the first round warms the page cache: not counted
                for tree, path in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(path), "ATLAS_QUIET": "1"}
                    env.pop("ATLAS_DB_URL", None)
                    res = subprocess.run(["/usr/bin/time", "-f", "%e %U %S", sys.executable, "-m", "engine.cli", *cmd,
                                          "--store", str(root)], env=env, capture_output=True, text=True, cwd=path)
                    if res.returncode != 0:
                        raise SystemExit(f"{tree}: atlas {' '.join(cmd)} failed: {res.stderr[-1000:]}")
                    wall, user, system = (float(v) for v in res.stderr.strip().splitlines()[-1].split())
                    figures[tree].append((wall, user + system))
            line = []
            for tree, rows in figures.items():
                wall, cpu = (float(np.median([r[i] for r in rows[1:]])) for i in (0, 1))
                out[f"{name} {tree} wall s"], out[f"{name} {tree} cpu s"] = wall, cpu
                line.append(f"{tree} wall {wall:.2f} s, cpu {cpu:.2f} s")
            print(f"atlas {name:10} (median of {runs}) " + "; ".join(line), flush=True)
    return out


def timed_over_http(root: Path, queries: list[str]) -> tuple[np.ndarray, float, np.ndarray]:
    """`timed` of ``GET /api/lookup?q=...&k=10`` against ``atlas serve`` on ``root`` (its own process)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ATLAS_QUIET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--store", str(root), "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/api/info").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    said = server.stderr.read().decode()[-2000:] if server.stderr else ""
                    raise SystemExit(f"the server did not start: {said}")
                time.sleep(0.2)

            def get(q: str) -> int:
                r = client.get("/api/lookup", params={"q": q, "k": 10})
                r.raise_for_status()
                return len(r.json()["hits"])

            return timed(get, queries)
    finally:
        server.terminate()
        server.wait(timeout=30)


def semantic_bound(n: int, queries: list[str]) -> None:
    """What bounds a fused lookup without embedding ``n`` labels: one query's embedding (the sentence
    model warm on one thread, and the static encoder) and one search of a label index (HNSW, the
    label policy's before the static encoder, and Flat), over ``n`` random unit vectors of the
    model's width (for HNSW a harder case than real labels, which cluster). ``--semantic`` times the
    whole fused lookup with the label index the policy gives now."""
    import torch

    import indexes
    from engine.atlas.lookup import embed_texts
    from indexes.policy import ANN_SPEC

    torch.set_num_threads(1)
    embed_texts(queries[:2], quiet=True)
    report("query embedding", *timed(lambda q: len(embed_texts([q], quiet=True)), queries))
    with tempfile.TemporaryDirectory() as tmp:  # the static encoder's (a store's copy of the table)
        from engine.atlas.static_encoder import ensure_static_table, load_static_encoder

        static = load_static_encoder(*ensure_static_table(Path(tmp)))
        report("static query embedding", *timed(lambda q: len(static.encode([q])), queries))
    qv = embed_texts(queries, quiet=True)
    rng = np.random.default_rng(2)
    by_query = dict(zip(queries, qv))
    for spec in (ANN_SPEC, "Flat"):  # the label policy's above 200,000 labels before the static encoder, and Flat
        x = rng.normal(size=(n, qv.shape[1])).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index = indexes.create_index(qv.shape[1], spec)
        t0 = time.perf_counter()
        index.add(x, np.arange(n, dtype=np.int64))
        print(f"label index {spec} over {n:,} random vectors built in {time.perf_counter() - t0:.0f} s", flush=True)
        report(f"{spec.split('|')[0]} search",
               *timed(lambda q, index=index: len(index.search(by_query[q][None], 50)[1]), queries))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=64, help="direction dim (lookup is text-only)")
    ap.add_argument("--store", type=Path, help="keep the SQLite store here and reuse it (built on the first run)")
    ap.add_argument("--semantic", action="store_true", help="also time lookups fused with the semantic model")
    ap.add_argument("--serve", action="store_true", help="also time the queries through `atlas serve` over HTTP")
    ap.add_argument("--oneshot", type=int, default=0, metavar="RUNS",
                    help="also time atlas show / neighbors / lookup as whole processes, RUNS runs each")
    ap.add_argument("--previous", default=PREVIOUS, help="git revision the one-shot commands are timed against "
                                                         "('' skips it)")
    ap.add_argument("--pg-url", default=None, help="also run on PostgreSQL: a server URL whose user may create "
                                                   "databases (e.g. $ATLAS_TEST_PG_URL of .ci/postgres.sh)")
    ap.add_argument("--after-write", type=float, default=0, metavar="S",
                    help="only time the lookups right after a write (a label edit) until the index is back, at "
                         "most S seconds, this code and --write-previous's, then stop")
    ap.add_argument("--write-previous", default=WRITE_PREVIOUS,
                    help="git revision --after-write compares with ('' skips it)")
    ap.add_argument("--write-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--semantic-bound", type=int, default=0, metavar="N",
                    help="only time a query's embedding (one thread) and a search of the label index the "
                         "policy gives N labels (random vectors: no labels embedded), then stop")
    ap.add_argument("--encoders", type=lambda v: [e for e in v.split(",") if e], default=["static"],
                    help=f"with --semantic: the encoders to time, comma-separated ({', '.join(ENCODERS)}; default static)")
    ap.add_argument("--quality", action="store_true",
                    help="only measure how each of --encoders ranks labels on the repository's lookup checks, then stop")
    args = ap.parse_args()
    if args.write_child:  # the queries come from the parent
        print(json.dumps(after_write(args.write_child, json.loads(sys.stdin.read()), args.after_write)))
        return
    if bad := [e for e in args.encoders if e not in ENCODERS]:
        ap.error(f"unknown encoder(s) {', '.join(bad)}: use {', '.join(ENCODERS)}")
    if args.quality:
        quality(args.encoders)
        return
    rng = np.random.default_rng(0)
    vocab, p, labels, descriptions = make_labels(args.n, rng)
    queries = []
    for i in range(args.queries):
        words = list(rng.choice(vocab, size=rng.integers(1, 5), p=p if i % 2 else None))
        queries.append(" ".join(words))
    if args.semantic_bound:
        semantic_bound(args.semantic_bound, queries)
        return
    if args.after_write:
        with tempfile.TemporaryDirectory() as scratch:
            root = args.store or Path(scratch) / "store"
            with contextlib.closing(prepared_store(root, None, args, labels, descriptions)[0]):
                pass  # built here unless an earlier run left it
            time_after_write(root, args.write_previous, queries, args.after_write)
        return
    results = {"sqlite": run("sqlite", None, args, labels, descriptions, queries)}
    if args.pg_url:
        with scratch_database(args.pg_url) as url:
            results["postgresql"] = run("postgresql", url, args, labels, descriptions, queries)
        print(f"\n{'':28}" + "".join(f"{b:>12}" for b in results))
        for key in results["sqlite"]:
            print(f"{key:28}" + "".join(f"{r.get(key, float('nan')):12.1f}" for r in results.values()))


if __name__ == "__main__":
    main()
