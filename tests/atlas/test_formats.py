"""SAE formats beyond SAELens / Gemma Scope: sparsify, dictionary_learning, Llama Scope, release ids.

Files under tests/data/ were written by the real libraries (how: tests/data/README.md), with the
activations those libraries' own ``encode`` gave on fixed inputs, so the canonical encoder kept
with an atlas is checked against the library itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.atlas.encoder import AtlasEncoder
from engine.atlas.formats.releases import SaeRelease
from engine.atlas.importers import FORMATS, import_atlas, read_directions, register_format
from engine.errors import BadValueError, FormatError, NotFoundError
from engine.store.store import AtlasSource

DATA = Path(__file__).parents[1] / "data"


def encode(sae, x):
    return AtlasEncoder.from_tensors(sae.encoder()).encode(x)


# ---------------------------------------------------------------------- SAELens


@pytest.mark.parametrize(("variant", "activation"), [
    ("standard", "relu"), ("standard_no_b_dec", "relu"), ("jumprelu", "jumprelu"), ("topk", "topk"),
    ("topk_rescaled", "topk")])
def test_saelens_folders_written_by_the_library(store, variant, activation):
    """sae-lens 6.54.12 ``SAE.save_model``: StandardSAE (apply_b_dec_to_input true / false), JumpReLUSAE with
    thresholds of both signs (SAELens gates relu(pre), so nothing is negative), TopKSAE with and without
    ``rescale_acts_by_decoder_norm`` (decoder rows of norm 0.1 .. 3); reference = ``SAE.encode(x)``."""
    folder = DATA / "saelens" / variant
    sae = read_directions(folder)
    assert (sae.source_kind, sae.activation, sae.layer, sae.hook, sae.model) == (
        "saelens", activation, 3, "resid_post", "EleutherAI/pythia-70m-deduped")
    ref = load_file(str(DATA / "saelens" / "reference.safetensors"))
    ours = encode(sae, ref["x"])
    np.testing.assert_allclose(ours, ref[f"acts_{variant}"], atol=1e-4, rtol=1e-5)
    assert (ours >= 0).all()
    info = import_atlas(store, f"sl-{variant}", folder)
    assert info.has_encoder
    stored = AtlasEncoder.from_tensors(store.atlas_tensors(f"sl-{variant}"))
    assert stored is not None
    np.testing.assert_allclose(stored.encode(ref["x"]), ref[f"acts_{variant}"], atol=1e-4, rtol=1e-5)


def _saelens_copy(tmp_path: Path, variant: str, **cfg) -> Path:
    import shutil

    folder = tmp_path / variant
    shutil.copytree(DATA / "saelens" / variant, folder)
    data = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**data, **cfg}))
    return folder


@pytest.mark.parametrize(("cfg", "field"), [
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
    ({"architecture": "jumprelu_transcoder"}, "transcoder"),
    ({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input"),
    ({"metadata": {"hook_name": "blocks.3.attn.hook_z", "hook_head_index": 2}}, "hook_head_index")])
def test_saelens_fields_that_change_the_site_are_refused(tmp_path, cfg, field):
    with pytest.raises(FormatError, match=field):
        read_directions(_saelens_copy(tmp_path, "standard", **cfg))


@pytest.mark.parametrize(("cfg", "field"), [
    ({"architecture": "gated"}, "architecture 'gated'"),
    ({"architecture": "abstopk", "k": 5}, "architecture 'abstopk'"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations='constant_norm_rescale'"),
    ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu'")])
def test_saelens_fields_the_encoder_cannot_apply_warn_and_drop_the_encoder(store, tmp_path, cfg, field):
    """Directions come in; the encoder does not, and a FormatWarning (also printed by the CLI) names the field."""
    from click.testing import CliRunner

    from engine.atlas.formats.base import FormatWarning
    from engine.cli import cli

    folder = _saelens_copy(tmp_path, "standard", **cfg)
    with pytest.warns(FormatWarning, match=field):
        sae = read_directions(folder)
    assert sae.W_enc is None and sae.encoder() == {}
    r = CliRunner().invoke(cli, ["import-sae", str(folder), "--name", "g", "--store", str(store.path)])
    assert r.exit_code == 0, r.output
    assert f"warning: {folder / 'cfg.json'}: {field}" in r.stderr
    assert not store.atlas("g").has_encoder


def test_saelens_expected_average_norm_is_kept_with_a_warning(tmp_path):
    """SAELens' own encode does not scale by norm_scaling_factor either: the encoder stays, a warning says so."""
    from engine.atlas.formats.base import FormatWarning

    with pytest.warns(FormatWarning, match="norm_scaling_factor"):
        sae = read_directions(_saelens_copy(tmp_path, "topk", normalize_activations="expected_average_only_in"))
    ref = load_file(str(DATA / "saelens" / "reference.safetensors"))
    np.testing.assert_allclose(encode(sae, ref["x"]), ref["acts_topk"], atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------- EleutherAI sparsify


def test_sparsify_folder_written_by_the_library(store, tmp_path):
    """sparsify 1.3.3 ``SparseCoder.save_to_disk`` (sparsify/sparse_coder.py): cfg.json + sae.safetensors.

    The reference activations are ``SparseCoder.encode`` (top-k of relu((x - b_dec) W_encᵀ + b)).
    """
    folder = DATA / "eai-sparsify" / "layers.3"
    sae = read_directions(folder)
    raw = load_file(str(folder / "sae.safetensors"))
    assert (sae.source_kind, sae.layer, sae.hook, sae.activation, sae.k) == ("eai-sparsify", 3, "resid_post", "topk", 4)
    np.testing.assert_array_equal(sae.W_dec, raw["W_dec"])
    ref = load_file(str(DATA / "eai-sparsify" / "reference.safetensors"))
    np.testing.assert_allclose(encode(sae, ref["x"]), ref["acts"], atol=1e-5)
    info = import_atlas(store, "sp", folder, site=AtlasSource(model="HuggingFaceTB/SmolLM2-135M"))
    assert (info.layer, info.hook, info.n_concepts, info.has_encoder) == (3, "resid_post", 32, True)
    assert store.atlas_tensors("sp")["k"].tolist() == [4.0]


def test_sparsify_hookpoint_names_and_run_config(tmp_path):
    """Hookpoint folders as sparsify's trainer names them (``layers.N``, ``layers.N.mlp``, ``h.N``);
    the model from the trainer's ``config.json`` one folder up (sparsify/__main__.py RunConfig.model)."""
    import shutil

    from engine.atlas.formats.sparsify import hookpoint_site

    assert hookpoint_site("layers.12") == (12, "resid_post")
    assert hookpoint_site("layers.12.mlp") == (12, "mlp_out")
    assert hookpoint_site("gpt_neox.layers.5.attention") == (5, "attn_out")
    assert hookpoint_site("h.6") == (6, "resid_post")
    run = tmp_path / "run"
    shutil.copytree(DATA / "eai-sparsify" / "layers.3", run / "layers.7.mlp")
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "sae": {"k": 4}}))
    sae = read_directions(run / "layers.7.mlp")
    assert (sae.model, sae.layer, sae.hook) == ("EleutherAI/pythia-70m", 7, "mlp_out")
    cfg = json.loads((run / "layers.7.mlp" / "cfg.json").read_text())
    (run / "layers.7.mlp" / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(FormatError, match="transcoder"):
        read_directions(run / "layers.7.mlp")
    (run / "layers.7.mlp" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    from engine.atlas.formats.base import FormatWarning

    with pytest.warns(FormatWarning, match="activation 'groupmax'"):
        assert read_directions(run / "layers.7.mlp").encoder() == {}


def test_sparsify_live_library(tmp_path):
    """Where eai-sparsify is installed: a folder it writes now reads back, encoder equal to its encode()."""
    sparsify = pytest.importorskip("sparsify")
    import torch

    torch.manual_seed(3)
    sae = sparsify.SparseCoder(12, sparsify.SparseCoderConfig(num_latents=24, k=5))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.encoder.bias.normal_(0, 0.2)
    sae.save_to_disk(tmp_path / "layers.2")
    x = torch.randn(7, 12)
    with torch.no_grad():
        out = sae.encode(x)
        ref = torch.zeros(7, 24).scatter_(-1, out.top_indices, out.top_acts).numpy()
    ours = read_directions(tmp_path / "layers.2")
    np.testing.assert_allclose(encode(ours, x.numpy()), ref, atol=1e-5)


# ---------------------------------------------------------------------- dictionary_learning


@pytest.mark.parametrize(("variant", "activation"),
                         [("relu", "relu"), ("april", "relu"), ("jumprelu", "jumprelu"), ("topk", "topk"),
                          ("batchtopk", "jumprelu")])
def test_dictionary_learning_variants_written_by_the_library(store, variant, activation):
    """dictionary-learning 0.1.0 (saprmarks/dictionary_learning): StandardTrainer, StandardTrainerAprilUpdate,
    JumpReluTrainer, TopKTrainer, BatchTopKTrainer, each written by ``trainSAE`` (ae.pt + config.json);
    reference = ``<dict class>.from_pretrained(ae.pt).encode(x)`` (tests/data/make_sae_files.py)."""
    folder = DATA / "dictionary_learning" / "resid_post_layer_3" / variant
    sae = read_directions(folder)
    assert (sae.source_kind, sae.activation, sae.layer, sae.hook, sae.model) == (
        "dictionary_learning", activation, 3, "resid_post", "EleutherAI/pythia-70m-deduped")
    assert sae.W_dec.shape == (32, 16)
    ref = load_file(str(DATA / "dictionary_learning" / "reference.safetensors"))
    np.testing.assert_allclose(encode(sae, ref["x"]), ref[f"acts_{variant}"], atol=1e-5)
    info = import_atlas(store, f"dl-{variant}", folder / "ae.pt")
    assert (info.model, info.layer, info.has_encoder) == ("EleutherAI/pythia-70m-deduped", 3, True)


def test_dictionary_learning_never_unpickles_objects(tmp_path):
    """``torch.load(weights_only=True)``: a pickle that would run code is refused, and runs nothing."""
    import torch

    marker = tmp_path / "ran"
    (tmp_path / "evil").mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": _Payload(str(marker))}, tmp_path / "evil" / "ae.pt")
    with pytest.raises(FormatError, match="weights_only"):
        read_directions(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "gated").mkdir()
    torch.save({"encoder.weight": torch.zeros(4, 2), "decoder.weight": torch.zeros(2, 4), "r_mag": torch.zeros(4),
                "gate_bias": torch.zeros(4)}, tmp_path / "gated" / "ae.pt")
    with pytest.raises(FormatError, match="GatedAutoEncoder"):
        read_directions(tmp_path / "gated")


def test_dictionary_learning_april_update_matches_from_pretrained():
    """A StandardTrainerAprilUpdate SAE leaves its decoder norms free; ``AutoEncoder.from_pretrained()``
    normalises them (and scales the encoder), and that is the SAE users load: the atlas matches it,
    not the raw state dict, and its directions are the unit decoder columns."""
    ref = load_file(str(DATA / "dictionary_learning" / "reference.safetensors"))
    norms = ref["april_decoder_norms"]
    assert np.abs(norms - 1).max() > 0.1  # the file really has free decoder norms
    assert np.abs(ref["acts_april"] - ref["acts_april_raw"]).max() > 0.1
    sae = read_directions(DATA / "dictionary_learning" / "resid_post_layer_3" / "april")
    np.testing.assert_allclose(encode(sae, ref["x"]), ref["acts_april"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, atol=1e-6)


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ---------------------------------------------------------------------- Llama Scope


def write_llama_scope(folder: Path, act_fn: str, d: int = 8, n: int = 32, seed: int = 0, **cfg) -> dict:
    """A Llama Scope folder as published (fnlp/Llama3_1-8B-Base-LX*-*x): hyperparams.json (LM-SAEs SAEConfig
    fields) + checkpoints/final.safetensors (encoder.weight (d_sae, d), encoder.bias, decoder.weight (d, d_sae),
    decoder.bias), following SAELens' llama_scope_sae_huggingface_loader (sae_lens/loading/pretrained_sae_loaders.py)."""
    rng = np.random.default_rng(seed)
    t = {"encoder.weight": rng.normal(size=(n, d)).astype(np.float32),
         "encoder.bias": rng.normal(scale=0.5, size=n).astype(np.float32),
         "decoder.weight": (rng.normal(size=(d, n)) * rng.uniform(0.5, 2.0, size=n)).astype(np.float32),
         "decoder.bias": rng.normal(scale=0.3, size=d).astype(np.float32)}
    (folder / "checkpoints").mkdir(parents=True)
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    hp = {"d_model": d, "d_sae": n, "act_fn": act_fn, "jump_relu_threshold": 0.4, "top_k": 5,
          "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 23.5, "out": 23.5},
          "sparsity_include_decoder_norm": True, "apply_decoder_bias_to_pre_encoder": False, **cfg}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return {**t, "hp": hp}


def lm_saes_encode(t: dict, x: np.ndarray) -> np.ndarray:
    """LM-SAEs SparseAutoEncoder.encode (src/lm_saes/sae.py), written out: dataset-wise input norm,
    optional decoder bias off the input, activation gated on pre · ‖decoder column‖, value pre."""
    hp = t["hp"]
    x = x * math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    if hp["apply_decoder_bias_to_pre_encoder"]:
        x = x - t["decoder.bias"]
    pre = x @ t["encoder.weight"].T + t["encoder.bias"]
    norm = np.linalg.norm(t["decoder.weight"], axis=0) if hp["sparsity_include_decoder_norm"] else 1.0
    scores = pre * norm
    if hp["act_fn"] == "jumprelu":
        return pre * (scores > hp["jump_relu_threshold"])
    relu = np.maximum(scores, 0)
    keep = np.argsort(-relu, axis=1)[:, : hp["top_k"]]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.take_along_axis(np.maximum(pre, 0) * norm, keep, axis=1), axis=1)
    return out  # TopK: reported as pre · ‖column‖ (the decoder norm folded into the encoder)


@pytest.mark.parametrize(("act_fn", "b_in"), [("jumprelu", False), ("jumprelu", True), ("topk", False)])
def test_llama_scope_folder(store, tmp_path, act_fn, b_in):
    """A Llama Scope per-layer folder (documented layout; hyperparams as LM-SAEs' SAEConfig names them)."""
    folder = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    t = write_llama_scope(folder, act_fn, apply_decoder_bias_to_pre_encoder=b_in)
    sae = read_directions(folder)
    assert (sae.source_kind, sae.model, sae.layer, sae.hook, sae.activation) == (
        "llama-scope", "meta-llama/Llama-3.1-8B", 15, "resid_post", act_fn)
    np.testing.assert_array_equal(sae.W_dec, t["decoder.weight"].T)
    x = np.random.default_rng(5).normal(scale=4.0, size=(9, 8)).astype(np.float32)
    np.testing.assert_allclose(encode(sae, x), lm_saes_encode(t, x), atol=1e-4)
    assert import_atlas(store, "ls", folder).site == "meta-llama/Llama-3.1-8B@15/resid_post"


def test_llama_scope_transcoder_is_refused(tmp_path):
    write_llama_scope(tmp_path / "tc", "jumprelu", hook_point_out="blocks.15.hook_mlp_out",
                      hook_point_in="blocks.15.ln2.hook_normalized")
    with pytest.raises(FormatError, match="transcoder"):
        read_directions(tmp_path / "tc")


# ---------------------------------------------------------------------- registry


def test_registry_refuses_duplicates_and_format_forces_a_reader(tmp_path):
    assert list(FORMATS)[:2] == ["eai-sparsify", "saelens"]  # sparsify first: both folders have a cfg.json
    with pytest.raises(ValueError, match="already registered"):
        register_format("saelens", lambda p: False, lambda p: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(BadValueError, match="unknown SAE format 'nope'"):
        read_directions(DATA / "eai-sparsify" / "layers.3", "nope")
    with pytest.raises(FormatError, match="sae_weights.safetensors"):
        read_directions(DATA / "eai-sparsify" / "layers.3", "saelens")


def test_import_sae_cli_format_option(store):
    from click.testing import CliRunner

    from engine.cli import cli

    folder = DATA / "dictionary_learning" / "resid_post_layer_3" / "topk"
    r = CliRunner().invoke(cli, ["import-sae", str(folder), "--name", "dl", "--format", "dictionary_learning",
                                 "--store", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source_kind"] == "dictionary_learning"
    r = CliRunner().invoke(cli, ["import-sae", str(folder), "--name", "dl2", "--format", "llama-scope",
                                 "--store", str(store.path)])
    assert r.exit_code == 1 and "hyperparams.json" in r.output


# ---------------------------------------------------------------------- releases in a local HF cache


def fake_hub_file(cache: Path, repo_id: str, rev: str, rel_path: str, data: bytes) -> Path:
    """One file in a huggingface_hub cache: blobs/<sha>, snapshots/<rev>/<path> → symlink, refs/main."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / rev / rel_path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("../" * (len(Path(rel_path).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return link


def test_release_ids_resolve_in_a_local_hub_cache(store, tmp_path, monkeypatch):
    """SAELens pretrained_saes.yaml (6.18): gemma-scope-2b-pt-res (id = path, conversion_func gemma_2) and
    llama_scope_lxr_8x (l{N}r_8x → Llama3_1-8B-Base-L{N}R-8x, conversion_func llama_scope)."""
    import io

    from click.testing import CliRunner

    from engine.cli import cli

    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(20, 6)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, w_enc=w_dec.T.copy(), w_dec=w_dec, b_enc=np.zeros(20, np.float32), b_dec=np.zeros(6, np.float32),
             threshold=np.full(20, 0.1, np.float32))
    link = fake_hub_file(cache, "google/gemma-scope-2b-pt-res", rev, "layer_12/width_16k/average_l0_82/params.npz",
                         buf.getvalue())
    assert link.is_symlink() and link.resolve().parent.name == "blobs"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = CliRunner().invoke(cli, ["import-sae", "--release", "gemma-scope-2b-pt-res", "--sae-id",
                                 "layer_12/width_16k/average_l0_82", "--name", "g", "--store", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["model"], info["layer"], info["n_concepts"], info["source_kind"]) == ("gemma-2-2b", 12, 20, "gemmascope")
    assert info["source_ref"] == f"gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82 (google/gemma-scope-2b-pt-res@{rev})"
    np.testing.assert_array_equal(store.atlas_vectors("g"), w_dec)
    # the canonical alias of the same SAE
    info = import_atlas(store, "gc",
                        release=SaeRelease("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"))
    assert info.n_concepts == 20

    ls = tmp_path / "ls" / "Llama3_1-8B-Base-L15R-8x"
    write_llama_scope(ls, "jumprelu")
    for f in ("hyperparams.json", "checkpoints/final.safetensors"):
        fake_hub_file(cache, "fnlp/Llama3_1-8B-Base-LXR-8x", rev, f"Llama3_1-8B-Base-L15R-8x/{f}", (ls / f).read_bytes())
    info = import_atlas(store, "l15", release=SaeRelease("llama_scope_lxr_8x", "l15r_8x", cache))
    assert (info.model, info.layer, info.source_kind) == ("meta-llama/Llama-3.1-8B", 15, "llama-scope")

    with pytest.raises(BadValueError, match="unknown release 'nope'"):
        import_atlas(store, "x", release=SaeRelease("nope", "a"))
    with pytest.raises(BadValueError, match="not an SAE id of gemma-scope-2b-pt-res"):
        import_atlas(store, "x", release=SaeRelease("gemma-scope-2b-pt-res", "l12r_8x"))
    with pytest.raises(NotFoundError, match="has no layer_3/width_16k/average_l0_59"):
        import_atlas(store, "x", release=SaeRelease("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_59"))
    with pytest.raises(NotFoundError, match="not in the Hugging Face cache"):
        import_atlas(store, "x", release=SaeRelease("llama_scope_lxm_8x", "l3m_8x"))
    r = CliRunner().invoke(cli, ["import-sae", "--release", "gemma-scope-2b-pt-res", "--name", "y",
                                 "--store", str(store.path)])
    assert r.exit_code == 1 and "--release and --sae-id" in r.output


def test_sae_lens_yaml_table_adds_releases(tmp_path):
    """A pretrained_saes.yaml shaped like SAELens' (release: repo_id, model, conversion_func, saes: [id, path])."""
    from engine.atlas.formats.releases import releases

    table = tmp_path / "pretrained_saes.yaml"
    table.write_text("gpt2-small-res-jb:\n  repo_id: jbloom/GPT2-Small-SAEs-Reformatted\n  model: gpt2-small\n"
                     "  saes:\n  - id: blocks.0.hook_resid_pre\n    path: blocks.0.hook_resid_pre\n")
    rel = releases(table)["gpt2-small-res-jb"]
    assert (rel.repo_id, rel.format, rel.path_of("blocks.0.hook_resid_pre"), rel.path_of("x")) == (
        "jbloom/GPT2-Small-SAEs-Reformatted", "saelens", "blocks.0.hook_resid_pre", None)
