"""The trained tiny ConceptWorld: learnability gates, reloading, directions, store registration, CLI.

The world is built once per session by the ``tiny_world`` fixture (tests/conftest.py), or reused
from ``$ATLAS_TEST_CACHE``.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.errors import NotFoundError
from engine.world import build_world, load_world, register_world
from engine.world.config import MANIFEST
from engine.world.gates import measure_model
from tests.tiny_models import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_world):
    return {key: wm.load() for key, wm in tiny_world.models.items()}


def test_world_shape(tiny_world):
    w = tiny_world
    assert (w.size, w.seed, len(w.concepts)) == ("tiny", 0, 10)
    assert [m.architecture for m in w.models.values()] == ["gpt2", "llama", "gpt_neox"]
    f, a, b = w.foundation, w.subject_a, w.subject_b
    assert f.d_model != a.d_model and f.n_layers != a.n_layers
    assert a.tokenizer_fingerprint == f.tokenizer_fingerprint != b.tokenizer_fingerprint
    assert f.atlas_layer == f.n_layers - 1
    assert w.atlas_name == "world-tiny" and f.name == "world-tiny-foundation"
    assert len(w.heldout_docs) == 10 * w.config.n_heldout_per_concept
    assert not {t for t, _ in w.train_docs} & {t for t, _ in w.heldout_docs}
    assert w.path.name == f"world-tiny-{w.fingerprint}" and (w.path / MANIFEST).is_file()


def test_gates_in_the_build_report(tiny_world):
    report = tiny_world.report
    assert [g.model for g in report.models] == ["foundation", "subject_a", "subject_b"]
    assert report.thresholds.min_persistence == 0.6
    assert report.passed, report.failures()


@pytest.mark.parametrize("key", ["foundation", "subject_a", "subject_b"])
def test_gates_measured_again_on_the_reloaded_model(tiny_world, loaded, key):
    """The issue's gates, measured afresh on the saved model: far below unigram perplexity,
    probe >= 0.9, persistence >= 0.6 (tiny)."""
    w = tiny_world
    model, tok = loaded[key]
    wm = w.model(key)
    probe_docs = w.train_docs[: w.config.n_probe_per_concept * len(w.concepts)]
    g = measure_model(key, model, tok, w.train_docs, w.heldout_docs, probe_docs, w.concepts, wm.default_layer,
                      w.config.spec(key).max_length)
    assert g.heldout_perplexity < 0.1 * g.unigram_perplexity, g
    assert g.probe_accuracy >= 0.9, g
    assert g.persistence >= 0.6, g
    stored = next(r for r in w.report.models if r.model == key)
    assert g.heldout_perplexity == pytest.approx(stored.heldout_perplexity, rel=1e-3)
    assert abs(g.persistence - stored.persistence) <= 0.02


def test_models_reload_with_from_pretrained(tiny_world, loaded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    classes = {"foundation": "GPT2LMHeadModel", "subject_a": "LlamaForCausalLM", "subject_b": "GPTNeoXForCausalLM"}
    text = tiny_world.heldout_docs[0][0]
    for key, wm in tiny_world.models.items():
        model = AutoModelForCausalLM.from_pretrained(wm.path).eval()
        tok = AutoTokenizer.from_pretrained(wm.path)
        assert type(model).__name__ == classes[key]
        assert model.config.hidden_size == wm.d_model and model.config.num_hidden_layers == wm.n_layers
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
        assert enc["offset_mapping"].shape[1] == enc["input_ids"].shape[1]
        with torch.no_grad():
            a = model(input_ids=enc["input_ids"]).logits
            b = loaded[key][0](input_ids=enc["input_ids"]).logits
        torch.testing.assert_close(a, b)


def test_concept_directions_are_cached_and_centred(tiny_world):
    w = tiny_world
    for key, wm in w.models.items():
        d = w.concept_directions(key)
        assert d.shape == (10, wm.d_model) and d.dtype == np.float32
        np.testing.assert_allclose(d.sum(0), 0, atol=1e-3 * np.abs(d).max())
        assert (w.path / "directions" / f"{key}-L{wm.default_layer}.safetensors").is_file()
        np.testing.assert_array_equal(w.concept_directions(key, wm.default_layer), d)
    # Topic directions are distinct: no two concepts share a direction.
    d = w.concept_directions("foundation")
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    cos = u @ u.T
    assert cos[~np.eye(10, dtype=bool)].max() < 0.9


def test_prompts_of_the_world(tiny_world):
    w = tiny_world
    assert all(w.plurality_concept(p) is None for p in w.neutral_prompts)
    prompts = w.other_topic_prompts
    assert len(prompts) == 5 * len(w.concepts)
    assert all(w.plurality_concept(t) == k for t, k in prompts)


def test_build_is_reused_by_fingerprint(tiny_world):
    t = time.perf_counter()
    again = build_world("tiny", seed=0, root=tiny_world.path.parent, progress=False)
    assert again.reused and again.path == tiny_world.path and again.fingerprint == tiny_world.fingerprint
    assert time.perf_counter() - t < 10
    assert again.train_docs == tiny_world.train_docs


def test_an_unfinished_world_is_not_loaded(tmp_path, tiny_world):
    half = tmp_path / tiny_world.path.name
    shutil.copytree(tiny_world.path, half)
    (half / MANIFEST).unlink()
    with pytest.raises(NotFoundError, match="not a built world"):
        load_world(half)


def test_register_world_into_a_store(tiny_world, store):
    w = tiny_world
    out = register_world(store, w)
    assert out["atlas"] == "world-tiny" and not out["atlas_existed"]
    info = store.atlas("world-tiny")
    assert (info.model, info.layer, info.dim, info.n_concepts) == (w.foundation.name, w.foundation.atlas_layer,
                                                                     w.foundation.d_model, 10)
    assert store.labels("world-tiny") == [c.label for c in w.concepts]
    for wm in w.models.values():
        m = store.get_model(wm.name)
        assert (m.architecture, m.d_model, m.n_layers) == (wm.architecture, wm.d_model, wm.n_layers)
        assert m.source == str(wm.path) and m.tokenizer_fingerprint == wm.tokenizer_fingerprint
    # Each concept's own direction finds itself first.
    hits = store.search_vectors("world-tiny", w.concept_directions("foundation"), k=1)
    assert [h[0].ordinal for h in hits] == list(range(10))
    assert register_world(store, w)["atlas_existed"]  # idempotent
    assert len(store.atlases()) == 1


def test_cli_world_build_reuses_the_world(tiny_world, tmp_path):
    from engine.cli import cli

    store_dir = tmp_path / "store"
    shutil.copytree(tiny_world.path, store_dir / "models" / tiny_world.path.name)
    res = CliRunner().invoke(cli, ["world", "build", "--size", "tiny", "--store", str(store_dir), "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["reused"] and out["store_created"] and out["atlas"]["name"] == "world-tiny"
    assert out["gate_failures"] == [] and len(out["gates"]["models"]) == 3
    res = CliRunner().invoke(cli, ["world", "build", "--store", str(store_dir)])
    assert res.exit_code == 0, res.output
    assert "reused world-tiny" in res.output and "already registered" in res.output and "all pass" in res.output


def test_cli_world_build_fails_on_a_failed_gate(tiny_world, tmp_path):
    """A world that misses a learnability gate fails `atlas world build` (exit 1, after its report)
    unless --allow-failed-gates; the world stays in the store (issue 25)."""
    from engine.cli import cli
    from engine.world.build import load_world

    store_dir = tmp_path / "store"
    folder = store_dir / "models" / tiny_world.path.name
    shutil.copytree(tiny_world.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["report"]["thresholds"]["min_probe_accuracy"] = 1.01  # no model can reach it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(cli, ["world", "build", "--size", "tiny", "--store", str(store_dir), "--no-sae"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output and "probe accuracy" in res.output and "--allow-failed-gates" in res.output
    res = CliRunner().invoke(cli, ["world", "build", "--size", "tiny", "--store", str(store_dir), "--no-sae", "--json",
                                   "-q"])
    assert res.exit_code == 1 and "--allow-failed-gates" in res.output
    res = CliRunner().invoke(cli, ["world", "build", "--size", "tiny", "--store", str(store_dir), "--no-sae", "--json",
                                   "-q", "--allow-failed-gates"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["gate_failures"]) == 3  # the three models' probes
    world = load_world(folder)
    assert world.report is not None and not world.report.passed


def test_same_weights_in_parallel_and_in_one_process(tmp_path):
    """Training in three processes or one after another gives identical weights (one thread each)."""
    import dataclasses

    from safetensors.torch import load_file

    from engine.world.config import tiny_config

    c = tiny_config()
    c = dataclasses.replace(c, n_train_docs=200, n_heldout_per_concept=2,
                            **{k: dataclasses.replace(c.spec(k), steps=3, warmup_steps=1)
                               for k in ("foundation", "subject_a", "subject_b")})
    worlds = [build_world("tiny", 0, tmp_path / mode, progress=False, config=c, evaluate=False, parallel=par)
              for mode, par in (("parallel", True), ("serial", False))]
    assert worlds[0].fingerprint == worlds[1].fingerprint
    for key in ("foundation", "subject_a", "subject_b"):
        a, b = (load_file(str(w.path / key / "model.safetensors")) for w in worlds)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), key


def test_abandoned_build_folders_are_removed(tmp_path, tiny_world):
    from engine.world.build import _remove_abandoned_builds

    name = tiny_world.path.name
    dead = tmp_path / f".{name}.tmp999999999"  # no such process
    alive = tmp_path / f".{name}.tmp{__import__('os').getpid()}"
    dead.mkdir()
    alive.mkdir()
    _remove_abandoned_builds(tmp_path, name)
    assert not dead.exists() and alive.exists()
