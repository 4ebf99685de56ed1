"""Pairing subject and foundation activations of the same content (docs/design.md §5).

Pairs are drawn from two `TokenBatch` records of the same texts, so pairing is a pure function of
arrays and several pairings can share one forward pass:

- ``token``: one pair per token; needs the same tokenizer (checked by fingerprint and per batch).
- ``span``: one pair per word (a run of word characters, or one punctuation mark: a "." or "," is
  paired like a word, so latents that fire on punctuation have a twin to co-fire with) that both
  tokenizations cover, each side
  pooled over its pieces of that word by character offsets — ``last`` piece (default: in a causal
  model the last piece has read the whole word), ``mean`` or ``max`` (elementwise; for SAE codes
  encoded before pooling, ``transform``: a latent fires on a word when it fires on any of its
  pieces). Works across tokenizers; each side reads up to its own model's length
  (``lengths="own"``, `pass_lengths`), so a tokenizer that splits words finely does not cut the other side short.
- ``text``: one pair per text, ``mean``- or ``max``-pooled over its tokens.

Special tokens and padding never reach this module: `engine.models.activations.collect` drops them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.errors import AtlasError, BadValueError, ShapeError, SiteMismatchError
from engine.models.activations import TokenBatch, collect, default_max_length
from engine.models.hooks import Site
from engine.models.loading import tokenizer_fingerprint

# where `iter_batch_pairs` cuts texts: both at the smaller model limit, each at its own, or both at N tokens
Lengths = Literal["shared", "own"] | int

PAIRINGS: tuple[str, ...] = ("token", "span", "text")
# How a span (word) or a text is pooled into one vector.
SPAN_POOLS: tuple[str, ...] = ("last", "mean", "max")
TEXT_POOLS: tuple[str, ...] = ("mean", "max")
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")  # a "span": a run of word characters, or one punctuation mark

@dataclass
class PairChunk:
    """Paired activations of the same content: ``x[layer]`` (n, d_subject) per subject layer and
    ``y`` (n, d_foundation), row ``i`` of each from the same token / word / text."""

    x: dict[int, torch.Tensor]
    y: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int) -> PairChunk:
        return PairChunk({k: v[:n] for k, v in self.x.items()}, self.y[:n])


def word_spans(text: str) -> np.ndarray:
    """Character spans ``(n_words, 2)`` of the words (runs of word characters) and punctuation
    marks (one character each) of a text."""
    spans = [m.span() for m in WORD_PATTERN.finditer(text)]
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def token_words(batch: TokenBatch, texts: Sequence[str]) -> np.ndarray:
    """For each token, the key ``text_index << 32 | word`` of the word holding its last word
    character, or -1 (punctuation, whitespace, no offsets)."""
    keys = np.full(batch.n_tokens, -1, dtype=np.int64)
    if batch.n_tokens == 0:
        return keys
    for ti in np.unique(batch.text_index):
        sel = np.nonzero(batch.text_index == ti)[0]
        text = texts[int(ti)]
        spans = word_spans(text)
        if len(spans) == 0:
            continue
        char_word = np.full(len(text), -1, dtype=np.int64)
        for j, (a, b) in enumerate(spans):
            char_word[a:b] = j
        # last word character at or before each position, and its word
        pos = np.where(char_word >= 0, np.arange(len(text)), -1)
        last_pos = np.maximum.accumulate(pos)
        s, e = batch.offsets[sel, 0], batch.offsets[sel, 1]
        ok = (s >= 0) & (e > s) & (e <= len(text))
        lp = np.where(ok, last_pos[np.clip(e - 1, 0, len(text) - 1)], -1)
        ok &= lp >= s
        w = np.where(ok, char_word[np.clip(lp, 0, None)], -1)
        keys[sel] = np.where(w >= 0, (int(ti) << 32) | w, -1)
    return keys


def _pool(acts: dict[int, torch.Tensor], keys: np.ndarray, pool: str) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Pool rows that share a key (keys < 0 are dropped): ``last`` row, ``mean`` or ``max``."""
    valid = np.nonzero(keys >= 0)[0]
    k = keys[valid]
    uniq, inverse = np.unique(k, return_inverse=True)
    out: dict[int, torch.Tensor] = {}
    if pool == "last":
        # rows are in token order, so the last occurrence of a key is its last piece
        last = len(k) - 1 - np.unique(k[::-1], return_index=True)[1]
        rows = torch.from_numpy(valid[last])
        return uniq, {L: a[rows] for L, a in acts.items()}
    inv = torch.from_numpy(inverse)
    rows = torch.from_numpy(valid)
    for L, a in acts.items():
        a = a[rows]
        if pool == "mean":
            acc = torch.zeros(len(uniq), a.shape[1], dtype=torch.float64)
            acc.index_add_(0, inv, a.double())
            counts = torch.bincount(inv, minlength=len(uniq)).clamp(min=1).double()
            out[L] = (acc / counts[:, None]).to(a.dtype)  # (n_keys, d)
        elif pool == "max":
            acc = torch.full((len(uniq), a.shape[1]), float("-inf"), dtype=a.dtype)
            out[L] = acc.scatter_reduce(0, inv[:, None].expand_as(a), a, reduce="amax")
        else:
            raise BadValueError(f"unknown pool {pool!r}")
    return uniq, out


Transform = Callable[[torch.Tensor], torch.Tensor]


def default_pool(pairing: str) -> str | None:
    return {"token": None, "span": "last", "text": "mean"}[pairing]


def pair_batches(
    sub: TokenBatch,
    fnd: TokenBatch,
    texts: Sequence[str],
    pairing: str,
    subject_layers: Sequence[int],
    foundation_layer: int,
    pool: str | None = None,
    transform: tuple[Transform | None, Transform | None] = (None, None),
) -> PairChunk:
    """Pair the subject's and the foundation's tokens of the same texts (docs/design.md §5).

    ``token``: one pair per token (the tokenizers must agree token for token). ``span``: one pair
    per word present in both, each side pooled over its pieces of the word (``last`` piece,
    ``mean`` or ``max``). ``text``: one pair per text, pooled over its tokens (``mean`` or
    ``max``). ``transform`` (subject, foundation): applied to each side's token activations
    before pooling (e.g. an SAE encoder, so a word's codes are pooled rather than encoded from a
    pooled residual).
    """
    if sub.texts != fnd.texts:
        raise ShapeError(f"batches cover different texts: {sub.texts} vs {fnd.texts}")
    if pairing not in PAIRINGS:
        raise BadValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    pool = pool or default_pool(pairing)
    tx, ty = transform
    xs = {L: tx(sub.acts[L]) if tx else sub.acts[L] for L in subject_layers}
    y = ty(fnd.acts[foundation_layer]) if ty else fnd.acts[foundation_layer]
    if pairing == "token":
        if sub.n_tokens != fnd.n_tokens or not np.array_equal(sub.token_id, fnd.token_id):
            raise SiteMismatchError(
                "token pairing needs the same tokenizer in both models and the two tokenised the corpus "
                "differently; use --pairing span (or text)"
            )
        return PairChunk(xs, y)
    if pairing == "span":
        if pool not in SPAN_POOLS:
            raise BadValueError(f"span pooling must be one of {SPAN_POOLS}, got {pool!r}")
        kx, ky = token_words(sub, texts), token_words(fnd, texts)
    else:
        if pool not in TEXT_POOLS:
            raise BadValueError(f"text pooling must be one of {TEXT_POOLS}, got {pool!r}")
        kx, ky = sub.text_index.copy(), fnd.text_index.copy()
    ux, px = _pool(xs, kx, pool)
    uy, py = _pool({-1: y}, ky, pool)
    _, ix, iy = np.intersect1d(ux, uy, assume_unique=True, return_indices=True)
    ix_t, iy_t = torch.from_numpy(ix), torch.from_numpy(iy)
    return PairChunk({L: v[ix_t] for L, v in px.items()}, py[-1][iy_t])


def check_pairing(pairing: str, subject_tokenizer: Any, foundation_tokenizer: Any) -> None:
    """Raise early when a pairing cannot work with these tokenizers."""
    if pairing not in PAIRINGS:
        raise BadValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "token" and tokenizer_fingerprint(subject_tokenizer) != tokenizer_fingerprint(foundation_tokenizer):
        raise SiteMismatchError(
            "token pairing needs the same tokenizer in both models (their vocabulary fingerprints differ); "
            "use --pairing span"
        )
    if pairing == "span":
        slow = [w for w, t in (("subject", subject_tokenizer), ("foundation", foundation_tokenizer))
                if not getattr(t, "is_fast", False)]
        if slow:
            raise AtlasError(
                f"span pairing needs character offsets, which the {' and '.join(slow)} tokenizer (not a fast "
                "tokenizer) does not give; use --pairing text"
            )


@dataclass(frozen=True)
class PairingConfig:
    """How one pass pairs and streams the activations of the same texts (docs/design.md §5)."""

    pairings: tuple[str, ...] = ("token",)  # token | span | text; several share one forward pass
    pools: dict[str, str | None] = field(default_factory=dict)  # pairing (or "auto") -> pool; default_pool if absent
    max_pairs: int | None = None  # training pairs per pairing; held-out texts are used whole
    batch_size: int = 16  # texts per forward pass
    normalize: bool = False  # statistics of unit-norm rows (Procrustes --normalize)
    dtype: str = "float32"  # dtype both models are loaded in (auto: bfloat16 on CUDA); activations leave as float32
    device: str = "cpu"  # auto | cpu | cuda[:N] | mps (engine.models.devices)
    cache_dir: Path | None = None  # cache both models' activations as shards here
    threads: int | str | None = "auto"  # torch threads; auto: one for narrow models (faster on small d)
    stats_dtype: str = "float32"  # the statistics' products; float64: ~1e-15 relative error, half the speed
    train_sample: int = 0  # training pairs kept as a reservoir sample (a method that trains on pairs: rcsls)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairings", (self.pairings,) if isinstance(self.pairings, str)
                           else tuple(self.pairings))
        for p in self.pairings:
            if p not in PAIRINGS:
                raise BadValueError(f"pairing must be one of {PAIRINGS}, got {p!r}")
        for p, pool in self.pools.items():
            allowed = {"span": SPAN_POOLS, "text": TEXT_POOLS, "auto": SPAN_POOLS + TEXT_POOLS}.get(p, ())
            if pool is not None and pool not in allowed:
                raise BadValueError(f"pool {pool!r} does not apply to {p} pairing (span: {SPAN_POOLS}; text: {TEXT_POOLS})")
        if self.batch_size < 1:
            raise BadValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise BadValueError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.train_sample < 0:
            raise BadValueError(f"train_sample must be >= 0, got {self.train_sample}")
        if self.stats_dtype not in ("float32", "float64"):
            raise BadValueError(f"stats_dtype must be float32 or float64, got {self.stats_dtype!r}")


def iter_batch_pairs(
    subject: tuple[torch.nn.Module, Any],
    foundation: tuple[torch.nn.Module, Any],
    texts: Sequence[str],
    subject_site: Site,
    foundation_site: Site,
    *,
    batch_size: int = 16,
    lengths: Lengths = "shared",
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | Path | None = None,
    desc: str | None = "pairs",
) -> Iterator[tuple[TokenBatch, TokenBatch]]:
    """Run both models over the same batches of texts, yielding their token records in step.

    ``lengths`` says where each side's texts are cut: ``"shared"`` (default) at the smaller of
    the two models' limits, so ``token`` pairing sees the same tokens on both sides; ``"own"``
    (span and text pairing, `pass_lengths`) each side at its own model's limit; a number, both
    sides at that many tokens. With ``cache_dir`` each side's activations are cached as shards there (see
    `engine.models.activations.collect`).
    """
    (sm, stok), (fm, ftok) = subject, foundation
    if isinstance(lengths, int):
        cut = (lengths, lengths)
    elif lengths in ("own", "shared"):
        cut = (default_max_length(sm, stok), default_max_length(fm, ftok))
        if lengths == "shared":
            cut = (min(cut), min(cut))
    else:
        raise BadValueError(f"lengths must be 'shared', 'own' or a number of tokens, got {lengths!r}")
    gen_s = collect(sm, stok, texts, subject_site, batch_size, max_length=cut[0], dtype=dtype,
                    shard_dir=cache_dir, desc=desc)
    gen_f = collect(fm, ftok, texts, foundation_site, batch_size, max_length=cut[1], dtype=dtype,
                    shard_dir=cache_dir, desc=None)
    yield from zip(gen_s, gen_f, strict=True)


def pass_lengths(pairings: Sequence[str]) -> Lengths:
    """Where a pass of these pairings cuts texts: each model at its own length (``"own"``) unless
    one is ``token`` pairing, which needs the same tokens on both sides (``"shared"``)."""
    return "shared" if "token" in pairings else "own"


def iter_pairs(
    subject: tuple[torch.nn.Module, Any],
    foundation: tuple[torch.nn.Module, Any],
    texts: Sequence[str],
    subject_site: Site,
    foundation_site: Site,
    pairing: str = "token",
    pool: str | None = None,
    max_pairs: int | None = None,
    **kwargs: Any,
) -> Iterator[PairChunk]:
    """Stream paired (subject, foundation) activations, ``max_pairs`` at most.

    ``subject`` and ``foundation`` are ``(model, tokenizer)``; the foundation site has one layer;
    ``transform`` goes to `pair_batches`, other keyword arguments to `iter_batch_pairs` (span and
    text pairing: each side at its own length unless ``lengths`` says otherwise).
    ``token`` pairing checks up front that the tokenizers are the same.
    """
    check_pairing(pairing, subject[1], foundation[1])
    s_site, f_site = subject_site.resolved(subject[0]), foundation_site.resolved(foundation[0])
    n = 0
    kwargs.setdefault("lengths", pass_lengths((pairing,)))
    transform = kwargs.pop("transform", (None, None))
    for sb, fb in iter_batch_pairs(subject, foundation, texts, s_site, f_site, **kwargs):
        chunk = pair_batches(sb, fb, texts, pairing, s_site.layers, f_site.layer, pool, transform)
        if max_pairs is not None and n + chunk.n >= max_pairs:
            yield chunk.head(max_pairs - n)
            return
        n += chunk.n
        yield chunk
