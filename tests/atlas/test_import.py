"""Importers on fixtures written in each real format: SAELens, Gemma Scope, matrices, label files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.atlas.importers import import_atlas, read_gemmascope, read_saelens
from engine.atlas.labels import read_labels
from engine.errors import FormatError, ShapeError
from engine.store import layout
from engine.store.store import AtlasSource
from tests.conftest import NEURONPEDIA_LABELS


def test_saelens_folder_with_neuronpedia_labels(store, saelens_folder, neuronpedia_export):
    info = import_atlas(store, "g12", saelens_folder, labels=neuronpedia_export)
    assert (info.model, info.layer, info.hook, info.dim, info.n_concepts) == ("gemma-2-2b", 12, "resid_post", 32, 200)
    assert info.n_labelled == len(NEURONPEDIA_LABELS) and info.has_encoder and info.source_kind == "saelens"
    assert store.concept("g12/0").label == "weather and rain"  # first explanation kept
    assert store.concept("g12/7").label == "programming languages"
    assert store.concept("g12/5").labelled is False
    assert store.concept("g12/3").density == pytest.approx(0.01)
    weights = load_file(str(saelens_folder / "sae_weights.safetensors"))
    tensors = store.atlas_tensors("g12")
    np.testing.assert_array_equal(tensors[layout.DIRECTIONS_KEY], weights["W_dec"])
    np.testing.assert_array_equal(tensors["W_enc"], weights["W_enc"])


def test_saelens_v6_metadata_block(tmp_path):
    folder = tmp_path / "sae6"
    folder.mkdir()
    save_file({"W_dec": np.ones((4, 8), np.float32)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"d_in": 8, "d_sae": 4, "architecture": "jumprelu",
         "metadata": {"model_name": "llama-3.1-8b", "hook_name": "blocks.20.hook_resid_pre"}}))
    sae = read_saelens(folder)
    assert (sae.model, sae.layer, sae.hook) == ("llama-3.1-8b", 20, "resid_pre")


def test_gemmascope_params_npz(store, tmp_path):
    d_in, d_sae = 16, 50
    rng = np.random.default_rng(0)
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    np.savez(folder / "params.npz", w_enc=w_dec.T.copy(), w_dec=w_dec, b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.1, np.float32))
    assert read_gemmascope(folder).layer == 5
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label,description\n0,rain,talk of rain\n3,cats,\n")
    info = import_atlas(
        store, "gs", folder / "params.npz", labels=labels, site=AtlasSource(model="gemma-2-2b"),
    )
    assert (info.layer, info.n_concepts, info.n_labelled, info.source_kind) == (5, 50, 2, "gemmascope")
    assert store.concept("gs/0").description == "talk of rain"
    np.testing.assert_allclose(store.atlas_tensors("gs")["threshold"], 0.1)


def test_gemmascope_negative_thresholds_gate_relu(tmp_path):
    """Gemma Scope's JumpReLU (its tutorial's ``JumpReLUSAE.encode``) is ``(pre > threshold) · relu(pre)``:
    a negative threshold never lets a negative activation through."""
    from engine.atlas.encoder import AtlasEncoder

    rng = np.random.default_rng(1)
    w_enc, b_enc = rng.normal(size=(8, 20)).astype(np.float32), rng.normal(size=20).astype(np.float32)
    thr = rng.normal(scale=0.8, size=20).astype(np.float32)
    np.savez(tmp_path / "params.npz", w_enc=w_enc, w_dec=w_enc.T.copy(), b_enc=b_enc, b_dec=np.zeros(8, np.float32),
             threshold=thr)
    x = rng.normal(scale=2.0, size=(30, 8)).astype(np.float32)
    pre = x @ w_enc + b_enc
    want = (pre > thr) * np.maximum(pre, 0)
    enc = AtlasEncoder.from_tensors(read_gemmascope(tmp_path / "params.npz").encoder())
    assert enc is not None and (thr < 0).any()
    np.testing.assert_allclose(enc.encode(x), want, atol=1e-5)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_plain_matrix_with_jsonl_labels(store, tmp_path, suffix):
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    path = tmp_path / f"dirs{suffix}"
    np.save(path, x) if suffix == ".npy" else save_file({"directions": x}, str(path))
    labels = tmp_path / "l.jsonl"
    labels.write_text('{"index": 2, "label": "two", "description": "the second"}\n\n{"index": 9, "label": "nine"}\n')
    info = import_atlas(store, "m", path, labels=labels, site=AtlasSource(model="gpt2", layer=3))
    assert info.n_labelled == 2 and store.concept("m/9").label == "nine"
    np.testing.assert_array_equal(store.atlas_vectors("m"), x)


def test_labels_beyond_the_vectors_are_a_dimension_error(store, tmp_path, saelens_folder):
    labels = tmp_path / "l.csv"
    labels.write_text("index,label\n0,a\n500,b\n")
    with pytest.raises(ShapeError, match="index 500.*200 vectors"):
        import_atlas(store, "x", saelens_folder, labels=labels)
    assert store.atlases() == []


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", "{not json\n", "line 1: not valid JSON"),
        ("noindex.jsonl", '{"label": "x"}\n', "needs an 'index'"),
        ("bad.csv", "label\nx\n", "header with index"),
        ("badidx.csv", "index,label\nseven,x\n", "not an integer"),
        ("labels.txt", "x", "unknown label format"),
        ("bad.jsonl.gz", "not gzip", "cannot be read"),
        ("dup.csv", "index,label\n3,rain\n4,cats\n3,storms\n", "line 4: index 3 appears twice .first on line 2"),
    ],
)
def test_malformed_label_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(FormatError, match=match):
        read_labels(p)


def test_malformed_sae_sources(store, tmp_path, saelens_folder):
    (saelens_folder / "cfg.json").write_text("{oops")
    with pytest.raises(FormatError, match="not valid JSON"):
        import_atlas(store, "x", saelens_folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="neither cfg.json"):
        import_atlas(store, "x", empty)
    bad = tmp_path / "m.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(FormatError, match="not a readable .npy"):
        import_atlas(store, "x", bad, site=AtlasSource(model="m", layer=0))
    np.save(tmp_path / "v.npy", np.ones(5, np.float32))
    with pytest.raises(FormatError, match="2-D matrix"):
        import_atlas(store, "x", tmp_path / "v.npy", site=AtlasSource(model="m", layer=0))
    np.save(tmp_path / "ok.npy", np.ones((5, 3), np.float32))
    with pytest.raises(FormatError, match="--model"):
        import_atlas(store, "x", tmp_path / "ok.npy", site=AtlasSource(layer=0))
    assert store.atlases() == []
