"""Labelling on ConceptWorld (tiny): native directions as a feature source, and the accuracy eval.

Slow: the first use of `tiny_world` trains the world's models (minutes on a busy machine; set
ATLAS_TEST_CACHE to keep it across sessions), and a Procrustes map is fitted per subject.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine.align.map import load_map
from engine.cli import cli
from engine.labelling.export import iter_labels
from engine.labelling.sources import open_feature_source
from engine.world.eval.labelling import evaluate_world_labelling

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_store(tiny_world, tmp_path_factory):
    """One store for the module: the evaluation fits its maps once, and later evaluations reuse them
    (which the first test checks)."""
    from engine.store.store import Store
    from engine.world import register_world

    store = Store.init(tmp_path_factory.mktemp("labelling-world") / "store")
    register_world(store, tiny_world)
    yield store, tiny_world
    store.close()


def test_eval_labelling_fits_maps_and_reads_the_runs_it_wrote(world_store):
    store, world = world_store
    rows = evaluate_world_labelling(store, size="tiny", seed=0, quiet=True)
    by_subject = {r.subject: r for r in rows}
    assert set(by_subject) == {world.subject_a.name, world.subject_b.name}
    a = by_subject[world.subject_a.name]
    assert a.method == "procrustes" and a.n == len(world.concepts)
    assert a.top1 >= 0.75 and a.top5 >= a.top1  # tiny aligns with topic MRR ~0.98 at the top layer

    # the accuracy is that of the stored run: recount it from the labels
    labels = list(iter_labels(store, a.run))
    truth = [c.label for c in world.concepts]
    assert np.mean([fl.hits[0].label == truth[fl.feature] for fl in labels]) == pytest.approx(a.top1)

    # the features of that run are the subject's own directions at the map's layer
    run = store.run(a.run)
    src = open_feature_source(run.feature_source, store=store, amap=load_map(store, a.map))
    assert src.kind == "native" and run.feature_source == "native:tiny:0"
    np.testing.assert_allclose(src.vectors, world.concept_directions("subject_a", a.layer), atol=1e-6)
    assert src.fingerprint == run.fingerprint  # re-reading gives the same features: resume works

    # a second evaluation reuses the maps (none refitted) and replaces its runs
    again = evaluate_world_labelling(store, size="tiny", seed=0, quiet=True)
    assert [(r.map, r.top1) for r in again] == [(r.map, r.top1) for r in rows]


def test_eval_labelling_cli_json(world_store):
    store, world = world_store
    r = CliRunner().invoke(cli, ["eval", "labelling", "--world", "--size", "tiny", "--features", "native", "--json",
                                 "--quiet", "--store", str(store.path)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {row["subject"] for row in rows} == {world.subject_a.name, world.subject_b.name}
    assert all({"subject", "method", "n", "top1", "top5"} <= row.keys() for row in rows)
