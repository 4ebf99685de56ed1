"""The cost of writing a labelling run's rows into a SQLite store, with and without the bulk page cache.

A labelling run commits its label rows in batches (`engine.store.runs.LabelPass.commit_batch`): k
rows per feature into ``feature_labels``, whose index on ``concept_id`` takes them in random order.
This benchmark writes the same rows the same way (the store's own schema, foreign keys on, the
driver's executemany of `runs.label_insert_sql`, one transaction per batch) into two fresh stores of
``--concepts`` concepts, batch by batch alternately, one with `base.bulk_page_cache` and one with
SQLite's default page cache (2 MiB), so both see the same machine load:

    python benchmarks/bench_row_writes.py                              # 1M concepts, 31 x 32,768 features, k 10
    python benchmarks/bench_row_writes.py --concepts 100000 --batches 4   # quick check

It prints each store's seconds for all batches and for the last quarter (where the index is
largest), and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Connection

from engine.store import base
from engine.store.runs import label_insert_sql
from engine.store.store import Store


def seeded_store(root: Path, n_concepts: int) -> Store:
    """A store with ``n_concepts`` concept rows and one labelling run (id 1), written by SQL: the rows
    the label rows reference are real; their own parents (model, map) are placeholder rows."""
    store = Store.init(root)
    with store.engine.connect() as conn:
        raw = conn.connection.driver_connection
        raw.execute("PRAGMA foreign_keys=OFF")  # the placeholders' own parents are not made
        raw.execute("BEGIN")
        _placeholder(raw, "atlases", id=1, n_concepts=n_concepts)
        _placeholder(raw, "label_runs", id=1, map_id=1, k=10)
        columns = [c[1] for c in raw.execute("PRAGMA table_info(concepts)") if c[3] and c[4] is None and not c[5]]
        rows = ((i + 1, 1, i, f"c{i}", *([0] * (len(columns) - 3))) for i in range(n_concepts))
        order = ["id", "atlas_id", "ordinal", "label", *[c for c in columns if c not in ("atlas_id", "ordinal", "label")]]
        raw.executemany(f"INSERT INTO concepts ({', '.join(order)}) VALUES ({', '.join('?' * len(order))})", rows)
        raw.execute("COMMIT")
        raw.execute("PRAGMA foreign_keys=ON")
    return store


def _placeholder(raw, table: str, **values) -> None:
    """Insert one row: ``values``, and 0 in every other NOT NULL column without a default."""
    for _, name, _, notnull, default, pk in raw.execute(f"PRAGMA table_info({table})"):
        if notnull and default is None and not pk and name not in values:
            values[name] = 0
    raw.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()))


def write_batch(conn: Connection, rows: list[tuple], bulk: bool) -> float:
    t = time.perf_counter()
    with conn.begin():
        with base.bulk_page_cache(conn) if bulk else contextlib.nullcontext():
            conn.exec_driver_sql(label_insert_sql(conn.dialect.paramstyle), rows)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=1_000_000)
    ap.add_argument("--batches", type=int, default=31)
    ap.add_argument("--batch", type=int, default=32768, help="features per batch")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        stores = {mode: seeded_store(Path(scratch) / mode, args.concepts) for mode in ("bulk", "default")}
        conns = {mode: s.engine.connect() for mode, s in stores.items()}
        times: dict[str, list[float]] = {mode: [] for mode in stores}
        b, k = args.batch, args.k
        for i in range(args.batches):
            feature = np.repeat(np.arange(i * b, (i + 1) * b), k).tolist()
            rank = np.tile(np.arange(1, k + 1), b).tolist()
            concept = (rng.integers(0, args.concepts, size=b * k) + 1).tolist()
            score = rng.random(b * k).tolist()
            rows = list(zip([1] * (b * k), feature, rank, concept, score, [None] * (b * k)))
            for mode in (("bulk", "default") if i % 2 else ("default", "bulk")):
                times[mode].append(write_batch(conns[mode], rows, bulk=mode == "bulk"))
        for c in conns.values():
            c.close()
        for s in stores.values():
            s.close()
    q = max(1, args.batches // 4)
    print(f"{args.batches} batches of {args.batch:,} features x k {k} ({args.batches * b * k:,} rows) into "
          f"{args.concepts:,} concepts")
    for mode, t in times.items():
        print(f"  {mode:8s} page cache: {sum(t):7.1f} s in all, last {q} batches {sum(t[-q:]):6.1f} s")
    print(f"  bulk / default: {sum(times['bulk']) / sum(times['default']):.2f}x in all, "
          f"{sum(times['bulk'][-q:]) / sum(times['default'][-q:]):.2f}x over the last {q}")


if __name__ == "__main__":
    main()
