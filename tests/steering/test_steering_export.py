"""Steering vectors for other runtimes (llama.cpp GGUF, repeng's GGUF, safetensors): each file is
read back with the `gguf` / `safetensors` readers and its tensors equal what the executor adds."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from engine.align.map import save_map
from engine.cli import cli
from engine.errors import BadValueError
from engine.models.hooks import read_residuals
from engine.models.loading import load_model
from engine.steering.edits import steer
from engine.steering.export import export_steering, steering_vectors
from engine.steering.plan import PlanConcept, SteeringPlan, resolve_plan
from tests.steering.test_steering import D, one_thread, save_tiny_model  # noqa: F401  (one_thread: autouse fixture)
from tests.steering.test_steering_plan import _map, add_atlas_and_subject


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("subject"))


@pytest.fixture
def steer_store(store, subject_folder):
    add_atlas_and_subject(store, subject_folder)
    for L in (0, 1, 2):
        save_map(store, _map(L + 1, L), f"m{L}")
    return store


PLAN = dict(concepts=[PlanConcept("weather", 0.75), PlanConcept("music")], strength=0.5)


def _executor_delta(store, subject_folder, plan, layer):
    """What `steer` adds at ``layer``'s output: steered minus unsteered residual, every position."""
    edits = [e for e in resolve_plan(store, plan).edits if e.layer == layer]
    model, tok = load_model(subject_folder)
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    with torch.no_grad(), read_residuals(model, [layer], prepend=False) as cap:
        model(input_ids=ids)
        base = cap.acts[layer].clone()
        with steer(model, edits):
            model(input_ids=ids)
        return (cap.acts[layer] - base)[0].numpy()  # (T, d)


def test_gguf_tensors_are_what_the_executor_adds(steer_store, subject_folder, tmp_path):
    plan = SteeringPlan("m1", layers=[1, 2], **PLAN)
    out = tmp_path / "cv.gguf"
    export_steering(steer_store, plan, out, "gguf")
    r = gguf.GGUFReader(str(out))
    field = r.get_field("general.architecture")
    assert field is not None and bytes(field.parts[-1]).decode() == "controlvector"
    hint = r.get_field("controlvector.model_hint")
    assert hint is not None and bytes(hint.parts[-1]).decode() == "llama"  # llama.cpp's name of LlamaForCausalLM
    count = r.get_field("controlvector.layer_count")  # cvector-generator: gguf_set_val_i32
    assert count is not None and count.types == [gguf.GGUFValueType.INT32] and int(count.parts[-1][0]) == 2
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert set(tensors) == {"direction.1", "direction.2"}
    for layer in (1, 2):
        delta = _executor_delta(steer_store, subject_folder, SteeringPlan("m1", layers=[1, 2], **PLAN), layer)
        np.testing.assert_allclose(delta, np.broadcast_to(tensors[f"direction.{layer}"], delta.shape), atol=1e-5)
    prov = r.get_field("concept_atlas.maps")
    assert prov is not None and json.loads(bytes(prov.parts[-1]).decode())["2"]["name"] == "m2"


@pytest.mark.parametrize(("architecture", "model_type", "hint"), [
    ("GPTNeoXForCausalLM", "gpt_neox", "gptneox"), ("GPT2LMHeadModel", "gpt2", "gpt2"),
    ("LlamaForCausalLM", "llama", "llama"), ("Qwen2ForCausalLM", "qwen2", "qwen2"), ("PhiForCausalLM", "phi", "phi2"),
    ("SomeNewForCausalLM", "gpt_neox", "gptneox"), ("SomeNewForCausalLM", "brand_new", "brand_new")])
def test_gguf_model_hint_is_llama_cpp_architecture_name(tmp_path, architecture, model_type, hint):
    """llama.cpp's cvector-generator writes the model's GGUF general.architecture (``gptneox``, not HF's
    ``gpt_neox``) and an INT32 layer count; repeng's export_gguf keeps HF's model_type and a UINT32."""
    from engine.steering.export import STEERING_FORMATS, SteeringVectors

    vectors = SteeringVectors({1: np.ones(4, np.float32), 3: np.zeros(4, np.float32)}, model_type, {}, architecture)
    for fmt, want_hint, want_type in (("gguf", hint, gguf.GGUFValueType.INT32),
                                      ("repeng", model_type, gguf.GGUFValueType.UINT32)):
        writer = STEERING_FORMATS.get(fmt)
        assert writer is not None
        writer(vectors, tmp_path / f"{fmt}.gguf")
        r = gguf.GGUFReader(str(tmp_path / f"{fmt}.gguf"))
        assert bytes(r.get_field("controlvector.model_hint").parts[-1]).decode() == want_hint
        count = r.get_field("controlvector.layer_count")
        assert count.types == [want_type] and int(count.parts[-1][0]) == 2


def test_repeng_and_safetensors_carry_the_same_vectors_and_the_provenance(steer_store, tmp_path):
    plan = SteeringPlan("m0", layers=[0, 1], **PLAN)  # block 0: repeng and safetensors can hold it
    want = steering_vectors(steer_store, plan).layers
    export_steering(steer_store, plan, tmp_path / "v.gguf", "repeng")
    r = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    # what repeng's ControlVector.import_gguf reads (repeng/extract.py): model_hint, direction.<layer>
    assert bytes(r.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    got = {int(t.name.split(".")[1]): np.asarray(t.data) for t in r.tensors if t.name.startswith("direction.")}
    assert set(got) == {0, 1}
    for L in got:
        np.testing.assert_array_equal(got[L], want[L])
    export_steering(steer_store, plan, tmp_path / "v.safetensors", "safetensors")
    with safe_open(str(tmp_path / "v.safetensors"), "np") as f:
        meta = f.metadata()
        for L in (0, 1):
            np.testing.assert_array_equal(f.get_tensor(f"layer.{L}"), want[L])
    assert meta["subject_model"] == "subj" and meta["layers"] == "0,1" and meta["method"] == "procrustes"
    assert "typical residual norm" in meta["strength_units"]
    assert {c["label"] for c in json.loads(meta["concepts"])} == {"weather", "music"}
    assert json.loads(meta["maps"])["0"]["sha256"] == steer_store.map_info("m0").sha256


@pytest.mark.parametrize(("change", "message"), [
    (dict(layers=[0], fmt="gguf"), "direction.0 is invalid"),
    (dict(mode="clamp"), "only additive"),
    (dict(positions="new"), "every position"),
    (dict(fmt="onnx"), "unknown steering export format"),
])
def test_what_cannot_be_a_control_vector_is_refused(steer_store, tmp_path, change, message):
    fmt = change.pop("fmt", "gguf")
    plan = SteeringPlan("m1", **(PLAN | change))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadValueError, match=message):
        export_steering(steer_store, plan, out / "x.gguf", fmt)
    assert not list(out.iterdir())  # nothing half-written


def test_cli_exports_a_map_or_a_saved_plan(steer_store, tmp_path):
    out = tmp_path / "cv.gguf"
    r = CliRunner().invoke(cli, ["export-steering", "m1", "-c", "weather", "-s", "0.25", "-o", str(out), "--json",
                                 "--store", str(steer_store.path)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["format"] == "gguf" and [row["layer"] for row in res["layers"]] == [1]
    plan_file = tmp_path / "plan.json"
    SteeringPlan("m1", [PlanConcept("weather", 0.25)]).save(plan_file)
    out2 = tmp_path / "cv2.gguf"
    r = CliRunner().invoke(cli, ["export-steering", str(plan_file), "-o", str(out2), "--store", str(steer_store.path)])
    assert r.exit_code == 0, r.output
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out2)).tensors}
    np.testing.assert_array_equal(a["direction.1"], b["direction.1"])
