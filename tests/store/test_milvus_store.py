"""Atlases held by Milvus (Milvus Lite): the same reads as a FAISS atlas, verify, rebuild between
backends, removal, and a killed import's leftover collection reported by verify and dropped by gc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.align.map import AlignmentMap, save_map
from engine.cli import cli
from engine.errors import BadValueError, IndexUnavailableError
from engine.labelling.run import label_features
from engine.store.store import AtlasSource, IndexPlacement, Store
from indexes.milvus import client, collections
from tests.conftest import clustered_directions

REPO = Path(__file__).resolve().parents[2]


def _pair(store: Store, milvus_uri: str, n: int = 300, d: int = 16, seed: int = 3) -> np.ndarray:
    """The same vectors as atlas ``f`` (FAISS file) and ``m`` (Milvus collection)."""
    x = clustered_directions(n, d, seed=seed)
    labels = [f"concept {i}" for i in range(n)]
    store.add_atlas("f", x, labels, source=AtlasSource(model="x", layer=1))
    store.add_atlas(
        "m", x, labels, source=AtlasSource(model="x", layer=1), index=IndexPlacement(uri=milvus_uri),
    )
    return x


def _same_hits(a, b):
    """Two hit lists agree: same scores rank by rank, and each id's score (ties may swap ids)."""
    assert [round(h.score, 4) for h in a] == [round(h.score, 4) for h in b]
    assert {h.ordinal for h in a if h.score > a[-1].score + 1e-4} == {h.ordinal for h in b if h.score > b[-1].score + 1e-4}


def test_reads_on_a_milvus_atlas_equal_the_faiss_ones(store, milvus_uri):
    x = _pair(store, milvus_uri)
    info = store.atlas("m")
    assert info.index_backend == "milvus" and info.index_uri == milvus_uri  # outside the store: absolute
    assert store.atlas("f").index_backend == "faiss"
    assert "collection" in store.atlas_files("m") and "index" not in store.atlas_files("m")
    for ref in (0, 17, 299):
        _same_hits(store.neighbors(f"f/{ref}", k=8), store.neighbors(f"m/{ref}", k=8))
    q = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    for a, b in zip(store.search_vectors("f", q, 10), store.search_vectors("m", q, 10)):
        _same_hits(a, b)
    # a labelling run through a map onto the Milvus atlas labels like one onto the FAISS atlas
    rng = np.random.default_rng(7)
    w_in, w_out = rng.normal(size=(8, 16)), rng.normal(size=(16, 8))
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    np.save(store.path.parent / "feats.npy", feats)
    runs = {}
    for atlas in ("f", "m"):
        amap = AlignmentMap(w_in, w_out, np.zeros(8), np.zeros(16), "procrustes", subject_model="subj",
                            subject_layer=1, atlas=atlas, atlas_model="x", atlas_layer=1,
                            metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
        if atlas == "f":
            store.add_model("subj", d_model=8)
        save_map(store, amap, f"map-{atlas}")
        label_features(store, f"map-{atlas}", str(store.path.parent / "feats.npy"), k=3, name=f"run-{atlas}",
                       batch_size=6, quiet=True)
        runs[atlas] = [(f, rank, round(score, 4)) for f, rank, score, *_ in store.run_label_rows(f"run-{atlas}", 0, 12)]
    assert runs["f"] == runs["m"] and len(runs["m"]) == 36
    assert store.verify().ok
    del x


def test_verify_finds_a_damaged_collection_and_rebuild_restores_it(store, milvus_uri):
    _pair(store, milvus_uri, n=120)
    collection = store.atlas_files("m")["collection"]
    client(milvus_uri).delete(collection, ids=[5, 6])
    store._indexes.clear()  # another process's view: reopened from the row
    status = store.verify_index("m")
    assert not status.ok and "holds 118 vectors, the atlas has 120" in status.problem
    rebuilt = store.rebuild_index("m")
    assert rebuilt.ok and rebuilt.index_count == 120 and rebuilt.backend == "milvus"
    new = store.atlas_files("m")["collection"]
    assert new != collection and collection not in collections(milvus_uri) and new in collections(milvus_uri)
    client(milvus_uri).drop_collection(new)
    store._indexes.clear()
    assert "missing" in store.verify_index("m").problem
    assert store.rebuild_index("m").ok


def test_rebuild_moves_an_atlas_between_backends_and_remove_drops_it(store, milvus_uri):
    x = clustered_directions(200, 16, seed=5)
    store.add_atlas("a", x, source=AtlasSource(model="x", layer=1))
    before = store.neighbors("a/3", k=5)
    old_file = store.path / store.atlas_files("a")["index"]
    moved = store.rebuild_index("a", "HNSW16|efSearch=64", index_uri=milvus_uri)
    assert moved.ok and moved.backend == "milvus" and not old_file.exists()
    collection = store.atlas_files("a")["collection"]
    assert [h.ordinal for h in store.neighbors("a/3", k=5)] == [h.ordinal for h in before]
    back = store.rebuild_index("a", "Flat", index_uri="faiss")
    assert back.ok and back.backend == "faiss" and collection not in collections(milvus_uri)
    store.rebuild_index("a", index_uri=milvus_uri)
    collection = store.atlas_files("a")["collection"]
    store.remove_atlas("a")
    assert collection not in collections(milvus_uri)
    assert store.verify().ok


def test_a_failed_import_drops_its_collection(store, milvus_uri, monkeypatch):
    import engine.store.atlases as atlases

    def fail(*_a, **_k):
        raise OSError("disk full")

    before = set(collections(milvus_uri))
    monkeypatch.setattr(atlases, "ensure_model", fail)  # the database write fails after the collection is filled
    with pytest.raises(OSError, match="disk full"):
        store.add_atlas(
            "a", clustered_directions(50, 16), source=AtlasSource(model="x", layer=1),
            index=IndexPlacement(uri=milvus_uri),
        )
    assert set(collections(milvus_uri)) == before
    with pytest.raises(BadValueError, match="does not work|no index"):  # enough vectors to train PQ4 (indexes.policy)
        store.add_atlas(
            "a", clustered_directions(9984, 16), source=AtlasSource(model="x", layer=1),
            index=IndexPlacement(uri=milvus_uri, spec="IVF8,PQ4"),
        )
    assert set(collections(milvus_uri)) == before and not store.atlases()


def test_bad_index_uris_are_clear_errors(store, tmp_path):
    x = clustered_directions(20, 8)
    for uri, msg in [("nowhere/x.db", "does not exist"), ("ftp://h/x", "not understood"),
                     ("http://u:p@h:19530", "ATLAS_MILVUS_TOKEN"), ("http://h:99999", "bad port")]:
        with pytest.raises(BadValueError, match=msg):
            store.add_atlas("a", x, source=AtlasSource(model="x", layer=1), index=IndexPlacement(uri=uri))
    with pytest.raises(IndexUnavailableError, match="cannot reach Milvus at http://127.0.0.1:9"):
        store.add_atlas(
            "a", x, source=AtlasSource(model="x", layer=1), index=IndexPlacement(uri="http://127.0.0.1:9"),
        )
    assert not store.atlases()


def _cli(store: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args, "--store", str(store)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1", "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a writer process killed mid-import, then Milvus Lite reopened: CI runs it
def test_killed_import_leaves_a_collection_gc_drops_and_the_store_moves(tmp_path, milvus_uri):
    """Milvus Lite inside the store (``milvus.db``, recorded relative to the root). The killed writer
    is another process (a Lite folder serves one process at a time; this one opens it after, and
    frees it when the store is closed)."""
    np.save(tmp_path / "a.npy", clustered_directions(100, 16, seed=1))
    root = tmp_path / "st"
    with Store.init(root) as store:
        store.add_model("x", d_model=16)  # registered: the import does not look for it on the hub
    r = _cli(root, "import-sae", str(tmp_path / "a.npy"), "--model", "x", "--layer", "1", "--name", "b",
             "--index-uri", "milvus.db", env={"ATLAS_FAILPOINT": "add_atlas.before_commit"})
    assert r.returncode == -9, r.stderr  # killed after its collection was filled, before the commit
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)  # the store, its Lite folder with it, moves
    with Store.open(moved) as store:
        store.add_atlas(
            "a", np.load(tmp_path / "a.npy"), source=AtlasSource(model="x", layer=1),
            index=IndexPlacement(uri="milvus.db"),
        )
        assert store.atlas("a").index_uri == "milvus.db"
        assert store.neighbors("a/0", k=3)[0].ordinal == store.neighbors("a/0", k=1)[0].ordinal
        report = store.verify()
        left = [x for x in report.leftovers if x.collection]
        assert len(left) == 1 and left[0].state == "orphan" and left[0].file.startswith("milvus.db#atlas_b__")
        assert not report.ok and "leftover" in report.problems[-1]
        out = CliRunner().invoke(cli, ["gc", "--json", "--store", str(moved)])
        assert out.exit_code == 0, out.output
        assert [x["collection"] for x in json.loads(out.output) if x["collection"]] == [left[0].collection]
        assert store.verify().ok and set(collections(str(moved / "milvus.db"))) == {store.atlas_files("a")["collection"]}
        first = store.neighbors("a/0", k=3)
        busy = _cli(moved, "neighbors", "a/0", "-k", "3")  # while this process holds the Lite folder
        assert busy.returncode == 1 and busy.stderr.startswith("Error: ") and len(busy.stderr.splitlines()) == 1
        assert "another process holds the lock" in busy.stderr, busy.stderr
    # closing the store released its Lite folder: another process reads it, then this one again
    r = _cli(moved, "neighbors", "a/0", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert [h["ordinal"] for h in json.loads(r.stdout)] == [h.ordinal for h in first]
    with Store.open(moved) as store:
        assert store.verify().ok
    del milvus_uri  # the session's Lite folder is not used here; the fixture skips without the extra

