"""The steering executor on tiny random GPT-2, Llama and Gemma2 models saved and reloaded locally.

What is checked: hooks come off after the context (also on an exception, and removal is
idempotent); an additive edit moves the residual at its layer by exactly the expected vector, as
read by our own reader hook; clamp sets the projection; greedy generation gives the same token
ids with and without the KV cache, for both position modes; a direction of the wrong width is a
clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ShapeError, SiteMismatchError
from engine.models.hooks import read_residuals, resolve_blocks
from engine.models.loading import load_model
from engine.steering.edits import STEERING_MODES, SteeringEdit, steer
from engine.steering.generate import (
    GenerationSettings,
    generate,
    generate_pair,
    perplexity,
    special_token_ids,
    typical_norm,
)

WORDS = ("the a and then there was it is in with of we i think but so red blue green lion tiger bear "
         "rain snow wind guitar piano drum apple pear plum . ,").split()
TEXTS = [
    "the red lion and the blue tiger .",
    "there was rain and snow in the wind .",
    "i think the guitar is better than the piano .",
    "we ate an apple , a pear and a plum .",
]
ARCHS = ("gpt2", "llama", "gemma2")
D = 32


def tiny_config(arch: str, vocab: int, tok):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_embd=D, n_layer=3, n_head=2, n_positions=64, **ids)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **ids)
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        sliding_window=16, **ids)


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random tiny causal LM of ``arch`` with a word-level tokenizer, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    from engine.world.tokenizers import train_word_tokenizer

    tok = train_word_tokenizer([" ".join(WORDS)] + TEXTS, max_length=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok))
    with torch.no_grad():  # larger random logits: greedy choices far from ties
        model.get_output_embeddings().weight.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    folder = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    model, tok = load_model(folder)
    return request.param, model, tok


def unit(seed: int, d: int = D) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d)
    return v / np.linalg.norm(v)


def n_hooks(model) -> int:
    blocks = resolve_blocks(model)
    return len(model._forward_pre_hooks) + sum(len(b._forward_hooks) for b in blocks)


def forward(model, tok, text: str) -> None:
    with torch.no_grad():
        model(input_ids=tok([text], return_tensors="pt")["input_ids"], use_cache=False)


# ----------------------------------------------------------------------------- hooks


def test_hooks_removed_after_context_and_on_exception(tiny):
    _, model, tok = tiny
    before = n_hooks(model)
    edits = [SteeringEdit(1, unit(0), 2.0, 1.0)]
    with steer(model, edits, positions="new", prompt_length=2) as hooks:
        assert hooks.active and n_hooks(model) == before + 2  # block hook + position tracker
    assert n_hooks(model) == before and not hooks.active
    hooks.remove()  # idempotent
    hooks.remove()
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, edits):
            assert n_hooks(model) == before + 1
            raise RuntimeError("boom")
    assert n_hooks(model) == before


def test_add_moves_the_residual_by_exactly_the_vector(tiny):
    _, model, tok = tiny
    u, layer, strength, norm = unit(1), 1, 1.5, 3.0
    text = TEXTS[0]
    with read_residuals(model, [layer, 2]) as cap:
        forward(model, tok, text)
        base = {k: v.clone() for k, v in cap.acts.items()}
    # The edit is prepended, so a reader installed after it (prepend=False) sees the edited stream.
    with steer(model, [SteeringEdit(layer, u, strength, norm)]):
        with read_residuals(model, [layer, 2], prepend=False) as cap:
            forward(model, tok, text)
            steered = {k: v.clone() for k, v in cap.acts.items()}
    diff = (steered[layer] - base[layer])[0].numpy()  # (T, d)
    np.testing.assert_allclose(diff, np.broadcast_to(strength * norm * u, diff.shape), atol=1e-5)
    assert not torch.allclose(steered[2], base[2])  # later layers see the edit
    with read_residuals(model, [layer]) as cap:  # hooks gone: back to unsteered
        forward(model, tok, text)
        torch.testing.assert_close(cap.acts[layer], base[layer])


def test_prepended_edit_also_shows_in_hidden_states(tiny):
    """transformers 5.x gathers hidden_states with its own hooks (docs/design.md §10); the edit is
    prepended, so they see it too: hidden_states[L + 1] is block L's edited output."""
    _, model, tok = tiny
    u, layer = unit(9), 1
    ids = tok([TEXTS[0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
        with steer(model, [SteeringEdit(layer, u, 1.0, 3.0)]):
            steered = model(input_ids=ids, output_hidden_states=True).hidden_states
    diff = (steered[layer + 1] - base[layer + 1])[0].numpy()
    np.testing.assert_allclose(diff, np.broadcast_to(3.0 * u, diff.shape), atol=1e-5)
    torch.testing.assert_close(steered[layer], base[layer])


def test_add_positions_new_leaves_the_prompt_alone(tiny):
    _, model, tok = tiny
    u, layer = unit(2), 0
    text = TEXTS[1]
    n_prompt = 4
    with read_residuals(model, [layer]) as cap:
        forward(model, tok, text)
        base = cap.acts[layer].clone()
    with steer(model, [SteeringEdit(layer, u, 1.0, 2.0)], positions="new", prompt_length=n_prompt):
        with read_residuals(model, [layer], prepend=False) as cap:
            forward(model, tok, text)
            steered = cap.acts[layer].clone()
    diff = (steered - base)[0].numpy()
    np.testing.assert_allclose(diff[:n_prompt], 0.0, atol=1e-6)
    np.testing.assert_allclose(diff[n_prompt:], np.broadcast_to(2.0 * u, diff[n_prompt:].shape), atol=1e-5)


def test_clamp_sets_the_projection(tiny):
    _, model, tok = tiny
    u, layer, strength, norm = unit(3), 2, -0.5, 4.0
    with steer(model, [SteeringEdit(layer, u, strength, norm, mode="clamp")]):
        with read_residuals(model, [layer], prepend=False) as cap:
            forward(model, tok, TEXTS[2])
            h = cap.acts[layer][0].numpy()  # (T, d)
    np.testing.assert_allclose(h @ u.astype(np.float32), strength * norm, atol=1e-4)
    with read_residuals(model, [layer]) as cap:
        forward(model, tok, TEXTS[2])
        h0 = cap.acts[layer][0].numpy()
    # Only the component along u changed.
    rest = (h - h0) - np.outer((h - h0) @ u, u)
    np.testing.assert_allclose(rest, 0.0, atol=1e-4)


def test_several_edits_and_layers_combine(tiny):
    _, model, tok = tiny
    a, b = unit(4), unit(5)
    edits = [SteeringEdit(1, a, 1.0, 2.0), SteeringEdit(1, b, 0.5, 2.0)]
    with read_residuals(model, [1]) as cap:
        forward(model, tok, TEXTS[3])
        base = cap.acts[1][0].numpy().copy()
    with steer(model, edits), read_residuals(model, [1], prepend=False) as cap:
        forward(model, tok, TEXTS[3])
        diff = cap.acts[1][0].numpy() - base
    np.testing.assert_allclose(diff, np.broadcast_to(2.0 * a + 1.0 * b, diff.shape), atol=1e-5)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("positions", ["all", "new"])
@pytest.mark.parametrize("mode", sorted(STEERING_MODES))
def test_cache_on_and_off_give_identical_tokens(tiny, positions, mode):
    _, model, tok = tiny
    prompts = ["the", "there was a", "and then the", "it is a"]
    edits = [SteeringEdit(1, unit(6), 2.0, 5.0, mode=mode)]
    kw = dict(positions=positions, blocked=special_token_ids(tok))
    cached = generate(model, tok, prompts, edits, settings=GenerationSettings(10, use_cache=True), **kw)
    plain = generate(model, tok, prompts, edits, settings=GenerationSettings(10, use_cache=False), **kw)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    assert all(len(g.token_ids) == 10 for g in cached)
    unsteered = generate(model, tok, prompts, (), settings=GenerationSettings(10), **kw)
    assert [g.token_ids for g in unsteered] != [g.token_ids for g in cached]


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny):
    _, model, tok = tiny
    edits = [SteeringEdit(1, unit(7), 1.0, 5.0)]
    kw = dict(settings=GenerationSettings(10, seed=3, do_sample=True), blocked=special_token_ids(tok))
    state = torch.random.get_rng_state()
    a = generate(model, tok, ["the", "we"], edits, **kw)
    b = generate(model, tok, ["the", "we"], edits, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert torch.equal(state, torch.random.get_rng_state())


def test_pair_and_perplexity(tiny):
    _, model, tok = tiny
    pairs = generate_pair(model, tok, ["the", "in the"], [SteeringEdit(2, unit(8), 3.0, 5.0)],
                          settings=GenerationSettings(8), blocked=special_token_ids(tok))
    assert [p.prompt for p in pairs] == ["the", "in the"]
    assert any(p.steered_ids != p.unsteered_ids for p in pairs)
    ppl = perplexity(model, tok, [p.prompt for p in pairs], [p.unsteered_ids for p in pairs])
    assert 1.0 <= ppl < len(tok) * 10
    nll = 0.0  # the batched figure equals a token-by-token computation
    for p in pairs:
        ids = tok([p.prompt])["input_ids"][0] + p.unsteered_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        nll -= sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - len(p.unsteered_ids), len(ids)))
    assert ppl == pytest.approx(np.exp(nll / sum(len(p.unsteered_ids) for p in pairs)), rel=1e-4)


def test_typical_norm_matches_a_direct_measurement(tiny):
    _, model, tok = tiny
    n = typical_norm(model, tok, TEXTS, layer=1)
    with read_residuals(model, [1]) as cap:
        norms = []
        for t in TEXTS:
            forward(model, tok, t)
            norms.append(cap.acts[1][0, 1:].norm(dim=-1))  # <bos> is special: not counted
    assert n == pytest.approx(float(torch.cat(norms).mean()), rel=1e-5)


def test_mode_registry_refuses_duplicates_and_unknown_modes():
    from engine.steering.edits import register_mode

    with pytest.raises(ValueError, match="already registered"):
        register_mode("add")(lambda h, u, t: h)
    with pytest.raises(ValueError, match="mode must be one of"):
        SteeringEdit(0, unit(0), 1.0, 1.0, mode="multiply")


def test_wrong_width_is_a_clear_error(tiny):
    _, model, tok = tiny
    with pytest.raises(SiteMismatchError, match="dimension 16.*width 32"):
        with steer(model, [SteeringEdit(0, np.ones(16), 1.0, 1.0, label="weather")]):
            pass
    assert n_hooks(model) == n_hooks(model)  # nothing installed


@pytest.mark.parametrize("mode", sorted(STEERING_MODES))
def test_per_row_edits_match_one_edit_per_prompt(tiny, mode):
    _, model, tok = tiny
    prompts = ["the", "there was a", "the", "and then the"]
    dirs = np.stack([unit(10 + i) for i in range(len(prompts))])  # (4, d)
    kw = dict(settings=GenerationSettings(6), blocked=special_token_ids(tok))
    batched = generate(model, tok, prompts, [SteeringEdit(1, dirs, 2.0, 5.0, mode)], **kw)
    single = [generate(model, tok, [p], [SteeringEdit(1, d, 2.0, 5.0, mode)], **kw)[0] for p, d in zip(prompts, dirs)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    with pytest.raises(ShapeError, match="3 rows for 4 prompts"):
        generate(model, tok, prompts, [SteeringEdit(1, dirs[:3], 2.0, 5.0)], **kw)


@pytest.mark.parametrize("mode", sorted(STEERING_MODES))
def test_per_row_strengths_match_one_strength_per_call(tiny, mode):
    _, model, tok = tiny
    prompts = ["the", "there was a", "and then the"]
    dirs = np.stack([unit(20 + i) for i in range(len(prompts))])
    strengths = (0.1, 40.0)
    kw = dict(settings=GenerationSettings(6), blocked=special_token_ids(tok))
    both = generate(model, tok, prompts * 2, [SteeringEdit(1, np.tile(dirs, (2, 1)), np.repeat(strengths, 3), 5.0,
                                                           mode)], **kw)
    each = [g for s in strengths for g in generate(model, tok, prompts, [SteeringEdit(1, dirs, s, 5.0, mode)], **kw)]
    assert [g.token_ids for g in both] == [g.token_ids for g in each]
    assert [g.token_ids for g in both[:3]] != [g.token_ids for g in both[3:]]  # the strengths did differ


def test_per_row_strengths_need_a_per_row_direction():
    with pytest.raises(ShapeError, match="per-row strengths"):
        SteeringEdit(1, unit(1), np.array([1.0, 2.0]), 5.0)
    with pytest.raises(ShapeError, match="per-row strengths"):
        SteeringEdit(1, np.stack([unit(1), unit(2)]), np.array([1.0, 2.0, 3.0]), 5.0)
    e = SteeringEdit(1, np.stack([unit(1), unit(2), unit(3)]), np.array([1.0, 2.0, 3.0]), 5.0)
    assert list(e.rows([2, 0]).target) == [15.0, 5.0]
