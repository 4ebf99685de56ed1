"""Bit rot in an atlas's files, caught where it is read (`engine.store.blocksums`).

A byte that flips in the middle of a vector or index file, its size and mtime kept, passes the
open-time stamp (size, mtime, first and last MiB). Every read checks the blocks it uses against the
hashes recorded when the file was written: a concept's row (`atlas show`, `neighbors`,
`export-steering`) checks the blocks of its rows, a search every block of the index once per
opened store. A damaged block is refused with a one-line error naming the file, the block and
`atlas index verify`; an undamaged file reads as before; a file written before block checksums
opens unchecked, `atlas index verify` says so, and `--fix` records them once the file matches its
recorded sha256. The one-shot commands' plain ``sqlite3`` reader (`engine.store.reader`) runs the
same checks as the full store (`StoreReads`), without importing SQLAlchemy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import update

from engine.align.map import AlignmentMap, save_map
from engine.cli import cli
from engine.errors import IndexIntegrityError
from engine.store.index_location import IndexPlacement
from engine.store.reader import StoreReader, open_reader
from engine.store.schema import AtlasRow
from engine.store.store import AtlasSource, Store
from tests.cli.test_cli_read_imports import _run
from tests.conftest import clustered_directions
from tests.steering.test_steering import D, one_thread, save_tiny_model  # noqa: F401  (one_thread: autouse fixture)

pytestmark = pytest.mark.backends("sqlite", "postgresql")

N, DIM = 3000, 256  # 3 MB of directions: rows past the stamp's first and last MiB exist
ROW = 1500  # a row in the middle of the file (block 1 of the vector file)
QUERY = 5  # a row in block 0, far from the damage


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("subject"))


@pytest.fixture
def big(store, subject_folder):
    """Atlas ``big`` (N × DIM, Flat), subject ``subj`` and map ``m`` from it into ``big``."""
    x = clustered_directions(N, DIM, seed=2)
    store.add_atlas("big", x, source=AtlasSource(model="fdn", layer=1))
    store.add_model("subj", source=str(subject_folder), d_model=D, n_layers=3)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, D)))  # (DIM, D), orthonormal columns
    save_map(store, AlignmentMap(weight=q.T, inverse_weight=q, subject_mean=np.zeros(D), atlas_mean=np.zeros(DIM),
                                 method="procrustes", subject_model="subj", subject_layer=1, atlas="big",
                                 atlas_model="fdn", atlas_layer=1, pairing="token",
                                 metrics={"subject_resid_norm": 5.0}), "m")
    return store, x


def _cli(store: Store, *args: str):
    return CliRunner().invoke(cli, [*args, "--store", str(store.path)])


def _refused(r, file: str, atlas: str = "big") -> None:
    """A one-line error naming the damaged file, a block and the command that checks the atlas."""
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, r.output
    assert f"of atlas '{atlas}'" in line and file in line and "is damaged: block " in line, line
    assert f"`atlas index verify {atlas}`" in line, line


def _flip(path: Path, offset: int, value: bytes) -> None:
    """Overwrite bytes at ``offset`` in place, keeping the file's mtime (what bit rot does)."""
    st = path.stat()
    assert (1 << 20) < offset < st.st_size - (1 << 20), "the damage must be past the stamp's head and tail"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _row_offset(path: Path, row: np.ndarray) -> int:
    found = path.read_bytes().find(np.asarray(row, dtype=np.float32).tobytes())
    assert found > 0
    return found


def _damage_vector_row(store: Store, x: np.ndarray, ordinal: int) -> str:
    """Flip one bit of a float in the middle of row ``ordinal`` of the vector file (a plausible value:
    the row's direction turns a little, nothing a score bound sees); the file's name."""
    rel = store.atlas_files("big")["vectors"]
    path = store.path / rel
    at = _row_offset(path, x[ordinal]) + 4 * (DIM // 2)
    byte = path.read_bytes()[at + 2]
    _flip(path, at + 2, bytes([byte ^ 0x01]))
    return rel


def test_an_undamaged_atlas_reads_as_before_and_verifies_checked(big, tmp_path):
    store, x = big
    assert np.array_equal(store.atlas_rows("big", [QUERY, ROW]), x[[QUERY, ROW]])
    r = _cli(store, "show", f"big/{ROW}", "--json")
    assert r.exit_code == 0 and abs(json.loads(r.output)["norm"] - np.linalg.norm(x[ROW])) < 1e-5, r.output
    assert _cli(store, "neighbors", f"big/{ROW}").exit_code == 0
    r = _cli(store, "export-steering", "m", "-c", f"big/{ROW}", "-o", str(tmp_path / "v.gguf"))
    assert r.exit_code == 0, r.output
    status = store.verify_index("big")
    assert status.ok and status.unchecked == () and status.fixed == ()
    r = _cli(store, "index", "verify", "big")
    assert r.exit_code == 0 and "unchecked" not in r.output, r.output


def test_a_flipped_bit_mid_vector_file_is_refused_by_every_read_of_its_rows(big, tmp_path):
    """`show`, `neighbors` and `export-steering` of a concept in the damaged block refuse; a concept in
    another block still reads (a row read checks its own blocks only)."""
    store, x = big
    rel = _damage_vector_row(store, x, ROW)
    _refused(_cli(store, "show", f"big/{ROW}"), rel)
    _refused(_cli(store, "neighbors", f"big/{ROW}"), rel)
    out = tmp_path / "v.gguf"
    _refused(_cli(store, "export-steering", "m", "-c", f"big/{ROW}", "-o", str(out)), rel)
    assert not out.exists()
    assert _cli(store, "show", f"big/{QUERY}").exit_code == 0  # block 0 is intact
    fresh = Store.open(store.path)
    with pytest.raises(IndexIntegrityError, match=r"is damaged: block 1 \(bytes"):
        fresh.atlas_vectors("big")  # a read of the whole file checks every block
    r = _cli(store, "index", "verify", "big")
    assert r.exit_code == 1 and "PROBLEM" in r.output, r.output


def _damage_index_row(store: Store, x: np.ndarray, ordinal: int, query: np.ndarray) -> str:
    """Lower the score of row ``ordinal`` of the Flat index file for ``query``: the sign of the row's
    component that adds most to it flips (the score stays a cosine); the file's name."""
    rel = store.atlas_files("big")["index"]
    path = store.path / rel
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True))[ordinal]  # as the index holds it
    j = int(np.argmax(unit * query))
    _flip(path, _row_offset(path, unit) + 4 * j, np.float32(-unit[j]).tobytes())
    return rel


def test_a_search_whose_damaged_row_would_score_lower_is_refused(big, tmp_path):
    """The index file: its damaged row would only drop in the ranking (no impossible score shows it)."""
    store, x = big
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, D)))[0]  # the map's inverse weight
    subjects = x[1000:2000] @ q  # subject vectors whose images through the map are near rows 1000-1999
    images = subjects @ q.T
    images /= np.linalg.norm(images, axis=1, keepdims=True)  # the search's unit queries in atlas space
    _, ids = store.search_arrays("big", images, k=1)
    pick = int(np.flatnonzero((ids[:, 0] > 1100) & (ids[:, 0] < 1900))[0])  # a first hit mid-file
    subject, query = subjects[pick], images[pick]
    np.save(tmp_path / "q.npy", subject[None, :].astype(np.float32))
    r = _cli(store, "search", "m", "--vectors", str(tmp_path / "q.npy"), "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    top = int(json.loads(r.output)[0]["ref"].split("/")[1])
    before = store.search_vectors("big", query, k=3)[0]
    assert before[0].ordinal == top == ids[pick, 0]
    rel = _damage_index_row(store, x, top, query)
    _refused(_cli(store, "search", "m", "--vectors", str(tmp_path / "q.npy"), "-k", "3"), rel)
    _refused(_cli(store, "neighbors", f"big/{QUERY}", "-k", "3"), rel)
    fresh = Store.open(store.path)
    with pytest.raises(IndexIntegrityError, match="index of atlas 'big'.*is damaged: block"):
        fresh.search_vectors("big", query, k=3)
    fresh.rebuild_index("big")  # the repair the message names
    assert [h.ordinal for h in Store.open(store.path).search_vectors("big", query, k=3)[0]] == \
        [h.ordinal for h in before]


def test_a_quantised_index_checks_the_vector_rows_it_reranks(store):
    """``rerank=R`` re-scores candidates from the vector file: the blocks of the rows it reads are checked
    (the quantised index itself is intact)."""
    x = clustered_directions(N, DIM, seed=2)
    store.add_atlas("big", x, source=AtlasSource(model="fdn", layer=1), index=IndexPlacement(spec="SQ8|rerank=4"))
    query = x[ROW] / np.linalg.norm(x[ROW])
    assert store.search_vectors("big", query, k=3)[0][0].ordinal == ROW
    _damage_vector_row(store, x, ROW)
    with pytest.raises(IndexIntegrityError, match="vector file of atlas 'big'.*is damaged: block 1 "):
        Store.open(store.path).search_vectors("big", query, k=3)


def _forget_blocks(store: Store) -> None:
    """The row as a store before block checksums wrote it."""
    with store.session() as s:
        s.execute(update(AtlasRow).where(AtlasRow.name == "big").values(vector_blocks=None, index_blocks=None))


def test_a_file_without_block_checksums_still_opens_and_verify_fix_adds_them(big, tmp_path):
    store, x = big
    _forget_blocks(store)
    old = Store.open(store.path)
    assert np.array_equal(old.atlas_rows("big", [ROW]), x[[ROW]])
    assert old.neighbors(f"big/{QUERY}", k=3)
    r = _cli(store, "index", "verify", "big")
    assert r.exit_code == 0 and "big: unchecked" in r.output and "--fix" in r.output, r.output
    assert Store.open(store.path).verify_index("big").unchecked == ("vector", "index")
    r = _cli(store, "index", "verify", "big", "--fix")
    assert r.exit_code == 0 and "block checksums recorded" in r.output, r.output
    status = Store.open(store.path).verify_index("big")
    assert status.ok and status.unchecked == () and status.fixed == ()
    rel = _damage_vector_row(store, x, ROW)  # now caught by its rows' reads
    _refused(_cli(store, "show", f"big/{ROW}"), rel)


def test_verify_fix_records_nothing_for_a_file_that_no_longer_matches(big):
    """``--fix`` records block checksums only for a file whose full sha256 is the one recorded at import:
    a file damaged before the fix stays a problem (and unchecked), never blessed."""
    store, x = big
    _forget_blocks(store)
    _damage_vector_row(store, x, ROW)
    r = _cli(store, "index", "verify", "big", "--fix")
    assert r.exit_code == 1 and "PROBLEM" in r.output and "checksum mismatch" in r.output, r.output
    with store.read_session() as s:
        row = s.query(AtlasRow).filter(AtlasRow.name == "big").one()
        assert row.vector_blocks is None


@pytest.mark.parametrize("damage", ["vector", "index"])
def test_the_plain_sqlite3_reader_refuses_damage_as_the_full_store_does(big, damage):
    """`atlas show` and `neighbors` on a store's own SQLite file read through `StoreReader` (no SQLAlchemy
    import): a flipped bit in the vector file (the concept's row) or the index file (opened by the
    search) is refused there with the same one-line error as through the full store (the same command
    with --db-url naming the file); in one process too, the reader refuses what the store refuses."""
    store, x = big
    if store.dialect != "sqlite":
        pytest.skip("the plain reader serves the store's own SQLite file")
    query = x[ROW] / np.linalg.norm(x[ROW])
    rel = _damage_vector_row(store, x, ROW) if damage == "vector" else _damage_index_row(store, x, ROW, query)
    commands = [["show", f"big/{ROW}"], ["neighbors", f"big/{ROW}"]] if damage == "vector" else \
        [["neighbors", f"big/{QUERY}", "-k", "3"]]
    for command in commands:
        plain, plain_mods = _run(*command, "--store", str(store.path), ok=False)
        full, full_mods = _run(*command, "--store", str(store.path), "--db-url",
                               f"sqlite:///{store.path / 'atlas.db'}", ok=False)
        assert "engine.store.reader" in plain_mods and "sqlalchemy" not in plain_mods
        assert "sqlalchemy" in full_mods and "engine.store.reader" not in full_mods
        line = plain.strip().splitlines()[-1]
        assert line == full.strip().splitlines()[-1], (plain, full)
        assert rel in line and "is damaged: block " in line and "`atlas index verify big`" in line, line
    reader = open_reader(store.path)
    assert isinstance(reader, StoreReader)
    with reader:
        if damage == "vector":
            with pytest.raises(IndexIntegrityError, match=r"vector file of atlas 'big'.*is damaged: block 1 "):
                reader.atlas_rows("big", [ROW])
            with pytest.raises(IndexIntegrityError, match="vector file of atlas 'big'.*is damaged: block"):
                reader.atlas_vectors("big")
            assert np.array_equal(reader.atlas_rows("big", [QUERY]), x[[QUERY]])  # block 0 is intact
        else:
            with pytest.raises(IndexIntegrityError, match="index of atlas 'big'.*is damaged: block"):
                reader.search_vectors("big", query, k=3)
