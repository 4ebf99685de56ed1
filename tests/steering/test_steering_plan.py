"""Steering plans resolved through stored alignment maps: concept resolution, per-layer maps,
combining neighbours, JSON round trip, and clear errors for a map of another model or width."""

from __future__ import annotations

import numpy as np
import pytest

from engine.align.map import AlignmentMap, save_map
from engine.errors import FormatError, NotFoundError, SiteMismatchError
from engine.models.loading import load_model
from engine.steering.plan import PlanConcept, SteeringPlan, resolve_concept, resolve_plan, run_plan
from engine.store.store import AtlasSource
from tests.steering.test_steering import D, one_thread, save_tiny_model  # noqa: F401  (one_thread: autouse fixture)

D_ATLAS = 24
LABELS = ["weather", "music", "animals", "fruit", "colours"]
DESCRIPTIONS = ["rain, snow and storms", "songs and instruments", "lions and tigers", "apples and pears",
                "red, blue and green"]


def _map(seed: int, layer: int, subject: str = "subj", d_subject: int = D, norm: float = 5.0) -> AlignmentMap:
    rng = np.random.default_rng(seed)
    big, small = max(d_subject, D_ATLAS), min(d_subject, D_ATLAS)
    q, _ = np.linalg.qr(rng.normal(size=(big, small)))  # (big, small), orthonormal columns
    q = q if d_subject >= D_ATLAS else q.T  # (d_subject, d_atlas), semi-orthogonal
    return AlignmentMap(weight=q, inverse_weight=q.T, subject_mean=np.zeros(d_subject), atlas_mean=np.zeros(D_ATLAS),
                        method="procrustes", subject_model=subject, subject_layer=layer, atlas="fdn",
                        atlas_model="foundation", atlas_layer=1, pairing="token",
                        metrics={"subject_resid_norm": norm, "heldout_r2": 0.5})


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("subject"))


def add_atlas_and_subject(store, subject_folder) -> None:
    """The foundation atlas ``fdn`` (random directions, the labels above) and the subject ``subj``."""
    rng = np.random.default_rng(0)
    store.add_atlas(
        "fdn", rng.normal(size=(len(LABELS), D_ATLAS)).astype(np.float32), LABELS, DESCRIPTIONS,
        source=AtlasSource(model="foundation", layer=1),
    )
    store.add_model("subj", source=str(subject_folder), d_model=D, n_layers=3)


@pytest.fixture
def steer_store(store, subject_folder):
    add_atlas_and_subject(store, subject_folder)
    save_map(store, _map(1, 1), "m1")
    save_map(store, _map(2, 2), "m2")
    return store


def test_plan_json_round_trip(tmp_path):
    plan = SteeringPlan("m1", [PlanConcept("weather", 2.0), "music"], strength=1.5, layers=[1, 2], mode="clamp",
                        positions="new", combine=2, seed=7, do_sample=True, temperature=0.7)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = SteeringPlan.load(path)
    assert again == plan and again.to_dict() == plan.to_dict()
    assert again.concepts[1] == PlanConcept("music")


@pytest.mark.parametrize("bad", [{"mode": "multiply"}, {"positions": "some"}, {"concepts": []}, {"combine": -1},
                                 {"colour": "red"}, {"version": 99}])
def test_bad_plans_are_clear_errors(bad):
    d = SteeringPlan("m1", ["weather"]).to_dict() | bad
    with pytest.raises(FormatError):
        SteeringPlan.from_dict(d)


def test_concepts_by_id_label_and_free_text(steer_store):
    assert resolve_concept(steer_store, "fdn", "fdn/2") == ("fdn/2", "animals")
    assert resolve_concept(steer_store, "fdn", "3") == ("fdn/3", "fruit")
    assert resolve_concept(steer_store, "fdn", "Weather") == ("fdn/0", "weather")
    assert resolve_concept(steer_store, "fdn", "a song on the piano instruments") == ("fdn/1", "music")
    with pytest.raises(NotFoundError, match="atlas lookup"):
        resolve_concept(steer_store, "fdn", "quantum chromodynamics")
    with pytest.raises(SiteMismatchError, match="atlas 'other'"):
        resolve_concept(steer_store, "fdn", "other/1")


def test_resolved_edits_follow_the_inverse_map(steer_store):
    plan = SteeringPlan("m1", [PlanConcept("weather"), PlanConcept("fruit", strength=-1.0)], strength=2.0)
    r = resolve_plan(steer_store, plan)
    assert r.layers == [1] and r.maps == {1: "m1"} and r.norms == {1: 5.0}
    assert [c.ref for c in r.concepts] == ["fdn/0", "fdn/3"] and plan.concepts[0].ref == "fdn/0"
    atlas = steer_store.atlas_vectors("fdn")
    expected = atlas[0] @ _map(1, 1).inverse_weight
    np.testing.assert_allclose(r.edits[0].direction, expected / np.linalg.norm(expected), atol=1e-5)
    assert [(e.layer, e.strength, e.norm) for e in r.edits] == [(1, 2.0, 5.0), (1, -1.0, 5.0)]


def test_several_layers_use_the_map_of_each_layer(steer_store):
    r = resolve_plan(steer_store, SteeringPlan("m1", ["music"], layers=[1, 2]))
    assert r.maps == {1: "m1", 2: "m2"}
    assert resolve_plan(steer_store, SteeringPlan("m1", ["music"], layers=[-1])).maps == {2: "m2"}  # 3 layers
    assert not np.allclose(r.edits[0].direction, r.edits[1].direction)
    with pytest.raises(SiteMismatchError, match=r"layer 0 .*layers \[1, 2\]"):
        resolve_plan(steer_store, SteeringPlan("m1", ["music"], layers=[0]))


def test_combine_averages_nearest_neighbours(steer_store):
    r = resolve_plan(steer_store, SteeringPlan("m1", ["weather"], combine=2))
    neigh = [h.ref for h in steer_store.neighbors("fdn/0", k=2)]
    assert r.concepts[0].neighbours == neigh
    atlas = steer_store.atlas_vectors("fdn", normalized=True)
    rows = [0] + [int(n.split("/")[1]) for n in neigh]
    expected = atlas[rows].mean(0) @ _map(1, 1).inverse_weight
    np.testing.assert_allclose(r.edits[0].direction, expected / np.linalg.norm(expected), atol=1e-5)


def test_native_needs_a_source(steer_store):
    plan = SteeringPlan("m1", ["weather"], direction="native")
    with pytest.raises(NotFoundError, match="native"):
        resolve_plan(steer_store, plan)
    u = np.zeros(D, np.float32)
    u[3] = 2.0
    r = resolve_plan(steer_store, plan, native=lambda label, layer: u if label == "weather" else None)
    np.testing.assert_allclose(r.edits[0].direction, u / 2.0)


def test_run_plan_side_by_side(steer_store):
    plan = SteeringPlan("m1", ["weather"], strength=3.0, max_new_tokens=6)
    run = run_plan(steer_store, plan, ["the", "there was a"])
    assert [p.prompt for p in run.outputs] == ["the", "there was a"]
    assert any(p.steered_ids != p.unsteered_ids for p in run.outputs)
    assert run.subject_model == "subj" and run.perplexity_steered > 0


def test_a_map_of_another_model_or_width_is_a_clear_error(steer_store, tmp_path):
    steer_store.add_model("narrow", d_model=16)
    save_map(steer_store, _map(3, 1, subject="narrow", d_subject=16), "narrow-map")
    model, tok = load_model(save_tiny_model("gpt2", tmp_path / "gpt2"))
    with pytest.raises(SiteMismatchError, match="width 32"):
        run_plan(steer_store, SteeringPlan("narrow-map", ["weather"]), ["the"], model=model, tokenizer=tok)
    with pytest.raises(SiteMismatchError, match="model 'gpt2-other'"):
        run_plan(steer_store, SteeringPlan("m1", ["weather"]), ["the"], model=model, tokenizer=tok,
                 model_name="gpt2-other")


def test_a_saved_plan_records_its_maps_and_atlas_and_refuses_a_changed_map(steer_store, tmp_path):
    from engine.errors import SourceChangedError

    plan = SteeringPlan("m1", ["weather"], layers=[1, 2])
    resolve_plan(steer_store, plan)
    prov = plan.provenance
    assert prov is not None and prov["atlas"] == "fdn"
    assert prov["atlas_vectors_sha256"] == steer_store.atlas("fdn").vector_sha256
    assert prov["maps"] == {"1": {"name": "m1", "sha256": steer_store.map_info("m1").sha256},
                            "2": {"name": "m2", "sha256": steer_store.map_info("m2").sha256}}
    path = tmp_path / "plan.json"
    plan.save(path)
    resolve_plan(steer_store, SteeringPlan.load(path))  # unchanged: resolves as before
    save_map(steer_store, _map(3, 2), "m2", overwrite=True)  # the layer-2 map is refitted
    with pytest.raises(SourceChangedError, match="map 'm2' at layer 2 changed since this plan was saved"):
        resolve_plan(steer_store, SteeringPlan.load(path))
    # a plan of the first version (no provenance) still loads, and is resolved against what is there now
    old = SteeringPlan("m1", ["weather"]).to_dict() | {"version": 1}
    del old["provenance"]
    assert resolve_plan(steer_store, SteeringPlan.from_dict(old)).plan.version == 2
