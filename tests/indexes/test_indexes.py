"""Every index backend (FAISS, Milvus Lite) against exact numpy search on seeded data (ties allowed)."""

from __future__ import annotations

import numpy as np
import pytest

import indexes
from engine.errors import BadValueError
from engine.store.store import AtlasSource, IndexPlacement
from indexes.base import IndexCorruptError, IndexSpecError
from tests.conftest import clustered_directions, index_location


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(x, q, k):
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(params=indexes.backends())
def backend(request) -> str:
    """Each registered backend; Milvus runs on the session's Milvus Lite."""
    return request.param


@pytest.fixture
def new_index(backend, request):
    """``new_index(dim, spec)``: an empty index of the test's backend."""
    uri = request.getfixturevalue("milvus_uri") if backend == "milvus" else None
    made = []

    def make(dim: int, spec: str):
        ix = indexes.create_index(dim, spec, backend, **index_location(backend, uri))
        made.append(ix)
        return ix

    yield make
    for ix in made:
        if isinstance(ix, indexes.MilvusIndex):
            ix.drop()


def test_flat_matches_exact_search_allowing_ties(new_index):
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(500, 24)).astype(np.float32))
    q = _unit(rng.normal(size=(40, 24)).astype(np.float32))
    ids = np.arange(500, dtype=np.int64) * 3 + 7  # ids are the caller's, not positions
    ix = new_index(24, "Flat")
    ix.add(x, ids)
    scores, got = ix.search(q, 10)
    want_s, want_pos = _exact(x, q, 10)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
    # each returned id's true score equals the reported one (ties may reorder equal scores)
    pos = (got - 7) // 3
    np.testing.assert_allclose(np.take_along_axis(q @ x.T, pos, 1), scores, atol=1e-5)
    assert ix.count() == 500


@pytest.mark.parametrize("spec", ["HNSW32", "IVF16,Flat", "HNSW16|efSearch=64", "IVF16,Flat|nprobe=16"])
def test_ann_specs_reach_high_recall_on_structured_vectors(spec, new_index):
    x = _unit(clustered_directions(2000, 32, seed=3))
    q = x[:100] + 0.01
    ix = new_index(32, spec)
    ix.add(x, np.arange(2000))
    _, got = ix.search(q, 10)
    _, want = _exact(x, _unit(q), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.9, recall


def test_round_trip_bytes_and_corruption_detected(tmp_path):
    x = _unit(np.random.default_rng(1).normal(size=(100, 8)).astype(np.float32))
    ix = indexes.create_index(8, "HNSW16")
    ix.add(x, np.arange(100))
    data = ix.save(tmp_path / "a.faiss")
    assert (tmp_path / "a.faiss").read_bytes() == data
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    back = indexes.load_index(data, "HNSW16")
    np.testing.assert_array_equal(back.search(x[:5], 3)[1], ix.search(x[:5], 3)[1])
    with pytest.raises(IndexCorruptError):
        indexes.load_index(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError):
        indexes.load_index(b"not an index at all")


def test_bad_spec_and_shapes_are_clear_errors():
    with pytest.raises(IndexSpecError, match="Bogus"):
        indexes.create_index(8, "Bogus99")
    with pytest.raises(IndexSpecError, match="name=int"):
        indexes.create_index(8, "HNSW16|efSearch")
    with pytest.raises(IndexSpecError, match="unknown index backend"):
        indexes.create_index(8, "Flat", backend="nope")
    ix = indexes.create_index(8, "Flat")
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        ix.add(np.zeros((3, 7), np.float32), np.arange(3))
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        ix.search(np.zeros((1, 9), np.float32), 1)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        indexes.register_backend("faiss", indexes.FaissIndex)


def test_search_pads_with_minus_one_and_ids_survive_reopen(new_index, backend):
    x = _unit(np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32))
    ix = new_index(8, "Flat")
    ix.add(x, np.arange(6) + 100)
    scores, got = ix.search(x[:2], 50)  # k beyond the count: clamped to it
    assert got.shape == (2, 6) and set(got[0]) == set(range(100, 106))
    assert got[0, 0] == 100 and got[1, 0] == 101
    if backend == "milvus":  # a second handle on the same collection sees the same vectors
        back = indexes.MilvusIndex.attach(ix.uri, ix.collection, "Flat")
        assert back.count() == 6
        np.testing.assert_allclose(back.vectors(np.array([103, 100])), x[[3, 0]], atol=1e-6)
        np.testing.assert_array_equal(back.search(x[:2], 3)[1], got[:, :3])


def test_milvus_specs_and_refusals(milvus_uri):
    from indexes.milvus import milvus_params

    assert milvus_params("Flat") == ("FLAT", {}, {})
    assert milvus_params("HNSW32|efConstruction=200,efSearch=448") == (
        "HNSW", {"M": 32, "efConstruction": 200}, {"ef": 448})
    assert milvus_params("IVF64,Flat|nprobe=8") == ("IVF_FLAT", {"nlist": 64}, {"nprobe": 8})
    with pytest.raises(IndexSpecError, match="no index for spec"):
        milvus_params("IVF64,PQ8")
    with pytest.raises(IndexSpecError, match="no search parameter"):
        milvus_params("Flat|nprobe=3")
    with pytest.raises(IndexSpecError, match="collection name"):
        indexes.create_index(8, "Flat", "milvus", uri=milvus_uri, collection="bad-name")
    with pytest.raises(IndexSpecError, match="needs a uri"):
        indexes.create_index(8, "Flat", "milvus")
    with pytest.raises(IndexCorruptError, match="no Milvus collection"):
        indexes.MilvusIndex.attach(milvus_uri, "never_made", "Flat")
    ix = indexes.create_index(8, "Flat", "milvus", uri=milvus_uri, collection="made_once")
    try:
        with pytest.raises(IndexSpecError, match="exists"):
            indexes.create_index(8, "Flat", "milvus", uri=milvus_uri, collection="made_once")
        with pytest.raises(IndexSpecError, match="no bytes"):
            ix.to_bytes()
    finally:
        ix.drop()
    assert "made_once" not in indexes.milvus.collections(milvus_uri)


# ---------------------------------------------------------------------- spec policy: normalised, fits the atlas


@pytest.mark.parametrize(("typed", "stored"), [
    (" Flat", "Flat"), ("Flat|", "Flat"), ("Flat | ", "Flat"), ("IVF16 , Flat", "IVF16,Flat"),
    ("HNSW32 | efSearch = 64 , efConstruction=80", "HNSW32|efSearch=64,efConstruction=80"), (" auto ", "Flat")])
def test_specs_are_stored_normalised(store, typed, stored):
    x = clustered_directions(700, 16, seed=1)
    assert store.add_atlas("a", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec=typed)).index_spec == stored
    assert store.atlas("a").index_spec == stored


@pytest.mark.parametrize(("spec", "n", "needed"), [
    ("PQ8", 300, 9984), ("IVF64,Flat", 2000, 2496), ("OPQ8,IVF64,PQ8", 2000, 9984), ("IVF16,PQ4x4", 600, 624)])
def test_specs_whose_training_needs_more_vectors_are_refused_with_the_number(store, capfd, spec, n, needed):
    """FAISS's k-means wants 39 points per centroid; below that it prints a warning per clustering (408 lines
    for OPQ8,IVF64,PQ8 on 2,000 vectors) and builds a useless quantizer. The import says how many are needed,
    and FAISS prints nothing."""
    from click.testing import CliRunner

    from engine.cli import cli

    x = clustered_directions(n, 16, seed=2)
    with pytest.raises(BadValueError, match=f"needs at least {needed:,} vectors to train.*has {n:,}"):
        store.add_atlas("a", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec=spec))
    assert "a" not in [a.name for a in store.atlases()]
    np.save(store.path.parent / "x.npy", x)
    r = CliRunner().invoke(cli, ["import-sae", str(store.path.parent / "x.npy"), "--model", "m", "--layer", "0",
                                 "--name", "a", "--index-spec", spec, "--store", str(store.path)])
    assert r.exit_code == 1 and f"needs at least {needed:,} vectors" in r.output and "Traceback" not in r.output
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "training points" not in out + err


def test_a_trained_spec_with_enough_vectors_builds_without_faiss_warnings(store, capfd):
    x = clustered_directions(624, 16, seed=3)  # exactly 39 × 16 for IVF16 and PQ4x4's 16 codes
    info = store.add_atlas("a", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="IVF16,PQ4x4|nprobe=16"))
    assert info.index_spec == "IVF16,PQ4x4|nprobe=16" and store.verify_index("a").ok
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "training points" not in out + err


def test_a_spec_beyond_the_machines_memory_is_refused_before_any_build(store):
    """``HNSW99999`` keeps 2 × 99,999 neighbours (800 KB) per vector: on enough vectors to pass this machine's
    memory it is refused with its estimate, not built into a MemoryError."""
    from indexes.policy import MEMORY_FRACTION, index_memory_bytes, machine_memory_bytes

    have = machine_memory_bytes()
    if have is None:
        pytest.skip("the OS does not say how much memory this machine has")
    n = int(MEMORY_FRACTION * have / (8 * 99_999)) + 1_000
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    assert index_memory_bytes("HNSW99999", n, 4) > MEMORY_FRACTION * have
    with pytest.raises(BadValueError, match=r"HNSW99999.*needs about [\d.]+ GiB of memory"):
        store.add_atlas("big", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="HNSW99999"))
    assert store.atlases() == []


def test_the_label_index_policy_and_its_nprobe_choice():
    """Flat up to 20,000 labels, IVF (float16 lists) above with enough vectors per list to train; the
    chosen nprobe is the smallest whose search finds the target share of the exact top 10."""
    from indexes.exact import topk_inner_product
    from indexes.policy import LABEL_FLAT_MAX, choose_label_index_spec, choose_nprobe

    assert choose_label_index_spec(LABEL_FLAT_MAX) == "Flat"
    assert choose_label_index_spec(LABEL_FLAT_MAX + 1) == "IVF512,SQfp16"
    assert choose_label_index_spec(1_000_000) == "IVF4096,SQfp16"
    for n in (20_001, 35_000, 39_935, 100_000, 3_000_000):
        n_lists = int(choose_label_index_spec(n).split(",")[0][3:])
        assert 39 * n_lists <= n and n_lists & (n_lists - 1) == 0, n
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + 0.1 * rng.normal(size=(100, 16)).astype(np.float32)
    index = indexes.create_index(16, "IVF64,Flat")
    index.train(x)
    index.add(x, np.arange(len(x), dtype=np.int64))
    data = index.to_bytes()
    _, exact = topk_inner_product(q, x, 10)
    nprobe, recall = choose_nprobe(lambda n: indexes.load_index(data, f"IVF64,Flat|nprobe={n}"), q, exact,
                                   target=0.9, candidates=(1, 2, 4, 8, 16, 64))
    below = choose_nprobe(lambda n: indexes.load_index(data, f"IVF64,Flat|nprobe={n}"), q, exact, target=0.9,
                          candidates=(nprobe // 2,))[1] if nprobe > 1 else 0.0
    assert recall >= 0.9 > below and 1 < nprobe < 64
    assert choose_nprobe(lambda n: indexes.load_index(data, f"IVF64,Flat|nprobe={n}"), q, exact,
                         candidates=(64,)) == (64, 1.0)  # every list: exact
