"""A store works from any folder, and after it is copied or moved (docs/design.md §3).

A store with the tiny world inside it (models/), maps and a labelling run is copied to another
place, the original moved away, and every command that loads a model runs from a third folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from engine.cli import cli

pytestmark = pytest.mark.slow


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_a_copied_store_works_from_another_folder(tmp_path, tiny_world, monkeypatch):
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()
    monkeypatch.chdir(a)  # the store is opened by a relative path, as a user does
    run("init", "--store", "store")
    shutil.copytree(tiny_world.path, a / "store" / "models" / tiny_world.path.name)  # the world inside the store
    run("world", "build", "--size", "tiny", "--store", "store", "-q")
    models = json.loads(run("models", "--json", "--store", "store"))
    assert {m["source_kind"] for m in models} == {"store"}
    run("align", "a", "--layer", "1", "--world", "--max-tokens", "3000", "--name", "m1", "--store", "store", "-q")
    run("label", "m1", "--features", "native:tiny", "--name", "r1",
        "--store", "store", "-q")

    shutil.copytree(a / "store", b / "copy")
    (a / "store").rename(a / "gone")  # nothing may point back at the original
    monkeypatch.chdir(c)
    s = ["--store", "../b/copy"]
    assert "PROBLEM" not in run("index", "verify", *s)
    found = json.loads(run("models", "show", "world-tiny-foundation", "--json", *s))
    assert found["source_found"] is True and found["source"].startswith(str((b / "copy").resolve()))
    mp = "m1"
    run("align", "a", "--layer", "0", "--world", "--max-tokens", "3000", *s, "-q")
    out = json.loads(run("explain", mp, "the red apple", "--json", *s))
    assert len(out) >= 3 and out[0]["hits"]
    out = json.loads(run("steer", mp, "--concept", "world-tiny/0", "--prompt", "the", "-n", "8", "--json", *s))
    assert out["outputs"][0]["steered"]
    run("label", mp, "--features", "native:tiny", "--name", "r2", *s, "-q")
    runs = {r["name"]: r for r in json.loads(run("runs", "--json", *s))}
    assert runs["r1"]["status"] == runs["r2"]["status"] == "done"
