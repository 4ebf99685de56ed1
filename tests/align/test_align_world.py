"""Retrieval through fitted maps on the trained tiny ConceptWorld (docs/design.md §8): the issue's bar."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from engine.world.eval.retrieval import evaluate_world_retrieval
from tests.tiny_models import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(request):
    try:
        return request.getfixturevalue("tiny_world")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_world fixture (ConceptWorld) is not available")


def test_procrustes_retrieval_on_the_tiny_world(world):
    rows = evaluate_world_retrieval(None, methods=["procrustes", "ridge", "correlation"], world=world, quiet=True)
    a = [r for r in rows if r.subject == world.subject_a.name]
    b = [r for r in rows if r.subject == world.subject_b.name]
    assert {r.pairing for r in a} == {"token"} and {r.pairing for r in b} == {"span", "text"}
    assert {r.layer for r in a} == set(range(world.subject_a.n_layers))
    best_a = max(r.mrr for r in a if r.method == "procrustes")
    assert best_a >= 0.80, [(r.layer, r.mrr) for r in a]
    for r in rows:
        assert 0 < r.mrr <= 1 and 0 <= r.mpp <= 1 and r.n_queries == len(world.concepts)


def test_eval_retrieval_cli_json(world, store):
    from engine.world import register_world

    register_world(store, world)  # the store finds the world through its registered models
    res = CliRunner().invoke(
        __import__("engine.cli", fromlist=["cli"]).cli,
        ["eval", "retrieval", "--world", "--methods", "procrustes", "--subjects", "a", "--layers", "-1", "--json",
         "-q", "--store", str(store.path)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 1
    assert {"subject", "method", "pairing", "layer", "mrr", "mpp", "top1", "top5"} <= set(rows[0])
    assert rows[0]["layer"] == world.subject_a.n_layers - 1
