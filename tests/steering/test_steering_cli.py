"""`atlas steer` through click's CliRunner against a real store with a tiny subject and a map."""

from __future__ import annotations

import json

from click.testing import CliRunner

from engine.cli import cli
from tests.steering.test_steering import one_thread, save_tiny_model  # noqa: F401  (one_thread: autouse fixture)
from tests.steering.test_steering_plan import steer_store, subject_folder  # noqa: F401  (fixtures)


def invoke(store, *args):
    return CliRunner().invoke(cli, [*args, "--store", str(store.path)], catch_exceptions=False)


def test_steer_prints_both_outputs(steer_store):  # noqa: F811
    r = invoke(steer_store, "steer", "m1", "--concept", "weather", "--prompt", "the", "--prompt", "it was the",
               "--strength", "3", "-n", "5")
    assert r.exit_code == 0, r.output
    assert "concept fdn/0 'weather'" in r.output
    assert r.output.count("unsteered: ") == 2 and r.output.count("steered:   ") == 2
    assert "layer 1 (map m1, norm 5)" in r.output and "perplexity" in r.output


def test_steer_json_and_plan_reuse(steer_store, tmp_path):  # noqa: F811
    plan = tmp_path / "plan.json"
    r = invoke(steer_store, "steer", "m1", "-c", "songs and instruments", "-p", "the", "-s", "2", "-l", "1,2",
               "--mode", "clamp", "-n", "4", "--json", "--save-plan", str(plan))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["concepts"][0]["ref"] == "fdn/1" and out["layers"] == [1, 2]
    assert set(out["outputs"][0]) >= {"prompt", "unsteered", "steered"}
    saved = json.loads(plan.read_text())
    assert saved["concepts"][0]["ref"] == "fdn/1" and saved["mode"] == "clamp" and saved["layers"] == [1, 2]
    again = json.loads(invoke(steer_store, "steer", "--plan", str(plan), "-p", "the", "--json").stdout)
    assert again["outputs"] == out["outputs"]
    weaker = json.loads(invoke(steer_store, "steer", "--plan", str(plan), "-p", "the", "-s", "0", "--json").stdout)
    assert weaker["plan"]["strength"] == 0.0 and weaker["plan"]["mode"] == "clamp"


def test_steer_errors_are_one_line(steer_store, tmp_path):  # noqa: F811
    r = invoke(steer_store, "steer", "nope", "-c", "weather", "-p", "the")
    assert r.exit_code == 1 and r.output.strip() == "Error: no map named 'nope'; `atlas maps` lists them"
    r = invoke(steer_store, "steer", "m1", "-c", "weather", "-p", "the", "-l", "0")
    assert r.exit_code == 1 and "no map of 'subj' at layer 0" in r.output
    other = save_tiny_model("gpt2", tmp_path / "other", seed=1)
    steer_store.add_model("other-gpt2", source=str(other))
    r = invoke(steer_store, "steer", "m1", "-c", "weather", "-p", "the", "--model", str(other))
    assert r.exit_code == 1 and "fitted at subj@1/resid_post, not at model 'other-gpt2'" in r.output
    r = invoke(steer_store, "steer", "m1", "-p", "the")
    assert r.exit_code == 2 and "--concept" in r.output


def _report():
    from engine.steering.faithfulness import FaithfulnessRow, SteeringReport

    rows = [FaithfulnessRow("unsteered", "neutral", None, 0.0, 0.1, 2.8, 160),
            FaithfulnessRow("transferred", "neutral", 2, 0.5, 0.88, 5.2, 160, "m2", "ridge", True),
            FaithfulnessRow("native", "neutral", 2, 0.5, 0.98, 5.3, 160, chosen=True)]
    cal = [FaithfulnessRow("transferred", "heldout", 2, 0.5, 0.87, 4.6, 330, "m2", "ridge")]
    chosen = {"map": "m2", "layer": 2, "strength": 0.5, "heldout_faithfulness": 0.87, "native_layer": 2,
              "native_strength": 0.5}
    return SteeringReport(rows, chosen, cal, ["neutral prompts, chosen cells: ..."])


def _against_report():
    from engine.steering.against import AgainstTopicReport, AgainstTopicRow

    rows = [AgainstTopicRow("unsteered", "validation", None, None, (), 0.0, 0.02, 3.0, 4.0, 40),
            AgainstTopicRow("transferred", "validation", "add", "all", (0, 1), 0.25, 0.6, 9.0, 5.0, 40, ("m0", "m1")),
            AgainstTopicRow("unsteered", "test", None, None, (), 0.0, 0.01, 3.1, 4.1, 40),
            AgainstTopicRow("transferred", "test", "add", "all", (0, 1), 0.25, 0.55, 9.5, 5.5, 40, ("m0", "m1"),
                            chosen=True, headline=True, guard="alone")]
    return AgainstTopicReport(rows, summary=["against-topic prompts, test half: transferred 0.550"])


def test_eval_steering_table_and_json(store, monkeypatch):
    import engine.world.eval.against_topic
    import engine.world.eval.steering

    seen, seen_against = {}, {}

    def fake(store, **kw):
        seen.update(kw)
        return _report()

    def fake_against(store, **kw):
        seen_against.update(kw)
        return _against_report()

    monkeypatch.setattr(engine.world.eval.steering, "evaluate_world_steering", fake)
    monkeypatch.setattr(engine.world.eval.against_topic, "evaluate_world_against_topic", fake_against)
    r = invoke(store, "eval", "steering", "--world", "--size", "tiny", "--strengths", "0.5,1", "-l", "2",
               "--modes", "clamp", "--positions", "new", "--against-strengths", "0.5,2")
    assert r.exit_code == 0, r.output
    assert seen["grid"].strengths == (0.5, 1.0) and seen["layers"] == [2] and seen["size"] == "tiny"
    assert seen["grid"].modes == ("add",) and seen["grid"].positions == ("all",)
    assert seen_against["grid"].modes == ("clamp",) and seen_against["grid"].positions == ("new",)
    assert seen_against["grid"].strengths == (0.5, 2.0) and seen_against["layers"] == [2]
    assert "chosen on held-out prompts: m2 (layer 2), strength 0.5" in r.output and "0.8800" in r.output
    assert "against-topic prompts (test half" in r.output and "0.5500" in r.output
    assert "0.6000" not in r.output  # validation rows are in --json only
    rows = json.loads(invoke(store, "eval", "steering", "--world", "--json").stdout)
    assert [(x["direction"], x["prompts"]) for x in rows] == [
        ("unsteered", "neutral"), ("transferred", "neutral"), ("native", "neutral"), ("transferred", "heldout"),
        *[(d, "against_topic") for d in ("unsteered", "transferred", "unsteered", "transferred")]]
    assert {"direction", "layer", "strength", "faithfulness", "perplexity", "chosen", "map"} <= set(rows[1])
    assert {"split", "mode", "positions", "layers", "guard", "perplexity_alone", "headline"} <= set(rows[-1])
    seen_against.clear()
    rows = json.loads(invoke(store, "eval", "steering", "--world", "--json", "--no-against-topic").stdout)
    assert not seen_against and all(x["prompts"] != "against_topic" for x in rows)


def test_eval_group_has_every_evaluation():
    from engine.cli import cli

    assert set(cli.commands["eval"].commands) == {"retrieval", "labelling", "steering"}
