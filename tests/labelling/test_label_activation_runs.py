"""Activation matching as a labelling run, on the tiny ConceptWorld (issue 25, part 3).

Subject A shares the foundation's tokenizer (token pairing); subject B has its own BPE tokenizer
(span pairing). A run matches each subject SAE latent to the atlas SAE's latents by co-activation
over a corpus of world documents outside the SAEs' labelling slice; its rows are the brute-force
correlation table's top-k (`accumulate_coactivation` recomputed here), its labels beat the map's
nearest neighbour on the ground truth, and a SIGKILLed run resumes to the uninterrupted rows.

Slow: the first use of `tiny_world` trains the world (ATLAS_TEST_CACHE keeps it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.labelling import run as labelling
from engine.labelling.export import iter_labels

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
N_DOCS = 300


@pytest.fixture(scope="module")
def sae_world(tmp_path_factory, tiny_world):
    """A store with the tiny world, its SAE atlas and a Procrustes map per subject at its SAE layer."""
    import torch

    from engine.store.store import Store
    from engine.world import register_world
    from engine.world.eval.sae_labelling import MapFitting, sae_maps
    from engine.world.sae import build_saes, register_sae_atlas

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("actrun")
    store = Store.init(root / "store")
    register_world(store, tiny_world)
    saes = build_saes(tiny_world, progress=False)
    register_sae_atlas(store, tiny_world, saes)
    maps = {}
    for key, pairing in (("subject_a", "token"), ("subject_b", "span")):
        [(_, _, amap)] = sae_maps(store, tiny_world, saes, key, ["procrustes"], MapFitting(pairings=[pairing], max_docs=200), quiet=True)
        maps[key] = amap
    c = saes.config
    held = {t for t, _ in tiny_world.train_docs[c.n_train_docs + c.n_val_docs:
                                                c.n_train_docs + c.n_val_docs + c.n_label_docs]}
    texts = [t for t, _ in tiny_world.train_docs if t not in held][:N_DOCS]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    yield store, tiny_world, saes, maps, corpus, texts
    store.close()


def _hits(store, name, k):
    run = store.run(name)
    hits = np.full((run.n_features, k), -1, dtype=np.int64)
    for fl in iter_labels(store, name):
        hits[fl.feature, : len(fl.hits)] = [h.ordinal for h in fl.hits]
    return hits


@pytest.mark.parametrize("key", ["subject_a", "subject_b"])
def test_activation_run_is_the_coactivation_top_k_and_beats_the_map(sae_world, key):
    from engine.align.pairing import PairingConfig
    from engine.atlas.encoder import AtlasEncoder
    from engine.atlas.importers import read_directions
    from engine.labelling.coactivation import accumulate_coactivation
    from engine.models.hooks import Site
    from engine.world.eval.sae_labelling import score_hits

    store, world, saes, maps, corpus, texts = sae_world
    amap, sae = maps[key], saes.get(key)
    pairing = "token" if key == "subject_a" else "span"
    run = labelling.label_features(store, amap.name, str(sae.path), k=5, batch_size=64, match="activations",
                                   corpus=str(corpus), name=f"act-{key}", quiet=True)
    assert run.status == "done" and run.params["match"]["pairing"] == pairing
    assert set(run.params["files"]) == {"coact", "stat"}
    # the brute force: the same pass by hand, the full correlation table's top 5
    sub = world.model(key).load()
    fnd = world.foundation.load()
    enc_x = AtlasEncoder.from_tensors(read_directions(sae.path).encoder())
    enc_y = AtlasEncoder.from_tensors(read_directions(saes.get("foundation").path).encoder())
    assert run.params["match"]["binary"] is True  # new runs correlate firing (the phi coefficient)
    got = accumulate_coactivation(sub, fnd, texts, (Site((amap.subject_layer,)), Site((amap.atlas_layer,))),
                                  (enc_x, enc_y), PairingConfig((pairing,)), weighted_means=False, binary=True,
                                  quiet=True)
    corr = got.stats.correlation()
    hits = _hits(store, run.name, 5)
    scores = np.array([[h.score for h in fl.hits] for fl in iter_labels(store, run.name)])
    np.testing.assert_allclose(scores, -np.sort(-corr, axis=1)[:, :5], atol=1e-5)
    assert (hits[:, 0] == corr.argmax(1)).mean() > 0.99  # ties aside
    conf = [fl.confidence for fl in iter_labels(store, run.name)]
    assert all(c is not None and 0 < c < 1 for c in conf)
    # labels against the ground truth: better than the map's nearest neighbour
    sub_keys = [e["key"] for e in sae.ground_truth()]
    atlas_keys = [e["key"] for e in saes.get("foundation").ground_truth()]
    by_map = labelling.label_features(store, amap.name, str(sae.path), k=5, name=f"map-{key}", quiet=True)
    act_top1 = score_hits(sub_keys, atlas_keys, hits)["top1"]
    map_top1 = score_hits(sub_keys, atlas_keys, _hits(store, by_map.name, 5))["top1"]
    assert act_top1 > map_top1, (act_top1, map_top1)


@pytest.mark.parametrize("labelled_only", [False, True])
def test_killed_activation_run_resumes_to_the_uninterrupted_rows(sae_world, labelled_only):
    store, world, saes, maps, corpus, _ = sae_world
    amap, sae = maps["subject_b"], saes.get("subject_b")
    name, clean_name = f"killed{int(labelled_only)}", f"clean{int(labelled_only)}"
    cmd = [sys.executable, "-m", "engine.cli", "label", amap.name, "--features", str(sae.path), "--match",
           "activations", "--corpus", str(corpus), "--criterion", "csls", "-k", "3", "--batch", "32",
           "--name", name, "--store", str(store.path), "--quiet", *(["--labelled-only"] if labelled_only else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1", "ATLAS_FAILPOINT": "label.batch_committed"}
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert r.returncode == -9, r.stderr.decode()
    cut = store.run(name)
    files = {"coact", "stat", "labelled"} if labelled_only else {"coact", "stat"}
    assert (cut.status, cut.n_done) == ("interrupted", 32) and set(cut.params["files"]) == files
    env.pop("ATLAS_FAILPOINT")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "--resume", name, "--store",
                        str(store.path), "--quiet"], env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    clean = labelling.label_features(store, amap.name, str(sae.path), k=3, batch_size=32, match="activations",
                                     corpus=str(corpus), criterion="csls", name=clean_name, labelled_only=labelled_only,
                                     quiet=True)
    rows = {n: store.run_label_rows(n, 0, clean.n_features) for n in (name, clean.name)}
    assert rows[name] == rows[clean.name] and len(rows[name]) == 3 * clean.n_features
    if labelled_only:  # the run's own correlation table, its unlabelled columns never ranked
        from engine.labelling.coactivation import CoactivationStats
        from engine.labelling.criteria import rerank

        labelled = np.array([c.labelled for c in store.concepts(amap.atlas)])
        assert 0 < labelled.sum() < len(labelled)
        st = CoactivationStats.load(store.path / clean.params["files"]["coact"]["file"])
        stat = labelling.recorded_ranking(store, store.run(clean.name)).stat
        corr = np.where(labelled[None, :], st.correlation(), -np.inf)
        order = np.argsort(-corr, axis=1, kind="stable")[:, :32]
        want = rerank(np.take_along_axis(corr, order, 1), order, "csls", stat, 3)[1]
        hits = _hits(store, clean.name, 3)
        assert labelled[hits].all() and (hits[:, 0] == want[:, 0]).mean() > 0.99
        plain = _hits(store, "clean0", 3) if store.runs() and "clean0" in {x.name for x in store.runs()} else None
        assert plain is None or not labelled[plain[:, 0]].all()  # without the option some first hits are unlabelled
        assert clean.params["confidence"]["coef"] == list(labelling.default_confidence("activations", True).coef)


def test_activation_run_on_an_atlas_without_encoder_correlates_projections(sae_world):
    """The world's concept atlas has directions only: the atlas side is the projection of each
    foundation residual, minus the map's atlas-side centre, on each unit direction; the run's
    scores are the brute-force Pearson correlations of the subject SAE's firing with those
    projections (token pairing, subject A)."""
    from engine.align.fit import align_subject
    from engine.align.pairing import iter_pairs
    from engine.align.request import AlignRequest
    from engine.atlas.encoder import AtlasEncoder
    from engine.atlas.importers import read_directions
    from engine.models.hooks import Site
    from engine.search import atlas_centre

    store, world, saes, maps, corpus, texts = sae_world
    sae = saes.get("subject_a")
    info = store.atlas(world.atlas_name)
    assert not info.has_encoder
    [m] = [align_subject(store, AlignRequest(world.model("subject_a").name, info.name, texts[:200],
                                             site=Site((sae.layer,)), name="to-concepts"), quiet=True)]
    from engine.align.map import load_map

    amap = load_map(store, m.name)
    run = labelling.label_features(store, amap.name, str(sae.path), k=3, match="activations", corpus=str(corpus),
                                   name="act-proj", quiet=True)
    assert run.status == "done"
    # brute force: pairs by hand, SAE codes (fires or not) against projections on the unit directions
    sub, fnd = world.model("subject_a").load(), world.foundation.load()
    chunks = list(iter_pairs(sub, fnd, texts, Site((amap.subject_layer,)), Site((amap.atlas_layer,)), desc=None))
    x = np.concatenate([c.x[amap.subject_layer].float().numpy() for c in chunks])
    y = np.concatenate([c.y.float().numpy() for c in chunks])
    ax = (AtlasEncoder.from_tensors(read_directions(sae.path).encoder()).encode(x) > 0).astype(np.float64)
    d = store.atlas_vectors(info.name).astype(np.float64)
    ay = (y - atlas_centre(amap)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    axc, ayc = ax - ax.mean(0), ay - ay.mean(0)
    den = np.outer(np.sqrt((axc ** 2).sum(0)), np.sqrt((ayc ** 2).sum(0)))
    corr = np.where(den > 0, axc.T @ ayc / np.where(den > 0, den, 1), 0.0)
    scores = np.array([[h.score for h in fl.hits] for fl in iter_labels(store, run.name)])
    np.testing.assert_allclose(scores, -np.sort(-corr, axis=1)[:, :3], atol=1e-4)


def test_resumed_activation_run_refuses_a_changed_corpus(sae_world, tmp_path):
    """A run killed after its pass was saved resumes from the saved statistics; if its corpus was
    edited meanwhile, the resume refuses (one line, exit 1) rather than label under the wrong name."""
    store, world, saes, maps, corpus, texts = sae_world
    amap, sae = maps["subject_a"], saes.get("subject_a")
    mine = tmp_path / "corpus.txt"
    mine.write_text("\n".join(texts[:60]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATLAS_QUIET": "1", "ATLAS_FAILPOINT": "label.batch_committed"}
    cmd = [sys.executable, "-m", "engine.cli", "label", amap.name, "--features", str(sae.path), "--match",
           "activations", "--corpus", str(mine), "-k", "3", "--batch", "32", "--name", "changed",
           "--store", str(store.path), "--quiet"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == -9
    assert store.run("changed").status == "interrupted" and "coact" in store.run("changed").params["files"]
    env.pop("ATLAS_FAILPOINT")
    resume = [sys.executable, "-m", "engine.cli", "label", "--resume", "changed", "--store", str(store.path), "--quiet"]
    mine.write_text("\n".join(texts[:59]) + "\n", encoding="utf-8")
    r = subprocess.run(resume, env=env, capture_output=True, timeout=600)
    assert r.returncode == 1 and "changed since the run was created" in r.stderr.decode(), r.stderr.decode()
    assert store.run("changed").n_done == 32
    mine.write_text("\n".join(texts[:60]) + "\n", encoding="utf-8")  # restored: the resume finishes
    r = subprocess.run(resume, env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert store.run("changed").status == "done"
