"""The store's files and removals: owned file names, names that cannot collide, cascades, gc, modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from engine.align.map import AlignmentMap, save_map
from engine.cli import cli
from engine.errors import BadNameError, InUseError
from engine.labelling.run import label_features
from engine.store.schema import FeatureLabelRow, LabelRunRow
from engine.store.store import AtlasSource, Store
from tests.conftest import clustered_directions

pytestmark = pytest.mark.backends("sqlite", "postgresql")


def _map(store, name="m", atlas="a", seed=0):
    rng = np.random.default_rng(seed)
    amap = AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16), "procrustes",
                        subject_model="subj", subject_layer=1, atlas=atlas, atlas_model="x", atlas_layer=1,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    return save_map(store, amap, name)


@pytest.fixture
def labelled_store(store, tmp_path):
    """Atlas `a`, map `m` onto it with runs `r1`, `r2`; atlas `other` with map `m2` and run `r3`."""
    store.add_atlas("a", clustered_directions(100, 16, seed=1), source=AtlasSource(model="x", layer=1))
    store.add_atlas("other", clustered_directions(50, 16, seed=2), source=AtlasSource(model="x", layer=1))
    store.add_model("subj", d_model=8)
    _map(store)
    _map(store, "m2", "other", seed=1)
    np.save(tmp_path / "f.npy", np.random.default_rng(3).normal(size=(30, 8)).astype(np.float32))
    for run, m in (("r1", "m"), ("r2", "m"), ("r3", "m2")):
        label_features(store, m, str(tmp_path / "f.npy"), k=4, name=run, quiet=True)
    return store


def _label_rows(store, run=None):
    with store.read_session() as s:
        q = select(func.count()).select_from(FeatureLabelRow)
        if run:
            q = q.join(LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id).where(LabelRunRow.name == run)
        return s.scalar(q)


def test_names_that_look_like_other_files_never_share_them(store):
    """`X.labels` once overwrote X's label index: every file name is <name>@<pid>-<token>.<ext>."""
    names = ["X", "X.labels", "X.labels.faiss", "X.faiss", "X.safetensors", "X-1", "x"]
    for i, name in enumerate(names):
        store.add_atlas(name, clustered_directions(30, 8, seed=i), source=AtlasSource(model="m", layer=0))
    files = [f for n in names for f in store.atlas_files(n).values()]
    assert len(set(files)) == len(files) and all(store.verify_index(n).ok for n in names)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(store.atlas_vectors(name), clustered_directions(30, 8, seed=i))


def test_long_multibyte_names_are_refused_cleanly_or_work():
    with pytest.raises(BadNameError, match="200 bytes"):
        from engine.util import check_name

        check_name("漢" * 80, "atlas")  # 80 characters, 240 bytes


def test_a_name_of_200_bytes_works_end_to_end(store):
    name = "漢" * 66 + "ab"  # 200 bytes: the longest name; its files stay under 255 bytes
    store.add_atlas(name, clustered_directions(20, 8), source=AtlasSource(model="m", layer=0))
    assert store.verify().ok and store.neighbors(f"{name}/0", k=2)
    assert all(len(Path(f).name.encode()) < 255 for f in store.atlas_files(name).values())
    store.rebuild_index(name, "HNSW8")
    store.remove_atlas(name)
    assert store.claimed_files() == set() and store.verify().ok


def test_map_remove_refuses_while_runs_depend_and_cascade_says_what_went(labelled_store):
    s = labelled_store
    before = _label_rows(s)
    with pytest.raises(InUseError, match=r"2 labelling run\(s\) \(r1, r2\) with 240 label rows.*--cascade"):
        s.remove_map("m")
    assert [m.name for m in s.maps()] == ["m", "m2"] and _label_rows(s) == before  # nothing went
    assert s.map_dependents("m").runs == ["r1", "r2"]
    gone = s.remove_map("m", cascade=True)
    assert (gone.maps, gone.runs, gone.n_labels) == (["m"], ["r1", "r2"], 240)
    assert [r.name for r in s.runs()] == ["r3"] and _label_rows(s) == _label_rows(s, "r3") == 120
    assert s.verify().ok and not s.leftovers()


def test_atlas_remove_refuses_while_maps_depend_and_cascades_set_based(labelled_store):
    s = labelled_store
    with pytest.raises(InUseError, match=r"1 map\(s\) \(m\) and 2 labelling run\(s\) \(r1, r2\).*--cascade"):
        s.remove_atlas("a")
    gone = s.remove_atlas("a", cascade=True)
    assert (gone.atlases, gone.maps, gone.runs, gone.n_labels) == (["a"], ["m"], ["r1", "r2"], 240)
    assert [a.name for a in s.atlases()] == ["other"] and [m.name for m in s.maps()] == ["m2"]
    assert _label_rows(s) == 120 and s.verify().ok and not s.leftovers()
    s.remove_map("m2", cascade=True)
    s.remove_atlas("other")  # nothing depends on it any more: no --cascade needed
    assert s.claimed_files() == set() and _label_rows(s) == 0


def test_cli_remove_says_what_would_go_and_what_went(labelled_store):
    root = str(labelled_store.path)
    r = CliRunner().invoke(cli, ["remove", "a", "--store", root])
    assert r.exit_code == 1 and "r1, r2" in r.output and "--cascade" in r.output
    r = CliRunner().invoke(cli, ["remove", "a", "--cascade", "--store", root])
    assert r.exit_code == 0 and r.output.strip() == (
        "removed atlas a, 1 map(s) (m), 2 labelling run(s) (r1, r2) with 240 label rows")


def test_rebuild_switches_to_a_new_file_and_removes_the_old(store):
    store.add_atlas("a", clustered_directions(300, 16), source=AtlasSource(model="m", layer=0))
    old = store.atlas_files("a")["index"]
    status = store.rebuild_index("a", "HNSW16")
    new = store.atlas_files("a")["index"]
    assert status.ok and new != old and not (store.path / old).exists() and (store.path / new).is_file()
    assert Store.open(store.path).atlas("a").index_spec == "HNSW16"


def test_leftovers_are_reported_and_gc_removes_only_what_nobody_owns(store):
    store.add_atlas("a", clustered_directions(40, 8), source=AtlasSource(model="m", layer=0))
    claimed = store.claimed_files()
    store._indexes.clear()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    try:
        files = {
            f"vectors/a@{dead_pid}-0123456789ab.safetensors": "orphan",  # a killed import's file
            f"indexes/.{dead_pid}.abc_123.tmp": "orphan",  # a killed write's temporary file
            f"indexes/b@{sleeper.pid}-0123456789ab.faiss": "in progress",  # a running import's file
            "maps/old-style.safetensors": "unknown",  # nothing says who wrote it
        }
        for rel in files:
            (store.path / rel).write_bytes(b"x")
        old = store.path / "maps/very-old.safetensors"
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        report = store.verify()
        got = {x.file: x.state for x in report.leftovers}
        assert got == {**files, "maps/very-old.safetensors": "unknown"}
        assert not report.ok and "`atlas gc`" in report.problems[-1]
        r = CliRunner().invoke(cli, ["index", "verify", "--store", str(store.path)])
        assert r.exit_code == 1 and "atlas gc" in r.output
        r = CliRunner().invoke(cli, ["gc", "--dry-run", "--store", str(store.path)])
        assert r.exit_code == 0 and "3 leftover file(s) to remove" in r.output
        removed = {x.file for x in store.gc()}
        assert removed == {f for f, st in files.items() if st == "orphan"} | {"maps/very-old.safetensors"}
        left = {str(p.relative_to(store.path)) for d in ("vectors", "indexes", "maps") for p in (store.path / d).iterdir()}
        assert left == claimed | {f"indexes/b@{sleeper.pid}-0123456789ab.faiss", "maps/old-style.safetensors"}
        assert store.verify_index("a").ok
    finally:
        sleeper.kill()
        sleeper.wait()
    assert {x.file for x in store.gc(grace_s=0)} == {f"indexes/b@{sleeper.pid}-0123456789ab.faiss",
                                                    "maps/old-style.safetensors"}
    assert store.verify().ok


def test_every_store_file_follows_the_umask_like_the_database(tmp_path):
    old = os.umask(0o027)
    try:
        s = Store.init(tmp_path / "st")
        s.add_atlas("a", clustered_directions(20, 16), source=AtlasSource(model="m", layer=0))
        s.add_model("subj", d_model=8)
        _map(s, atlas="a")
        s.rebuild_index("a", "Flat")
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE((s.path / f).stat().st_mode) for f in ["atlas.db", *s.claimed_files()]}
    assert set(modes.values()) == {0o640}, modes


@pytest.mark.skipif(not __import__("engine.atlas.lookup", fromlist=["x"]).semantic_available(),
                    reason="the `semantic` extra is not installed")
def test_an_atlas_named_x_labels_leaves_x_s_label_index_alone(store):
    from engine.atlas.lookup import build_label_index, lookup

    store.add_atlas(
        "X", clustered_directions(3, 8), ["rain and storms", "cats", "music"],
        source=AtlasSource(model="m", layer=0),
    )
    build_label_index(store, "X")
    before = [h.ref for h in lookup(store, "thunderstorm", k=2)]
    store.add_atlas("X.labels", clustered_directions(5, 8, seed=1), source=AtlasSource(model="m", layer=0))
    assert store.verify().ok and [h.ref for h in lookup(store, "thunderstorm", k=2)] == before
    label_file = store.atlas_files("X")["labels"]
    build_label_index(store, "X")  # re-embedding replaces the file: new one claimed, old one gone
    assert not (store.path / label_file).exists() and store.verify().ok
    store.remove_atlas("X")
    assert store.verify().ok and not store.leftovers()


def test_verify_checks_map_files(labelled_store):
    s = labelled_store
    path = s.path / s.map_info("m").file
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    report = s.verify()
    assert not report.ok and any("map m" in p and "checksum" in p for p in report.problems)
    path.unlink()
    assert any("missing" in p for p in s.verify().problems)


@pytest.mark.parametrize("point", ["add_atlas.vectors_written", "add_atlas.index_written", "rebuild.file_written",
                                   "save_map.file_written"])
def test_gc_with_no_grace_keeps_the_files_of_a_write_in_progress(store, monkeypatch, point):
    """`gc --grace 0` run by another opener while a write is between its files and its commit:
    the writer has claimed its files (a claim row, before the first one), so gc keeps them and the
    write commits whole."""
    import engine.store.atlases as atlases_mod
    import engine.store.maps as maps_mod

    store.add_model("subj", d_model=8)
    store.add_atlas("a", clustered_directions(40, 16), source=AtlasSource(model="x", layer=1))
    removed: list[str] = []

    def gc_now(name: str) -> None:
        if name == point:
            with Store.open(store.path, db_url=store.engine.url.render_as_string(hide_password=False)) as other:
                time.sleep(0.01)  # the files are older than the grace
                removed.extend(x.file for x in other.gc(grace_s=0))

    monkeypatch.setattr(atlases_mod, "failpoint", gc_now)
    monkeypatch.setattr(maps_mod, "failpoint", gc_now)
    if point.startswith("add_atlas"):
        store.add_atlas("b", clustered_directions(40, 16, seed=3), source=AtlasSource(model="x", layer=1))
    elif point.startswith("rebuild"):
        store.rebuild_index("a", "HNSW16")
    else:
        _map(store, atlas="a")
    assert removed == []
    fresh = Store.open(store.path, db_url=store.engine.url.render_as_string(hide_password=False))
    try:
        assert fresh.verify().ok, fresh.verify().problems
    finally:
        fresh.close()
    # once committed, the claim is gone: nothing is left for gc, and the files stay claimed by rows
    assert store.gc(grace_s=0) == [] and store.verify().ok


def test_gc_drops_the_claims_of_writers_that_are_gone_and_keeps_other_hosts_claims(store):
    from engine.store import layout
    from engine.store.schema import WriteClaimRow

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    with store.session() as s:
        s.add(WriteClaimRow(token=f"{dead}-0123456789ab", host=layout.host_tag(), pid=dead))
        s.add(WriteClaimRow(token=f"{dead}-ba9876543210", host="0000abcd", pid=dead))  # a writer elsewhere
    (store.path / f"vectors/a@{dead}-0123456789ab.safetensors").write_bytes(b"x")  # killed while writing
    (store.path / f"vectors/b@{dead}-ba9876543210.safetensors").write_bytes(b"x")  # still running elsewhere
    assert {x.file for x in store.gc(grace_s=0)} == {f"vectors/a@{dead}-0123456789ab.safetensors"}
    assert set(store.write_claims()) == {f"{dead}-ba9876543210"}
    assert [x.state for x in store.leftovers(grace_s=0)] == ["in progress"]


def test_a_map_saved_over_another_is_created_when_it_was_saved(store):
    store.add_model("subj", d_model=8)
    store.add_atlas("a", clustered_directions(20, 16), source=AtlasSource(model="x", layer=1))
    first = _map(store, atlas="a").created_at
    time.sleep(0.05)
    rng = np.random.default_rng(5)
    amap = AlignmentMap(rng.normal(size=(8, 16)), rng.normal(size=(16, 8)), np.zeros(8), np.zeros(16), "procrustes",
                        subject_model="subj", subject_layer=1, atlas="a", atlas_model="x", atlas_layer=1,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    second = save_map(store, amap, "m", overwrite=True)
    assert second.created_at > first and store.map_info("m").created_at == second.created_at


def test_a_database_with_corrupted_pages_refuses_writes_as_it_refuses_reads(tmp_path):
    s = Store.init(tmp_path / "st")
    s.add_atlas("a", clustered_directions(3000, 16), [f"label {i}" for i in range(3000)],
                source=AtlasSource(model="m", layer=0))
    s.close()
    db = tmp_path / "st" / "atlas.db"
    import sqlite3

    con = sqlite3.connect(db)
    page = con.execute("PRAGMA page_size").fetchone()[0]
    leaves = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = 'concepts' AND pagetype = 'leaf'")]
    con.close()
    data = bytearray(db.read_bytes())
    for p in leaves[len(leaves) // 2 : len(leaves) // 2 + 3]:  # three pages of concept rows, as bit rot would
        data[(p - 1) * page + 200 : (p - 1) * page + 1200] = os.urandom(1000)
    db.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["atlases", "--store", str(tmp_path / "st")])
    assert r.exit_code == 1 and "not a readable store database" in r.output, r.output
    np.save(tmp_path / "new.npy", clustered_directions(10, 16, seed=4))
    r = CliRunner().invoke(cli, ["import-sae", str(tmp_path / "new.npy"), "--model", "m", "--layer", "0", "--name",
                                 "b", "--store", str(tmp_path / "st")])
    assert r.exit_code == 1 and "not a readable store database" in r.output and "Traceback" not in r.output, r.output
    assert not list((tmp_path / "st" / "vectors").glob("b@*"))


@pytest.mark.parametrize("blocks", ["recorded", "none"])
def test_a_flipped_exponent_mid_index_is_refused_at_search_time_not_shown(store, blocks):
    """Bit rot inside an index file, its size and mtime kept (the cheap open check cannot see it): the
    index's block checksums refuse it when it is opened (tests/store/test_block_checksums.py); on a row
    written before block checksums, a hit whose score no unit vectors can give is refused. Both name the
    command that checks the files."""
    from sqlalchemy import update

    from engine.errors import IndexIntegrityError
    from engine.store.schema import AtlasRow

    x = clustered_directions(3000, 256, seed=2)
    store.add_atlas("big", x, source=AtlasSource(model="m", layer=0))
    if blocks == "none":
        with store.session() as s:
            s.execute(update(AtlasRow).where(AtlasRow.name == "big").values(index_blocks=None))
    ordinary = [h.ordinal for h in store.neighbors("big/5", k=3)]
    store._indexes.clear()
    path = store.path / store.atlas_files("big")["index"]
    st = path.stat()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    row = path.read_bytes().find(unit[1500].astype(np.float32).tobytes())  # mid-file: past the stamp's head
    assert row > 1 << 20 and row + (1 << 20) < st.st_size
    j = int(np.argmax(unit[5]))  # the query's largest component: the damaged row scores 1e35 times it
    with open(path, "r+b") as f:
        f.seek(row + 4 * j)
        f.write(np.float32(1e35).tobytes())  # one float's exponent bits: what a few flipped bits give
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    refusal = "impossible for unit vectors" if blocks == "none" else "is damaged: block 1 "
    with pytest.raises(IndexIntegrityError, match=f"{refusal}.*atlas index verify big"):
        store.neighbors("big/5", k=3)
    assert not store.verify_index("big").ok  # the full check names it
    store.rebuild_index("big")
    assert [h.ordinal for h in store.neighbors("big/5", k=3)] == ordinary


def test_an_index_build_out_of_memory_is_a_one_line_error_and_leaves_no_file(tmp_path):
    """A spec that passes the memory estimate but not the memory the process may have (a limit here):
    the build's MemoryError is the user's one-line `BadValueError`, and the write leaves nothing."""
    script = f"""
import resource, sys, numpy as np
from pathlib import Path
from engine.errors import BadValueError
from engine.store.index_location import IndexPlacement
from engine.store.store import AtlasSource, Store
s = Store.init(Path({str(tmp_path / "st")!r}))
x = np.random.default_rng(0).normal(size=(20000, 8)).astype(np.float32)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (60 << 20), resource.RLIM_INFINITY))
try:
    s.add_atlas("h", x, source=AtlasSource(model="m", layer=0), index=IndexPlacement(spec="HNSW512"))
except BadValueError as e:
    print("refused:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 0 and "refused: index spec 'HNSW512' ran out of memory" in r.stdout, (r.stdout, r.stderr[-800:])
    with Store.open(tmp_path / "st") as s:
        assert s.atlases() == [] and s.verify().ok
