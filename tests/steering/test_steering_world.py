"""Steering on the tiny ConceptWorld: `atlas eval steering --world` and `atlas steer --native` (slow).

The world is the session's `tiny_world` where conftest provides one (linked into this test's
store, so nothing is trained twice), else built here. The figures asserted are the issue's
bars, which the tiny world clears (measured with the default settings: transferred 0.89 through
the layer-2 ridge map at 0.5 x norm, perplexity 1.9x unsteered; native 0.98; chance is 0.1). The
test sweeps 0.25, 0.5 and 1 x norm instead of the default 7 strengths, and chooses the same cells
(transferred 0.8875, native 0.98125, both at 0.5 x norm; measured 2026-12-04).
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.store import layout
from engine.store.store import Store
from tests.steering.test_steering import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_store(request, tmp_path_factory):
    from engine.world.locate import ensure_registered

    store = Store.init(tmp_path_factory.mktemp("steer-world") / "store")
    try:
        world = request.getfixturevalue("tiny_world")
    except pytest.FixtureLookupError:
        world = None
    path = getattr(world, "path", None)
    if path is not None:  # reuse the session's world: build_world finds it by folder name
        os.symlink(path, store.path / layout.MODELS_DIR / path.name)
    ensure_registered(store, "tiny", 0)
    yield store
    store.close()


def invoke(store, *args):
    return CliRunner().invoke(cli, [*args, "--store", str(store.path)], catch_exceptions=False)


def test_eval_steering_on_the_tiny_world(world_store):
    # a small grid (the default sweeps 7 strengths): 0.5 x norm is where the default grid chose the
    # transferred direction, 0.25 and 1 bracket it; a small against-topic grid as well
    r = invoke(world_store, "eval", "steering", "--world", "--size", "tiny", "--json", "--strengths", "0.25,0.5,1",
               "--modes", "add", "--positions", "all", "--against-strengths", "0.25,1")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    neutral = [x for x in rows if x["prompts"] == "neutral"]
    base = next(x for x in neutral if x["direction"] == "unsteered")
    chosen = {x["direction"]: x for x in neutral if x["chosen"]}
    t, n = chosen["transferred"], chosen["native"]
    assert base["faithfulness"] < 0.25
    assert t["faithfulness"] >= 0.6 and n["faithfulness"] >= 0.85
    assert t["faithfulness"] >= 0.7 * n["faithfulness"]
    assert t["perplexity"] <= 2 * base["perplexity"]
    assert {x["direction"] for x in rows if x["prompts"] == "other_topic"} == {"unsteered", "transferred", "native"}
    assert any(x["prompts"] == "heldout" for x in rows)
    against = [x for x in rows if x["prompts"] == "against_topic"]
    test = [x for x in against if x["split"] == "test"]
    assert {(x["direction"], x["n_layers"] if "n_layers" in x else len(x["layers"]), x["guard"])
            for x in test if x["chosen"]} == {(k, n, g) for k in ("transferred", "native") for n in (1, 3)
                                              for g in ("prompt", "alone")}
    assert {x["mode"] for x in against if x["mode"]} == {"add"} and {x["positions"] for x in against} == {"all", None}


def test_steer_native_and_transferred_on_a_world_subject(world_store):
    maps = [m.name for m in world_store.maps() if m.subject_model.endswith("subject-a")]
    assert maps  # fitted by the evaluation above, or by the world's own alignment
    for extra in ((), ("--native",)):
        r = invoke(world_store, "steer", maps[-1], "-c", "Weather", "-p", "the", "-n", "8", "--json", *extra)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["plan"]["direction"] == ("native" if extra else "transferred")
        assert out["outputs"][0]["steered"] != out["outputs"][0]["unsteered"]
