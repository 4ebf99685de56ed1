"""One-shot read commands import only what a read needs (issue 26): ``atlas show``, ``neighbors``
and ``lookup --no-semantic`` in a fresh process load neither torch, Alembic nor transformers, and
of the core's command modules only the store commands (`engine.cli.LazyCommands`); listing the
commands still loads every module and plug-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.store.store import AtlasSource

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "alembic", "transformers", "engine.demo"]

PROBE = """
import json, sys
from engine.cli import cli
try:
    cli(sys.argv[1:], prog_name="atlas", standalone_mode=False)
finally:
    print("\\nMODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "alembic", "transformers", "engine"))))
"""


def _run(*args: str) -> tuple[str, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATLAS_QUIET": "1"}
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out, _, mods = res.stdout.rpartition("\nMODULES ")
    return out, set(json.loads(mods))


@pytest.mark.parametrize("command", [["show", "at/3"], ["neighbors", "at/3", "-k", "3"],
                                     ["lookup", "concept", "--no-semantic"]])
def test_a_read_command_imports_no_torch_alembic_or_world(store, command):
    rng = np.random.default_rng(0)
    store.add_atlas("at", rng.normal(size=(20, 8)).astype(np.float32), [f"concept {i}" for i in range(20)],
                    source=AtlasSource(model="found", layer=1))
    out, mods = _run(*command, "--store", str(store.path))
    assert "at/3" in out or "concept" in out
    loaded = {m for m in mods for h in HEAVY if m == h or m.startswith(h + ".")}
    assert not loaded, f"atlas {command[0]} imported {sorted(loaded)}"
    assert "engine.cli.store_cmds" in mods and not {"engine.cli.steer_cmds", "engine.cli.align_cmds"} & mods


def test_listing_the_commands_loads_every_module_and_plugin():
    out, mods = _run("--help")
    assert {"engine.cli.steer_cmds", "engine.cli.plugins.world"} <= mods
    assert all(name in out for name in ("show", "neighbors", "world", "eval", "demo", "serve"))


@pytest.mark.parametrize("command", ["label", "search"])
def test_labelling_and_searching_a_feature_matrix_on_the_cpu_import_no_torch(store, tmp_path, command):
    """A map applied to numpy arrays stays numpy (`engine.align.map`): `atlas label` and `atlas search`
    of a feature matrix never pay torch's import (~1.5 s of a one-shot run)."""
    from engine.align.map import AlignmentMap, save_map

    rng = np.random.default_rng(1)
    store.add_atlas("at", rng.normal(size=(30, 8)).astype(np.float32), [f"concept {i}" for i in range(30)],
                    source=AtlasSource(model="found", layer=1))
    store.add_model("subj", d_model=6)
    amap = AlignmentMap(rng.normal(size=(6, 8)), rng.normal(size=(8, 6)), np.zeros(6), np.zeros(8), "procrustes",
                        subject_model="subj", subject_layer=1, atlas="at", atlas_model="found", atlas_layer=1,
                        metrics={"subject_resid_norm": 1.0, "atlas_resid_norm": 1.0})
    save_map(store, amap, "m")
    np.save(tmp_path / "feats.npy", rng.normal(size=(12, 6)).astype(np.float32))
    args = (["label", "m", "--features", str(tmp_path / "feats.npy"), "-k", "2", "--json"] if command == "label"
            else ["search", "m", "--vectors", str(tmp_path / "feats.npy"), "-k", "2", "--json"])
    out, mods = _run(*args, "--store", str(store.path))
    assert ('"status": "done"' if command == "label" else "concept") in out, out
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}, f"atlas {command} imported torch"
