"""Devices and precision: --device / --dtype plumbing, device_map for models larger than one GPU,
float32 activations from any model dtype, and out-of-memory batches halved and retried.

CPU tests cover the plumbing (bfloat16 on CPU included); tests marked `gpu` run where CUDA exists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import engine.models.activations as acts
import engine.models.devices as devices
from engine.errors import AtlasError, BadValueError
from engine.models.activations import collect
from engine.models.devices import Placement, choose_placement, device_map_kwargs, is_oom, resolve_device
from engine.models.hooks import Site
from engine.models.loading import load_model
from engine.store.store import AtlasSource
from tests.tiny_models import (
    CORPUS,
    one_thread,  # noqa: F401  (autouse fixture)
    save_tiny,
    word_tokenizer,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("dev") / "llama", "llama", word_tokenizer(), d=32, n_layers=3)


def test_device_names(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("CPU")
    with pytest.raises(BadValueError, match="CUDA is not available here.*--device cpu"):
        resolve_device("cuda:1")
    with pytest.raises(BadValueError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(BadValueError, match="auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    with pytest.raises(BadValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(BadValueError, match="cuda:N with N a number"):
        resolve_device("cuda:x")


def test_device_map_auto_only_for_a_model_larger_than_one_of_several_gpus(monkeypatch):
    monkeypatch.setattr(devices, "resolve_device", lambda spec: torch.device("cpu"))
    gb = 1 << 30
    assert choose_placement("auto", 30 * gb, device_memory=[24 * gb, 24 * gb]).device_map == "auto"
    assert choose_placement("auto", 10 * gb, device_memory=[24 * gb, 24 * gb]).device_map is None
    assert choose_placement("auto", 30 * gb, device_memory=[24 * gb]).device_map is None  # one GPU: it fails loudly
    assert choose_placement("cuda:0", 30 * gb, device_memory=[24 * gb, 24 * gb]).device_map is None  # chosen by hand
    assert device_map_kwargs(Placement(torch.device("cpu"))) == {}
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(AtlasError, match="pip install accelerate"):
            device_map_kwargs(Placement(torch.device("cpu"), "auto"))
    else:
        assert device_map_kwargs(Placement(torch.device("cpu"), "auto")) == {"device_map": "auto"}


def test_weights_bytes_reads_the_folder(folder):
    n = devices.weights_bytes(folder)
    assert n and n == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert devices.weights_bytes("some/hub-id") is None


def test_oom_exception_types():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("MPS backend out of memory"))
    assert not is_oom(ValueError("out of range"))


def _batches(model, tok, **kw):
    return list(collect(model, tok, CORPUS * 3, Site((0, 2)), batch_size=8, desc=None, **kw))


def test_an_out_of_memory_batch_is_halved_and_retried(folder, monkeypatch):
    model, tok = load_model(folder)
    want = _batches(model, tok)
    real = acts.forward_to_layers
    sizes = []

    def tight(m, **inputs):  # a device that holds at most 3 texts a pass
        sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(m, **inputs)

    monkeypatch.setattr(acts, "forward_to_layers", tight)
    with pytest.warns(RuntimeWarning, match="retrying with 4 texts"):
        got = _batches(model, tok)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2  # halved until it fits, and kept small afterwards
    assert [b.texts for b in got] == [b.texts for b in want]  # the same batches, whole
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.text_index, w.text_index)
        np.testing.assert_array_equal(g.position, w.position)
        for L in (0, 2):
            torch.testing.assert_close(g.acts[L], w.acts[L], atol=1e-5, rtol=1e-5)

    def never(m, **inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(acts, "forward_to_layers", never)
    with pytest.warns(RuntimeWarning), pytest.raises(AtlasError, match="one text per forward pass"):
        _batches(model, tok)


def test_bfloat16_on_cpu_gives_float32_activations_and_a_map(folder, tmp_path, store):
    model, tok = load_model(folder, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    b = _batches(model, tok)[0]
    assert all(a.dtype == torch.float32 for a in b.acts.values())
    store.add_model("found", source=str(folder), d_model=32, n_layers=3)
    store.add_atlas(
        "atl", np.random.default_rng(0).normal(size=(5, 32)), [f"c{i}" for i in range(5)],
        source=AtlasSource(model="found", layer=2),
    )
    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS).replace(".", "").replace("!", "").split()
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(150)) + "\n")
    from engine.cli import cli

    res = CliRunner().invoke(cli, ["align", str(folder), "--layer", "1", "--atlas", "atl", "--corpus", str(corpus),
                                   "--dtype", "bfloat16", "--device", "cpu", "--json", "-q", "--store",
                                   str(store.path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert np.isfinite(info["metrics"]["heldout_r2"]) and info["subject_model"] == "found"  # found by its folder
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, ["explain", info["name"], "the red fox", "--device", "cuda",
                                       "--store", str(store.path)])
        assert res.exit_code == 1 and "CUDA is not available here" in res.output


@pytest.mark.gpu
@needs_cuda
def test_gpu_activations_match_cpu_and_generation_runs(folder):
    from engine.steering.edits import SteeringEdit
    from engine.steering.generate import GenerationSettings, generate_pair

    cpu = _batches(*load_model(folder))
    model, tok = load_model(folder, device="cuda", dtype="bfloat16")
    gpu = _batches(model, tok)
    for c, g in zip(cpu, gpu):
        assert g.acts[2].device.type == "cpu" and g.acts[2].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(c.acts[2], g.acts[2], dim=1)
        assert cos.mean() > 0.98
    u = np.random.default_rng(0).normal(size=32).astype(np.float32)
    pairs = generate_pair(model, tok, ["the red"], [SteeringEdit(1, u, 2.0, 1.0)],
                          settings=GenerationSettings(5))
    assert pairs[0].steered is not None


@pytest.mark.gpu
@needs_cuda
def test_gpu_oom_is_recovered_for_real(folder):
    model, tok = load_model(folder, device="cuda")
    assert len(_batches(model, tok)) == 3
