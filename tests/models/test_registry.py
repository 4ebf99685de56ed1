"""Models as store objects: register from config + tokenizer files, show, re-point, remove."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ArchitectureError, DuplicateError, NotFoundError
from engine.models.loading import load_registered
from engine.models.registry import ensure_model, inspect_source, model_details, register_model, remove_model
from engine.store.models import ModelInUseError
from engine.store.store import AtlasSource
from tests.tiny_models import (
    bpe_tokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_tiny,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {
        "llama": save_tiny(root / "llama", "llama", word_tokenizer(), d=32, n_layers=3, seed=1),
        "bert": save_tiny(root / "bert", "bert", d=32, n_layers=2),
        "qwen": save_tiny(root / "qwen", "qwen2", bpe_tokenizer(), d=32, n_layers=3, seed=2),
    }


def test_the_card_comes_from_config_and_tokenizer_without_weights(folders, monkeypatch):
    import transformers

    def no_weights(*_a, **_k):
        raise AssertionError("registration must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    card = inspect_source(folders["llama"])
    assert (card.architecture, card.d_model, card.n_layers) == ("LlamaForCausalLM", 32, 3)
    assert len(card.tokenizer_fingerprint) == 64 and card.model_type == "llama"
    enc = inspect_source(folders["bert"], kind="encoder")
    assert (enc.architecture, enc.n_layers) == ("BertModel", 2)
    with pytest.raises(ArchitectureError, match="no ModuleList of blocks at 'nope'"):
        inspect_source(folders["llama"], layer_module="nope")
    assert inspect_source(folders["llama"], layer_module="model.layers").n_layers == 3


def test_register_show_load_and_remove(store, folders):
    info = register_model(store, "subj", folders["llama"])
    assert info.source == str(folders["llama"].resolve()) and info.source_kind == "path" and info.kind == "causal"
    d = model_details(store, "subj")
    assert d.source_found is True and d.atlases == [] and d.maps == []
    model, _ = load_registered(store, "subj")
    assert type(model).__name__ == info.architecture
    enc = register_model(store, "enc", folders["bert"], kind="encoder")
    assert enc.kind == "encoder" and type(load_registered(store, "enc")[0]).__name__ == "BertModel"
    store.add_atlas(
        "atl", np.ones((2, 32), np.float32), ["a", "b"], source=AtlasSource(model="subj", layer=1),
    )
    with pytest.raises(ModelInUseError, match="used by atlases atl"):
        remove_model(store, "subj")
    remove_model(store, "enc")
    with pytest.raises(NotFoundError, match="`atlas models add enc --source PATH|HUB_ID`"):
        store.get_model("enc")


def test_the_same_model_moved_is_re_pointed_another_is_refused(store, folders, tmp_path):
    register_model(store, "m", folders["llama"])
    moved = tmp_path / "moved"
    shutil.copytree(folders["llama"], moved)
    assert register_model(store, "m", moved).source == str(moved.resolve())
    with pytest.raises(DuplicateError, match="registered as another model"):
        register_model(store, "m", folders["qwen"])
    shutil.rmtree(moved)
    with pytest.raises(NotFoundError, match=r"not there \(moved\?\); `atlas models add m --source PATH\|HUB_ID`"):
        load_registered(store, "m")


def test_a_folder_inside_the_store_is_recorded_relative_to_its_root(store, folders):
    inside = store.path / "models" / "mine"
    shutil.copytree(folders["llama"], inside)
    info = register_model(store, "mine", inside)
    assert info.source_kind == "store" and info.source == str(inside.resolve())


def test_ensure_model_takes_a_name_a_folder_or_an_unreachable_hub_id(store, folders, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    assert ensure_model(store, str(folders["llama"])) == ("llama", None)
    assert ensure_model(store, "llama") == ("llama", None)
    name, note = ensure_model(store, "nobody/no-such-model", required=False)
    assert name == "nobody/no-such-model" and "`atlas models add nobody/no-such-model --source" in note
    with pytest.raises(NotFoundError):
        ensure_model(store, "nobody/no-such-model")


def test_an_unreadable_hub_id_offline_is_known_without_loading_transformers(tmp_path):
    """Offline (HF_HUB_OFFLINE) and not in the hub cache, a hub id cannot be read: `import-sae` of a
    matrix for a new model name says so without importing torch or transformers (~2 s a process)."""
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", np.ones((4, 8), np.float32))
    script = ("import sys; from engine.cli import cli\n"
              "try: cli.main(sys.argv[1:], prog_name='atlas')\n"
              "except SystemExit as e: assert not e.code, e.code\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {"HF_HUB_OFFLINE": "1", "ATLAS_QUIET": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for args in (["init"], ["import-sae", str(tmp_path / "x.npy"), "--model", "nobody/no-such-model", "--layer", "1",
                                   "--name", "x"]):
        r = subprocess.run([sys.executable, "-c", script, *args, "--store", str(tmp_path / "st")], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
    assert "is not registered" in r.stderr and "offline (HF_HUB_OFFLINE)" in r.stderr


def test_cli_models_add_show_remove_and_import_sae_with_a_folder(store, folders, saelens_folder):
    import json

    from click.testing import CliRunner

    from engine.cli import cli

    s = ["--store", str(store.path)]

    def run(*args):
        res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        return res.exit_code, res.output

    code, out = run("models", "add", "enc", "--source", str(folders["bert"]), "--kind", "encoder", "--json", *s)
    assert code == 0 and json.loads(out)["architecture"] == "BertModel"
    code, out = run("models", "show", "enc", "--json", *s)
    assert code == 0 and json.loads(out)["source_found"] is True and json.loads(out)["kind"] == "encoder"
    code, out = run("models", "--json", *s)
    assert [m["name"] for m in json.loads(out)] == ["enc"]
    # import-sae --model with a folder registers it on the spot (the SAE's d_in=32 is the folder's width)
    code, out = run("import-sae", str(saelens_folder), "--name", "sae", "--model", str(folders["llama"]),
                    "--layer", "1", *s)
    assert code == 0, out
    assert store.atlas("sae").model == "llama" and store.get_model("llama").architecture == "LlamaForCausalLM"
    code, out = run("models", "remove", "llama", *s)
    assert code == 1 and "used by atlases sae" in out
    code, out = run("models", "add", "x", "--source", str(folders["llama"] / "nope"), *s)
    assert code == 1 and "no model folder" in out
    assert run("models", "remove", "enc", *s) == (0, "removed model enc\n")


def test_import_means_makes_an_atlas_of_class_means(store, folders, tmp_path):
    import json

    from engine.align.corpus import read_labelled_corpus
    from engine.models.class_means import MeansRequest, import_means

    rows = [{"text": t, "label": lab, "description": f"about {lab}"}
            for lab, words in (("weather", "rain snow wind sky"), ("music", "violin piano song drums"))
            for t in (f"the {w} and the {v}" for w in words.split() for v in words.split())]
    p = tmp_path / "labelled.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts, labels, desc = read_labelled_corpus(p)
    assert len(texts) == 32 and labels[0] == "weather" and desc["music"] == "about music"
    info = import_means(store, "means", MeansRequest(str(folders["llama"]), -1), texts, labels, desc)
    assert (info.n_concepts, info.dim, info.layer, info.model) == (2, 32, 2, "llama")
    v = store.atlas_vectors("means")
    np.testing.assert_allclose(v[0], -v[1], atol=1e-5)  # two centred means are opposite
    assert store.labels("means") == ["weather", "music"]
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("no tab here\n")
    from engine.errors import FormatError

    with pytest.raises(FormatError, match="label<TAB>text"):
        read_labelled_corpus(tsv)
