"""`atlas explain` reports each hit's activation through the atlas SAE's encoder, beside the cosine."""

from __future__ import annotations

import numpy as np

from engine.align.map import AlignmentMap, load_map, save_map
from engine.search import feature_activations
from engine.store.store import AtlasSource
from tests.conftest import clustered_directions
from tests.search.test_search import tiny_subject  # noqa: F401 (the fixture)

D_S, D_A, N = 32, 24, 60


def sae_store(store, subject_source, activation):
    """Atlas ``at``: an SAE with a known encoder (W_enc, b_enc, and a threshold or k), a map ``m`` to it."""
    rng = np.random.default_rng(0)
    w_dec = clustered_directions(N, D_A, seed=2)
    enc = {"W_enc": rng.normal(size=(D_A, N)).astype(np.float32), "b_enc": rng.normal(scale=0.5, size=N).astype(np.float32),
           "b_dec": np.zeros(D_A, np.float32)}
    if activation == "jumprelu":
        enc["threshold"] = rng.uniform(0.0, 2.0, size=N).astype(np.float32)
    if activation == "topk":
        enc["k"] = np.array([5], np.float32)
    store.add_atlas(
        "at", w_dec, [f"concept {i}" for i in range(N)], encoder=enc,
        source=AtlasSource(model="found", layer=3),
    )
    store.add_model("subj", d_model=D_S, source=subject_source)
    w = rng.normal(size=(D_S, D_A)) / np.sqrt(D_S)
    amap = AlignmentMap(w, np.linalg.pinv(w), rng.normal(size=D_S), rng.normal(size=D_A), "procrustes",
                        subject_model="subj", subject_layer=1, atlas="at", atlas_model="found", atlas_layer=3)
    save_map(store, amap, "m")
    return enc, load_map(store, "m")


def expected(enc, amap, acts, activation):
    y = (acts - amap.subject_mean) @ amap.weight + amap.atlas_mean  # the affine map: an atlas-site residual
    pre = y @ enc["W_enc"] + enc["b_enc"]
    if activation == "jumprelu":
        return np.where(pre > enc["threshold"], pre, 0)
    f = np.maximum(pre, 0)
    if activation == "topk":
        f[np.arange(len(f))[:, None], np.argsort(-f, axis=1)[:, 5:]] = 0
    return f


def test_feature_activations_for_each_activation_function(tmp_path):
    from engine.store.store import Store

    x = np.random.default_rng(1).normal(size=(7, D_S)).astype(np.float32)
    for activation in ("relu", "jumprelu", "topk"):
        store = Store.init(tmp_path / activation)
        enc, amap = sae_store(store, "/nonexistent", activation)
        got = feature_activations(store, amap, x)
        np.testing.assert_allclose(got, expected(enc, amap, x, activation), atol=1e-4)
        if activation == "topk":
            assert ((got > 0).sum(axis=1) <= 5).all()
        store.close()


def test_explain_shows_each_hits_activation(store, tiny_subject):  # noqa: F811
    import json

    import torch
    from click.testing import CliRunner

    from engine.cli import cli
    from engine.models.loading import load_model
    from engine.search import explain

    enc, amap = sae_store(store, str(tiny_subject), "jumprelu")
    text = "the cat sat on the mat"
    tokens = explain(store, amap, text, k=3)
    model, tok = load_model(tiny_subject)
    seen = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(**tok(text, return_tensors="pt"))
    handle.remove()
    f = expected(enc, amap, seen["h"][0].numpy(), "jumprelu")
    for j, t in enumerate(tokens):
        assert t.activations is not None and len(t.activations) == len(t.hits) == 3
        np.testing.assert_allclose(t.activations, [f[j, h.ordinal] for h in t.hits], atol=1e-4)

    args = ["explain", "m", "rain falls on the cat", "-k", "2", "--store", str(store.path)]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert all(len(t["activations"]) == 2 for t in json.loads(r.stdout))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and ", act " in r.output


def test_explain_without_an_encoder_has_no_activations(store):
    from tests.search.test_search import make_mapped_store

    _, amap = make_mapped_store(store)
    assert feature_activations(store, amap, np.zeros((2, 32), np.float32)) is None
