"""Out of core and exact search at the GEMM rate (issue 14): small forms of the scale behaviour.

The GEMM path and the batched IVF path are checked against FAISS on the same index (ties
allowed); index files are checked to be memory-mapped, not read; the integrity cache is checked
to skip the full checksum on an unchanged file and to catch a changed one; import is checked to
stream (chunk boundaries, a memory-mapped source, a file ``safetensors`` reads back).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import indexes
from engine.errors import IndexIntegrityError, ShapeError
from engine.store import blocksums, reads, vectorfiles
from engine.store.store import AtlasSource, IndexPlacement, Store
from engine.util import sha256_file
from indexes import faiss_backend
from indexes.exact import topk_inner_product
from indexes.ivf import ivf_topk
from tests.conftest import clustered_directions


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _same_up_to_ties(q, x, got_s, got_i, want_s, ids=None):
    """Scores equal; every returned id's true score is the reported one (ties may reorder)."""
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    pos = got_i if ids is None else np.searchsorted(ids, got_i)
    np.testing.assert_allclose(np.take_along_axis(q @ x.T, pos, 1), got_s, atol=1e-5)
    assert all(len(set(r)) == len(r) for r in got_i.tolist())  # no id twice in a row


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("blocks", [(7, 33), (64, 1000), (1024, 16384)])
def test_blocked_gemm_topk_equals_faiss_with_ties(blocks, threads):
    rng = np.random.default_rng(0)
    x = _unit(clustered_directions(900, 32, seed=1))
    x[450:500] = x[400:450]  # exact duplicates: ties across tiles
    q = _unit(np.concatenate([x[rng.choice(900, 60)], rng.normal(size=(60, 32)).astype(np.float32)]))
    flat = faiss_backend.faiss.IndexFlatIP(32)
    flat.add(x)
    want_s, _ = flat.search(q, 10)
    got_s, got_i = topk_inner_product(q, x, 10, query_block=blocks[0], base_block=blocks[1], threads=threads)
    _same_up_to_ties(q, x, got_s, got_i, want_s)


def test_flat_index_serves_many_queries_through_the_gemm_path_with_callers_ids():
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(3000, 24)).astype(np.float32))
    ids = np.arange(3000, dtype=np.int64) * 5 + 11
    ix = indexes.create_index(24, "Flat")
    ix.add(x, ids)
    q = _unit(rng.normal(size=(faiss_backend.GEMM_MIN_QUERIES + 5, 24)).astype(np.float32))
    assert ix._flat_vectors() is not None  # the GEMM path is the one taken
    got_s, got_i = ix.search(q, 7)
    want_s, _ = ix._index.search(q, 7)  # FAISS's own search of the same index
    _same_up_to_ties(q, x, got_s, got_i, want_s, ids=ids)
    few_s, few_i = ix.search(q[:3], 7)  # below the threshold: FAISS itself
    np.testing.assert_allclose(few_s, got_s[:3], atol=1e-5)
    s, i = topk_inner_product(q[:2], x[:3], 5)  # fewer base vectors than k: -inf / -1 after them
    assert (i[:, 3:] == -1).all() and np.isinf(s[:, 3:]).all() and (i[:, :3] >= 0).all()


@pytest.mark.parametrize("nprobe", [1, 3, 16])
def test_ivf_gemm_search_equals_faiss_ivf_search_with_ties(tmp_path, nprobe):
    """Many queries on an IVF-Flat index go through `indexes.ivf` (the queries that probe a list
    scored in one GEMM): the same answers as FAISS's own IVF search with the same nprobe (the same
    lists), also on the index opened memory-mapped from its file; lists shorter than k, nprobe above
    the number of lists and query blocks that split the batch are covered."""
    rng = np.random.default_rng(5)
    x = _unit(clustered_directions(3000, 24, seed=6))
    x[1500:1600] = x[1400:1500]  # exact duplicates: ties inside and across lists
    ids = np.arange(3000, dtype=np.int64) * 3 + 7
    ix = indexes.create_index(24, f"IVF16,Flat|nprobe={nprobe}")
    ix.add(x, ids)
    q = _unit(np.concatenate([x[rng.choice(3000, 700)] + 0.05 * rng.normal(size=(700, 24)).astype(np.float32),
                              rng.normal(size=(faiss_backend.IVF_GEMM_MIN_QUERIES, 24)).astype(np.float32)]))
    assert ix._ivf_lists() is not None  # the GEMM path is the one taken
    want_s, want_i = ix._index.search(q, 10)  # FAISS's own IVF search of the same index
    got_s, got_i = ix.search(q, 10)
    found = want_i >= 0
    np.testing.assert_array_equal(got_i >= 0, found)
    np.testing.assert_allclose(got_s[found], want_s[found], rtol=1e-5, atol=1e-5)
    pos = np.searchsorted(ids, np.where(found, got_i, ids[0]))
    np.testing.assert_allclose(np.take_along_axis(q @ x.T, pos, 1)[found], got_s[found], atol=1e-5)
    assert all(len(set(r) - {-1}) == (r >= 0).sum() for r in got_i)  # no id twice in a row
    centroids, lists = ix._ivf_lists()
    small_s, small_i = ivf_topk(q, centroids, lists, 10, nprobe, query_block=97)  # blocks split the batch
    one_s, _ = ivf_topk(q, centroids, lists, 10, nprobe, threads=1)  # one worker, not one per core
    np.testing.assert_allclose(one_s[found], got_s[found], atol=1e-5)
    np.testing.assert_allclose(small_s[found], got_s[found], atol=1e-5)
    np.testing.assert_array_equal(small_i >= 0, found)
    all_s, _ = ivf_topk(q[:50], centroids, lists, 10, nprobe=99)  # nprobe > lists: exact search
    np.testing.assert_allclose(all_s, topk_inner_product(q[:50], x, 10)[0], atol=1e-5)
    ix.write(tmp_path / "ivf.faiss")
    opened = indexes.open_index(tmp_path / "ivf.faiss", f"IVF16,Flat|nprobe={nprobe}")
    assert opened._ivf_lists() is not None and str(tmp_path / "ivf.faiss") in _mapped_files()
    np.testing.assert_allclose(opened.search(q, 10)[0][found], got_s[found], atol=1e-5)
    tiny = indexes.create_index(24, "IVF4,Flat|nprobe=1")  # lists shorter than k: -inf / -1 after them
    tiny.add(x[:12], ids[:12])
    s, i = tiny.search(q, 10)
    w_s, w_i = tiny._index.search(q, 10)
    np.testing.assert_array_equal(i >= 0, w_i >= 0)
    assert np.isinf(s[i < 0]).all()


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[-1].strip() for line in f if len(line.split()) >= 6}


@pytest.mark.parametrize("spec", ["Flat", "HNSW16", "IVF8,Flat|nprobe=8"])
def test_index_opened_from_its_file_is_memory_mapped_and_answers_the_same(tmp_path, spec):
    x = _unit(clustered_directions(2000, 32, seed=3))
    ix = indexes.create_index(32, spec)
    ix.add(x, np.arange(2000))
    path = tmp_path / "ix.faiss"
    ix.write(path)
    assert path.read_bytes() == ix.to_bytes()
    opened = indexes.open_index(path, spec)
    assert str(path) in _mapped_files()  # the vectors are a mapping of the file, not a copy
    q = x[:40]
    np.testing.assert_array_equal(opened.search(q, 5)[1], ix.search(q, 5)[1])
    path.with_name("junk.faiss").write_bytes(b"not an index at all" * 10)
    with pytest.raises(indexes.IndexCorruptError):
        indexes.open_index(path.with_name("junk.faiss"))


def _store_with_atlas(tmp_path, n=1500, d=32, spec="Flat"):
    store = Store.init(tmp_path / "s")
    x = clustered_directions(n, d, seed=4)
    store.add_atlas(
        "a", x, [f"c{i}" for i in range(n)], source=AtlasSource(model="m", layer=0),
        index=IndexPlacement(spec=spec),
    )
    return store, x


def _count_full_hashes(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(path, *a, **kw):
        calls.append(str(path))
        return blocksums.file_sums(path, *a, **kw)

    monkeypatch.setattr(reads, "file_sums", counting)  # the full check: sha256 and block sums in one pass
    return calls


def test_integrity_cache_skips_the_full_checksum_and_catches_a_changed_file(tmp_path, monkeypatch):
    store, x = _store_with_atlas(tmp_path)
    calls = _count_full_hashes(monkeypatch)
    fresh = Store.open(store.path)
    assert fresh.neighbors("a/3", k=3)[0].ordinal != 3
    assert calls == []  # opened on the cached stamp: no file hashed whole
    idx = fresh.path / fresh.atlas_files("a")["index"]

    os.utime(idx, ns=(idx.stat().st_atime_ns, idx.stat().st_mtime_ns + 10**9))  # touched (copied): same bytes
    Store.open(store.path).index("a")
    assert calls == [str(idx)]  # one full check, then the new stamp is cached
    Store.open(store.path).index("a")
    assert calls == [str(idx)]

    data = bytearray(idx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new mtime, another head (a small file is all head)
    idx.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="corrupt or stale"):
        Store.open(store.path).index("a")
    idx.write_bytes(bytes(data[:-8]))  # another size: refused on the stamp alone
    with pytest.raises(IndexIntegrityError, match="size or header"):
        Store.open(store.path).index("a")


def test_verify_runs_the_full_streamed_checksum_the_cheap_check_cannot(tmp_path, monkeypatch):
    store, _ = _store_with_atlas(tmp_path, n=12_000, d=96)
    idx = store.path / store.atlas_files("a")["index"]
    st = idx.stat()
    assert st.st_size > 3 * (1 << 20)  # a middle beyond the stamp's head and tail
    data = bytearray(idx.read_bytes())
    data[len(data) // 2] ^= 0x01
    idx.write_bytes(bytes(data))
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored: the stamp cannot tell
    # the stamp cannot tell; the index's block checksums can (`engine.store.blocksums`)
    with pytest.raises(IndexIntegrityError, match=rf"is damaged: block {len(data) // 2 >> 20} "):
        Store.open(store.path).index("a")
    monkeypatch.setattr(blocksums, "HASH_CHUNK", 1 << 16)
    reads = []
    real_open = open

    def spying_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if str(path) == str(idx) and "b" in mode:
            real_readinto = f.readinto

            class Spy:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def readinto(self, buf):
                    reads.append(len(buf))
                    return real_readinto(buf)

                def __getattr__(self, name):
                    return getattr(f, name)

            return Spy()
        return f

    monkeypatch.setattr("builtins.open", spying_open)
    status = Store.open(store.path).verify_index("a")
    monkeypatch.undo()
    assert not status.ok and "checksum" in status.problem
    assert reads and max(reads) <= 1 << 16 and len(reads) > 10  # streamed, in small chunks
    assert sha256_file(idx, chunk=1000) == hashlib.sha256(idx.read_bytes()).hexdigest()


def test_import_streams_chunks_from_a_memory_mapped_source(tmp_path, monkeypatch):
    monkeypatch.setattr(vectorfiles, "CHUNK_ROWS", 256)  # many chunks, uneven last one
    x = clustered_directions(1000, 24, seed=5)
    np.save(tmp_path / "x.npy", x)
    src = np.load(tmp_path / "x.npy", mmap_mode="r")
    store = Store.init(tmp_path / "s")
    store.add_atlas(
        "a", src, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="IVF4,Flat|nprobe=4"),
    )
    vec_file = store.path / store.atlas_files("a")["vectors"]
    np.testing.assert_array_equal(load_file(str(vec_file))["directions"], x)  # safetensors reads it
    assert isinstance(store.atlas_vectors("a"), np.memmap)
    assert Store.open(store.path).verify_index("a").ok
    hits = Store.open(store.path).search_vectors("a", x[700:705], k=1)
    assert [h[0].ordinal for h in hits] == list(range(700, 705))
    bad = x.copy()
    bad[600] = 0.0  # in the third chunk: its row number in the whole matrix is reported
    with pytest.raises(ShapeError, match="row 600 is all zeros"):
        store.add_atlas("b", bad, source=AtlasSource(model="m", layer=0))
    assert {p.name for p in (store.path / "vectors").iterdir()} == {vec_file.name}  # nothing left behind


def test_quantised_spec_reranks_its_candidates_from_the_vector_file(tmp_path):
    x = clustered_directions(3000, 32, n_base=256, noise=0.3, seed=6)
    store = Store.init(tmp_path / "s")
    store.add_atlas("sq", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="HNSW16_SQ4"))
    store.add_atlas(
        "rr", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="HNSW16_SQ4|rerank=4"),
    )
    q = _unit(x[::60] + 0.3 * np.random.default_rng(7).normal(size=(50, 32)).astype(np.float32))
    exact_s, exact_i = topk_inner_product(q, _unit(x), 10)
    fresh = Store.open(store.path)
    plain_s, plain_i = fresh.index("sq").search(q, 10)
    rr_s, rr_i = fresh.index("rr").search(q, 10)
    recall = {name: np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_i)])
              for name, ids in (("plain", plain_i), ("rerank", rr_i))}
    assert recall["rerank"] > recall["plain"]  # 4-bit codes misorder neighbours; exact re-scoring fixes most
    # re-ranked scores are the exact cosines of the returned concepts (not the codes' estimates)
    np.testing.assert_allclose(np.take_along_axis(q @ _unit(x).T, rr_i, 1), rr_s, atol=1e-5)
    assert not np.allclose(np.take_along_axis(q @ _unit(x).T, plain_i, 1), plain_s, atol=1e-5)
    assert fresh.verify_index("rr").ok


def test_searches_in_several_threads_leave_the_blas_threads_as_they_were():
    """Each search holds numpy's BLAS at one thread while its workers run; searches that overlap in
    a server's threads restore the original count when the last one ends, whatever the order (the
    last one out is often another thread than the first: threadpoolctl >= 3.6 ignores a limit set by
    any thread but the one that set the first, unless control is handed over)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas(layer: str | None = None) -> list[tuple[str, int]]:  # by library: info's order may change
        return sorted((p["filepath"], p["num_threads"]) for p in threadpool_info()
                      if p["user_api"] == "blas" and layer in (None, p.get("threading_layer")))

    before = blas()
    rng = np.random.default_rng(9)
    x = _unit(rng.normal(size=(4000, 16)).astype(np.float32))
    q = _unit(rng.normal(size=(300, 16)).astype(np.float32))
    want = topk_inner_product(q, x, 5, threads=1)[0]
    during: list[int] = []  # the process-wide (pthreads) BLAS threads while the workers score

    def seen(*_):
        during.extend(n for _, n in blas("pthreads"))

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: topk_inner_product(q, x, 5, query_block=b, threads=2, on_tile=seen)[0],
                            [7, 50, 64, 128] * 3))
    assert blas() == before
    assert during and set(during) == {1}
    for s in got:
        np.testing.assert_allclose(s, want, atol=1e-5)
