"""Build and train the world's `transformers` models with a plain torch loop on CPU.

Training is budgeted in optimiser steps, never in wall-clock time, so a seed gives the same
weights on any machine speed (docs/design.md §7: steps, not tokens, teach the topic). Each training
sequence is one document: ``<bos> text <eos>``, right-padded within its batch; pads are masked
and carry no loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from engine.progress import progress

Architecture = Literal["gpt2", "llama", "gpt_neox"]
ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "gpt_neox")


@dataclass(frozen=True)
class ModelSpec:
    """Shape and training budget of one world model."""

    architecture: Architecture
    d_model: int
    n_layers: int
    n_heads: int
    seed: int  # added to the world seed: each model starts from its own initialisation
    steps: int
    batch_size: int
    lr: float
    max_length: int  # longest training sequence, <bos> and <eos> included
    warmup_steps: int = 50  # a short warm-up keeps lr 5e-3 stable from step 0
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        for field in ("d_model", "n_layers", "steps", "batch_size", "max_length"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**d)


def model_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The `transformers` config of a world model (no dropout: the corpus is never short of data)."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    vocab = len(tokenizer)
    if spec.architecture == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_positions=spec.max_length, n_embd=spec.d_model,
                          n_layer=spec.n_layers, n_head=spec.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **ids)
    if spec.architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=spec.d_model, intermediate_size=4 * spec.d_model,
                           num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                           num_key_value_heads=spec.n_heads, max_position_embeddings=spec.max_length,
                           tie_word_embeddings=True, **ids)
    from transformers import GPTNeoXConfig

    # rotary_pct is a legacy keyword GPTNeoXConfig still reads (into rope_parameters' partial_rotary_factor)
    # but no longer declares, so its typed signature rejects it.
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=spec.d_model, intermediate_size=4 * spec.d_model,  # type: ignore[call-arg]
                         num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                         max_position_embeddings=spec.max_length, rotary_pct=0.5, hidden_dropout=0.0,
                         attention_dropout=0.0, tie_word_embeddings=True, **ids)


def make_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM for ``spec``, seeded by ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(spec, tokenizer))


def encode_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, max_length: int) -> list[list[int]]:
    """``<bos> text <eos>`` token ids per document, cut to ``max_length`` (the cut loses the <eos>)."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [(ids + [eos])[:max_length] for ids in enc]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` to the longest; return ids ``(B, T)`` and a bool mask of real tokens ``(B, T)``."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def _lr_at(step: int, spec: ModelSpec) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(model: PreTrainedModel, docs: Sequence[Sequence[int]], spec: ModelSpec, seed: int,
                pad_id: int, desc: str = "train", quiet: bool = False,
                callback: Callable[[int, PreTrainedModel], None] | None = None, every: int = 0,
                on_steps: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``spec.steps`` AdamW steps on ``docs``; return the loss per step.

    Batches are drawn from seeded epoch permutations of ``docs``, so the run is deterministic
    for a seed on a given machine. Progress goes to a bar, or to ``on_steps(n_new_steps)``
    (every 10 steps) when given. ``callback(step, model)`` runs every ``every`` steps (for
    learning curves); it must leave the model as it found it.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(docs), generator=gen).tolist()
    pos = 0
    bar = progress(total=spec.steps, desc=desc, unit="step", quiet=quiet or on_steps is not None)
    for step in range(spec.steps):
        if pos + spec.batch_size > len(order):
            order, pos = torch.randperm(len(docs), generator=gen).tolist(), 0
        batch = [docs[i] for i in order[pos : pos + spec.batch_size]]
        pos += spec.batch_size
        ids, mask = pad_batch(batch, pad_id)  # (B, T)
        labels = ids.masked_fill(~mask, -100)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if on_steps is not None and ((step + 1) % 10 == 0 or step + 1 == spec.steps):
            on_steps(10 if (step + 1) % 10 == 0 else (step + 1) % 10)
        if callback is not None and every and (step + 1) % every == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
