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

    python benchmarks/bench_lookup.py [--n 100000] [--queries 200]
    eval "$(.ci/postgres.sh start)"
    python benchmarks/bench_lookup.py --n 100000 --pg-url "$ATLAS_TEST_PG_URL"
    .ci/postgres.sh stop
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from engine.atlas.lookup import lookup
from engine.store.store import AtlasSource, Store


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


def run(backend: str, db_url: str | None, args, labels, descriptions, queries) -> dict[str, float]:
    """Build the atlas in a new store on ``db_url`` (None: SQLite), time the queries; print as it goes."""
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store", db_url=db_url)
        t0 = time.perf_counter()
        store.add_atlas(
            "big", rng.normal(size=(args.n, args.dim)).astype(np.float32), labels, descriptions,
            source=AtlasSource(model="bench", layer=0),
        )
        build = time.perf_counter() - t0
        lookup(store, queries[0], k=10, semantic=False)  # warm the connection pool and page cache
        times, n_hits = [], 0
        for q in queries:
            t = time.perf_counter()
            n_hits += len(lookup(store, q, k=10, semantic=False))
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1000
        print(f"[{backend}]")
        print(f"concepts              {args.n:,}")
        print(f"import (text + index) {build:.1f} s")
        print(f"queries               {len(queries)} (mean {n_hits / len(queries):.1f} hits each)")
        print(f"latency ms            mean {ms.mean():.1f}  p50 {np.median(ms):.1f}  p95 {np.percentile(ms, 95):.1f}  max {ms.max():.1f}")
        print(f"target                < 50 ms per query: {'PASS' if np.percentile(ms, 95) < 50 else 'FAIL'} (p95)")
        # Degenerate case: one query word that is in a third of all concepts (the ranking scores them all).
        extra = rng.normal(size=(args.n // 2, args.dim)).astype(np.float32)
        store.add_atlas(
            "common", extra, ["zzcommon"] * (args.n // 2), source=AtlasSource(model="bench", layer=0),
        )
        worst = []
        for _ in range(10):
            t = time.perf_counter()
            lookup(store, "zzcommon", k=10, semantic=False)
            worst.append(time.perf_counter() - t)
        print(f"one word in {args.n // 2:,} concepts: {np.median(worst) * 1000:.1f} ms (median of 10)")
        store.close()
    return {"import s": build, "mean ms": float(ms.mean()), "p50 ms": float(np.median(ms)),
            "p95 ms": float(np.percentile(ms, 95)), "common word ms": float(np.median(worst)) * 1000,
            "hits/query": n_hits / len(queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=64, help="direction dim (lookup is text-only)")
    ap.add_argument("--pg-url", default=None, help="also run on PostgreSQL: a server URL whose user may create "
                                                   "databases (e.g. $ATLAS_TEST_PG_URL of .ci/postgres.sh)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab, p, labels, descriptions = make_labels(args.n, rng)
    queries = []
    for i in range(args.queries):
        words = list(rng.choice(vocab, size=rng.integers(1, 5), p=p if i % 2 else None))
        queries.append(" ".join(words))
    results = {"sqlite": run("sqlite", None, args, labels, descriptions, queries)}
    if args.pg_url:
        with scratch_database(args.pg_url) as url:
            results["postgresql"] = run("postgresql", url, args, labels, descriptions, queries)
        print(f"\n{'':16}" + "".join(f"{b:>12}" for b in results))
        for key in results["sqlite"]:
            print(f"{key:16}" + "".join(f"{r[key]:12.1f}" for r in results.values()))


if __name__ == "__main__":
    main()
