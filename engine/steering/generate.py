"""Generation under steering edits, side by side with the unsteered text, and the fluency guard.

Prompts are batched by token length, so no padding enters the model and ``positions="new"`` has
one prompt length per batch; steered and unsteered runs share a seed, so they differ only by the
edit. Perplexity of a continuation under the unsteered model is the fluency guard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from engine.errors import BadValueError, ShapeError
from engine.models.activations import collect
from engine.models.hooks import Site
from engine.steering.edits import Positions, SteeringEdit, steer


@dataclass(frozen=True)
class Generation:
    """One continuation: the prompt, the generated text and its token ids (prompt excluded)."""

    prompt: str
    text: str
    token_ids: list[int]


def special_token_ids(tokenizer: Any) -> list[int]:
    """Every special token id of the tokenizer (the end-of-document token among them)."""
    return sorted({int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None})


def _group_by_length(tokenizer: Any, prompts: Sequence[str]) -> tuple[list[list[int]], dict[int, list[int]]]:
    enc = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        if not ids:
            raise ShapeError(f"prompt {prompts[i]!r} tokenises to nothing; give a non-empty prompt")
        groups.setdefault(len(ids), []).append(i)
    return enc, groups


EVAL_BATCH_ELEMENTS = 1 << 20  # rows x d_model x layers per evaluation batch (a bound on the key/value cache)


def eval_batch_rows(model: torch.nn.Module) -> int:
    """Rows per batch for an evaluation's many trials: a small model's step costs about the same
    for 16 rows as for 512 (fixed per-call overhead), so it gets large batches; a large model gets
    fewer rows, so its key/value cache stays small. The rows are the same either way."""
    from engine.models.hooks import resolve_blocks
    from engine.models.loading import d_model_of

    per_row = d_model_of(model) * max(1, len(resolve_blocks(model)))
    return max(16, min(512, EVAL_BATCH_ELEMENTS // per_row))


@dataclass(frozen=True)
class GenerationSettings:
    """How `generate` continues a prompt: ``max_new_tokens`` new tokens, greedy unless ``do_sample``
    (then at ``temperature``, from a generator seeded with ``seed``), with the key/value cache
    unless ``use_cache`` is off (the same tokens either way)."""

    max_new_tokens: int = 20
    seed: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    use_cache: bool = True


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    edits: Sequence[SteeringEdit] = (),
    *,
    positions: Positions = "all",
    settings: GenerationSettings = GenerationSettings(),
    blocked: Sequence[int] | None = None,
    batch_size: int = 64,
    layer_module: str | None = None,
) -> list[Generation]:
    """Continue each prompt under ``edits`` (none: unsteered) with ``model.generate``.

    Prompts are batched by token length, so no padding enters the model and ``positions="new"``
    has one prompt length per batch. Greedy by default; with ``settings.do_sample`` each batch
    draws from a generator seeded with ``settings.seed`` (the global RNG is restored afterwards),
    so a steered and an unsteered run with the same seed are comparable. ``blocked`` token ids are
    never generated (pass `special_token_ids` to keep the end-of-document token out).
    """
    max_new_tokens, seed, do_sample = settings.max_new_tokens, settings.seed, settings.do_sample
    if max_new_tokens < 1:
        raise BadValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for e in edits:
        if e.n_rows is not None and e.n_rows != len(prompts):
            raise ShapeError(f"a per-row edit has {e.n_rows} rows for {len(prompts)} prompts: one per prompt is needed")
    enc, groups = _group_by_length(tokenizer, prompts)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    stop = {int(eos)} if eos is not None and int(eos) not in set(blocked or ()) else set()
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=settings.use_cache, pad_token_id=pad,
        num_beams=1,
    )
    if do_sample:
        kwargs.update(temperature=settings.temperature, top_k=0, top_p=1.0)
    if blocked:
        kwargs["suppress_tokens"] = [int(t) for t in blocked]
    if not stop:
        kwargs["eos_token_id"] = None
    out: list[Generation | None] = [None] * len(prompts)
    devices = [device] if device.type == "cuda" else []
    for length, idx in sorted(groups.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([enc[i] for i in chunk], device=device)  # (B, T)
            chunk_edits = [e.rows(chunk) for e in edits]
            with torch.random.fork_rng(devices=devices), steer(
                model, chunk_edits, positions, prompt_length=length, layer_module=layer_module
            ):
                torch.manual_seed(seed)
                # generate() is transformers' GenerationMixin, unknown to torch.nn.Module's typing
                seqs = cast(Any, model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            for row, i in enumerate(chunk):
                new = seqs[row, length:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stop), None)
                new = new if cut is None else new[:cut]
                text = tokenizer.decode(new, skip_special_tokens=True)
                out[i] = Generation(prompts[i], text, new)
    return [g for g in out if g is not None]


@dataclass(frozen=True)
class SidePair:
    """A steered and an unsteered continuation of one prompt, from the same seed."""

    prompt: str
    unsteered: str
    steered: str
    unsteered_ids: list[int]
    steered_ids: list[int]


def generate_pair(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], edits: Sequence[SteeringEdit], **kwargs: Any
) -> list[SidePair]:
    """Unsteered and steered continuations of ``prompts`` side by side (same seed and settings)."""
    base = generate(model, tokenizer, prompts, (), **kwargs)
    steered = generate(model, tokenizer, prompts, edits, **kwargs)
    return [SidePair(p, b.text, s.text, b.token_ids, s.token_ids) for p, b, s in zip(prompts, base, steered)]


@torch.no_grad()
def continuation_nll_rows(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Per continuation: the negative log-likelihood of its token ids after its prompt, under
    ``model`` as it is (no edits), and the number of tokens scored; two ``(n,)`` arrays.
    Sequences of equal prompt and continuation lengths are scored in one batch (no padding)."""
    enc = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list[int]] = {}
    for i, cont in enumerate(continuations):
        if len(cont):
            groups.setdefault((len(enc[i]), len(cont)), []).append(i)
    nll = np.zeros(len(continuations), dtype=np.float64)
    n = np.zeros(len(continuations), dtype=np.int64)
    for (n_prompt, n_cont), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            seq = torch.tensor([enc[i] + list(continuations[i]) for i in chunk], device=device)  # (B, T)
            logits = model(input_ids=seq, use_cache=False).logits[:, n_prompt - 1 : -1].float()  # (B, n_cont, V)
            target = seq[:, n_prompt:]  # (B, n_cont)
            ll = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, n_cont)
            nll[chunk] = -ll.double().sum(-1).cpu().numpy()
            n[chunk] = n_cont
    return nll, n


def continuation_nll(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``continuations`` (token ids) after their prompts, under
    ``model`` as it is (no edits), and the number of tokens scored (`continuation_nll_rows`, summed)."""
    nll, n = continuation_nll_rows(model, tokenizer, prompts, continuations, batch_size)
    return float(nll.sum()), int(n.sum())


def perplexity(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
               continuations: Sequence[Sequence[int]]) -> float:
    """exp(mean NLL per token) of the continuations under the unsteered ``model`` (fluency guard)."""
    nll, n = continuation_nll(model, tokenizer, prompts, continuations)
    return math.exp(nll / n) if n else float("nan")


@torch.no_grad()
def typical_norm(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], layer: int,
                 batch_size: int = 16, layer_module: str | None = None) -> float:
    """Mean L2 norm of ``resid_post`` at ``layer`` over the real tokens of ``texts``.

    The maps store this figure for their subject site; this measures it for a direction that
    comes without a map (a native direction, a direction from a file).
    """

    total, n = 0.0, 0
    for batch in collect(model, tokenizer, list(texts), Site((layer,), layer_module=layer_module),
                         batch_size=batch_size, desc=None):
        a = next(iter(batch.acts.values()))  # (n_tokens, d)
        total += float(torch.linalg.vector_norm(a.double(), dim=-1).sum())
        n += batch.n_tokens
    if n == 0:
        raise ShapeError("no tokens to measure the residual norm on; give non-empty texts")
    return total / n
