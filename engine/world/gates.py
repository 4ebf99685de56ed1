"""Learnability gates: is a world model good enough for scores built on it to mean anything?

Three measurements per model, all on held-out documents (docs/design.md §7):

- perplexity per predicted token against a unigram baseline fitted on the training documents
  (add-one smoothing, same tokenizer): the model learnt the language at all;
- a linear probe on the mean ``resid_post`` of a document at the atlas layer, fitted on training
  documents, scored on held-out ones: the topic is linearly readable where the atlas lives;
- topic persistence: the greedy 20-token continuation of a held-out document's first sentence
  (special tokens, the end-of-document token among them, blocked) has the document's concept as
  its strict plurality concept: the model tracks the topic, which is what steering and alignment
  rely on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.world.concepts import Concept
from engine.world.corpus import Document, first_sentence, plurality_concept
from engine.world.train import pad_batch


@dataclass
class ModelGates:
    """The gate figures of one world model."""

    model: str
    heldout_perplexity: float
    unigram_perplexity: float
    probe_accuracy: float
    persistence: float
    probe_layer: int
    n_heldout: int
    n_persistence: int


@dataclass
class GateThresholds:
    """What a model must reach (the issue's gates); perplexity must be below ``max_ppl_ratio`` x unigram."""

    min_probe_accuracy: float = 0.9
    min_persistence: float = 0.6
    max_ppl_ratio: float = 0.1  # "far below": at least ten times lower


@dataclass
class WorldReport:
    """Gate figures of every model of a world, with the thresholds they were held to."""

    models: list[ModelGates]
    thresholds: GateThresholds = field(default_factory=GateThresholds)

    def failures(self) -> list[str]:
        """One line per gate a model misses (empty when the world is learnable)."""
        t = self.thresholds
        out = []
        for g in self.models:
            if g.heldout_perplexity > t.max_ppl_ratio * g.unigram_perplexity:
                out.append(f"{g.model}: perplexity {g.heldout_perplexity:.2f} is not below "
                           f"{t.max_ppl_ratio} x unigram {g.unigram_perplexity:.2f}")
            if g.probe_accuracy < t.min_probe_accuracy:
                out.append(f"{g.model}: probe accuracy {g.probe_accuracy:.3f} < {t.min_probe_accuracy}")
            if g.persistence < t.min_persistence:
                out.append(f"{g.model}: persistence {g.persistence:.3f} < {t.min_persistence}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        return {"models": [vars(g) for g in self.models], "thresholds": vars(self.thresholds)}

    @classmethod
    def from_dict(cls, d: dict) -> WorldReport:
        return cls([ModelGates(**g) for g in d["models"]], GateThresholds(**d["thresholds"]))


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, docs: Sequence[Sequence[int]], pad_id: int,
                       batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood) per predicted token of ``docs`` (token ids with <bos>, <eos>)."""
    model.eval()
    nll, n = 0.0, 0
    for start in range(0, len(docs), batch_size):
        ids, mask = pad_batch(docs[start : start + batch_size], pad_id)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()  # (B, T-1, V)
        target = ids[:, 1:]
        keep = mask[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        nll -= float(logp[keep].sum())
        n += int(keep.sum())
    return math.exp(nll / n)


def unigram_perplexity(train_docs: Sequence[Sequence[int]], heldout_docs: Sequence[Sequence[int]],
                       vocab_size: int) -> float:
    """Perplexity of an add-one unigram model of the training tokens on the held-out tokens (<bos> not predicted)."""
    counts = Counter(t for d in train_docs for t in d[1:])
    total = sum(counts.values()) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for d in heldout_docs for t in d[1:])
    return math.exp(nll / sum(len(d) - 1 for d in heldout_docs))


def probe_accuracy(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                   ridge: float = 1e-2) -> float:
    """Held-out accuracy of a linear (ridge, one-vs-all) probe on standardised features ``(n, d)``."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xs = np.hstack([(train_x - mu) / sd, np.ones((len(train_x), 1))])  # (n, d+1)
    xt = np.hstack([(test_x - mu) / sd, np.ones((len(test_x), 1))])
    n_classes = int(max(max(train_y), max(test_y))) + 1
    y = np.eye(n_classes)[np.asarray(train_y)]  # (n, K) one-hot
    w = np.linalg.solve(xs.T @ xs + ridge * len(xs) * np.eye(xs.shape[1]), xs.T @ y)  # (d+1, K)
    return float(((xt @ w).argmax(1) == np.asarray(test_y)).mean())


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, tokenizer, prompts: Sequence[str], n_new: int = 20,
                         blocked: Sequence[int] | None = None) -> list[str]:
    """Greedy ``n_new``-token continuations of ``prompts`` (decoded, special tokens skipped).

    ``blocked`` token ids (default: every special token, so the end-of-document token among
    them) are never chosen. Prompts are batched by token length, so no padding is needed.
    """
    model.eval()
    if blocked is None:
        blocked = tokenizer.all_special_ids
    enc = tokenizer(list(prompts))["input_ids"]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([enc[i] for i in idx])  # (B, T)
        res = model(input_ids=ids, use_cache=True)
        new = []
        for _ in range(n_new):
            logits = res.logits[:, -1].float()  # (B, V)
            logits[:, list(blocked)] = -math.inf
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            res = model(input_ids=nxt, past_key_values=res.past_key_values, use_cache=True)
        gen = torch.cat(new, 1)  # (B, n_new)
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[j].tolist(), skip_special_tokens=True)
    return out


def persistence(model: torch.nn.Module, tokenizer, heldout: Sequence[Document], concepts: Sequence[Concept],
                n_new: int = 20) -> float:
    """Share of held-out documents whose first sentence's greedy continuation keeps the document's concept."""
    conts = greedy_continuations(model, tokenizer, [first_sentence(t) for t, _ in heldout], n_new)
    return float(np.mean([plurality_concept(c, concepts) == k for c, (_, k) in zip(conts, heldout)]))


def measure_model(name: str, model: torch.nn.Module, tokenizer, train_docs: Sequence[Document],
                  heldout: Sequence[Document], probe_docs: Sequence[Document], concepts: Sequence[Concept],
                  layer: int, max_length: int) -> ModelGates:
    """All gate figures of one model: perplexities on ``heldout``, a probe fitted on ``probe_docs``
    at ``layer`` and scored on ``heldout``, and persistence on ``heldout``."""
    from engine.world.directions import document_means
    from engine.world.train import encode_documents

    train_ids = encode_documents([t for t, _ in train_docs], tokenizer, max_length)
    heldout_ids = encode_documents([t for t, _ in heldout], tokenizer, max_length)
    tr, _ = document_means(model, tokenizer, [t for t, _ in probe_docs], [layer])
    te, _ = document_means(model, tokenizer, [t for t, _ in heldout], [layer])
    return ModelGates(
        model=name,
        heldout_perplexity=heldout_perplexity(model, heldout_ids, tokenizer.pad_token_id),
        unigram_perplexity=unigram_perplexity(train_ids, heldout_ids, len(tokenizer)),
        probe_accuracy=probe_accuracy(tr[layer], [k for _, k in probe_docs], te[layer], [k for _, k in heldout]),
        persistence=persistence(model, tokenizer, heldout, concepts),
        probe_layer=layer,
        n_heldout=len(heldout),
        n_persistence=len(heldout),
    )
