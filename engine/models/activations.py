"""Residual-stream activations: hooks, batched collection, and subject/foundation pairing.

Why our own hooks: in transformers 5.x ``output_hidden_states`` is gathered by the library's own
forward hooks, attached at the first forward pass, and does not show edits made by hooks
registered later (docs/design.md §10). A forward hook on block ``L`` sees exactly what block ``L+1``
will read, so ``resid_post`` of ``L`` is the block's output and ``resid_pre`` of ``L`` its input.

Why flat token records: a batch is padded, but padding and special tokens (``<bos>``, ``[CLS]``,
``[SEP]``, ...) must never become pairs. `collect` drops them at the source and yields only the
real tokens of each batch as rows ``(n_tokens, d)`` with their text index, position and character
offsets; pairing (`token`, `span`, `text`, docs/design.md §5) is then a pure function of two such records
over the same texts, and several pairings can be drawn from one forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import AtlasError, BadValueError
from engine.models.devices import empty_cache, is_oom
from engine.models.hooks import Site, forward_to_layers, read_residuals, resolve_layer
from engine.models.loading import as_dtype, model_fingerprint, tokenizer_fingerprint
from engine.progress import progress
from engine.util import corpus_fingerprint, write_atomic

# ----------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (None: leave as is); restored on exit.

    Small models (d ≲ 256) run fastest on one thread, and on a shared machine whose cores are
    busy, many times faster: each tiny kernel otherwise waits for a second thread to be scheduled.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def auto_threads(*models: torch.nn.Module, small_width: int = 256) -> int | None:
    """1 when every model is narrow (d <= ``small_width``), else None (torch's default)."""
    from engine.models.loading import d_model_of

    return 1 if all(d_model_of(m) <= small_width for m in models) else None


# ----------------------------------------------------------------------------- collection


@dataclass
class TokenBatch:
    """The real tokens of a batch of whole texts, one row each (padding and specials dropped).

    ``acts[layer]`` is ``(n_tokens, d)``; ``text_index``, ``position`` and ``token_id`` are
    ``(n_tokens,)``; ``offsets`` is ``(n_tokens, 2)`` character spans into the text (``-1`` when
    the tokenizer gives none). ``texts`` is the half-open range of text indices in the batch.
    """

    texts: tuple[int, int]
    text_index: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    offsets: np.ndarray
    acts: dict[int, torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return int(self.text_index.shape[0])


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[dict[str, list]]:
    """Tokenise texts one by one (no padding), with offsets and special-token masks."""
    kw: dict[str, Any] = dict(add_special_tokens=True, return_special_tokens_mask=True)
    if max_length:
        kw.update(truncation=True, max_length=max_length)
    offsets = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(list(texts), return_offsets_mapping=offsets, **kw)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for i in range(len(texts)):
        ids = list(enc["input_ids"][i])
        special = list(enc["special_tokens_mask"][i]) if "special_tokens_mask" in enc else [0] * len(ids)
        offs = list(enc["offset_mapping"][i]) if offsets else [(-1, -1)] * len(ids)
        keep = [not s and t not in special_ids for t, s in zip(ids, special, strict=True)]
        out.append({"ids": ids, "keep": keep, "offsets": offs})
    return out


def default_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest sequence both the tokenizer and the model's position table accept."""
    cfg = getattr(model, "config", None)
    limits: list[Any] = [getattr(cfg, a, None) for a in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7]
    return min(limits) if limits else 512


def _cache_key(model, tokenizer, texts, layers, site, dtype, batch_size, max_length, max_tokens) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(model).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(corpus_fingerprint(texts).encode())
    h.update(json.dumps([list(layers), site, str(dtype), batch_size, max_length, max_tokens]).encode())
    return h.hexdigest()


def collect(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    site: Site,
    batch_size: int = 16,
    max_tokens: int | None = None,
    *,
    max_length: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    shard_dir: str | Path | None = None,
    desc: str | None = "activations",
) -> Iterator[TokenBatch]:
    """Stream the residuals at ``site`` (its layers, hook point and block list) over ``texts``, batch by batch.

    Texts are right-padded per batch (positions start at 0 for every text, which absolute
    position embeddings need); only real, non-special tokens come out. ``max_tokens`` stops after
    the batch that reaches that many tokens. With ``shard_dir`` the batches are written to
    safetensors shards in ``shard_dir/<key>/`` (the key hashes the model's weights, the tokenizer,
    the texts and these settings), and a later call with the same key reads them back instead of
    running the model; a pass that was not read to its end leaves no reusable cache.
    """
    if batch_size < 1:
        raise BadValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dtype = as_dtype(dtype) or torch.float32
    layer_idx = sorted({resolve_layer(model, layer, site.layer_module) for layer in site.layers})
    max_length = max_length or default_max_length(model, tokenizer)
    cache = None
    if shard_dir is not None:
        key = _cache_key(model, tokenizer, texts, layer_idx, site.hook, out_dtype, batch_size, max_length, max_tokens)
        cache = _ShardCache(Path(shard_dir) / key[:32], key)
        if cache.complete():
            yield from cache.read()
            return
        cache.start()
    yield from _collect(
        model, tokenizer, texts, Site(tuple(layer_idx), site.hook, site.layer_module), batch_size, max_tokens, max_length,
        out_dtype, desc, cache,
    )
    if cache is not None:  # reached only when the consumer read every batch
        cache.mark_done()


def _collect(model, tokenizer, texts, site: Site, batch_size, max_tokens, max_length, out_dtype,
             desc: str | None, cache) -> Iterator[TokenBatch]:
    """`collect`'s pass over the model at ``site`` (its layers resolved), with a progress bar
    named ``desc`` (None: none)."""
    layer_idx = list(site.layers)
    device = next(model.parameters()).device
    n_seen = 0
    micro = batch_size  # texts per forward pass: halved on an out-of-memory error, for good
    bar = progress(total=len(texts), desc=desc, unit="text", quiet=desc is None)
    try:
        with read_residuals(model, layer_idx, site.hook, layer_module=site.layer_module, stop_after_last=True) as cap:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                enc = _encode(tokenizer, chunk, max_length)
                parts: list[_Rows] = []
                i = 0
                while i < len(enc):
                    try:
                        parts.append(_forward_rows(model, enc[i : i + micro], i, cap, layer_idx, device, out_dtype))
                        i += len(enc[i : i + micro])
                    except Exception as e:  # torch.OutOfMemoryError and the RuntimeErrors that say so
                        if not is_oom(e):
                            raise
                        cap.clear()
                        empty_cache(device)
                        if micro == 1:
                            raise AtlasError(
                                f"out of memory on {device} with one text per forward pass; shorten the texts "
                                "(--max-length), use --dtype bfloat16, or run on another --device"
                            ) from e
                        micro = max(1, micro // 2)
                        warnings.warn(f"out of memory on {device}: retrying with {micro} texts per forward pass",
                                      RuntimeWarning, stacklevel=2)
                rows = _Rows.concat(parts, layer_idx)
                batch = TokenBatch(
                    texts=(start, start + len(chunk)),
                    text_index=rows.text + start,
                    position=rows.position,
                    token_id=rows.token_id,
                    offsets=rows.offsets,
                    acts=rows.acts,
                )
                if cache is not None:
                    cache.write(batch)
                bar.update(len(chunk))
                yield batch
                n_seen += batch.n_tokens
                if max_tokens is not None and n_seen >= max_tokens:
                    break
    finally:
        bar.close()


@dataclass
class _Rows:
    """The kept tokens of some texts of a batch: text index within the batch, position, id, offsets, acts."""

    text: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    offsets: np.ndarray
    acts: dict[int, torch.Tensor]

    @staticmethod
    def concat(parts: list[_Rows], layers: Sequence[int]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        return _Rows(
            np.concatenate([p.text for p in parts]), np.concatenate([p.position for p in parts]),
            np.concatenate([p.token_id for p in parts]), np.concatenate([p.offsets for p in parts]),
            {L: torch.cat([p.acts[L] for p in parts]) for L in layers},
        )


def _forward_rows(model, enc: list[dict[str, list]], first: int, cap, layer_idx, device, out_dtype) -> _Rows:
    """One forward pass over the encoded texts ``enc`` (texts ``first…`` of the batch): their kept tokens,
    with activations on the CPU in ``out_dtype``."""
    T = max(len(e["ids"]) for e in enc)
    ids = torch.zeros(len(enc), T, dtype=torch.long)  # pad id is irrelevant: masked out
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e["ids"])] = torch.tensor(e["ids"], dtype=torch.long)
        mask[i, : len(e["ids"])] = 1
    cap.clear()
    forward_to_layers(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    rows_b, rows_t, offs, tok = [], [], [], []
    for i, e in enumerate(enc):
        for pos, k in enumerate(e["keep"]):
            if k:
                rows_b.append(i)
                rows_t.append(pos)
                offs.append(e["offsets"][pos])
                tok.append(e["ids"][pos])
    b = torch.tensor(rows_b, dtype=torch.long)
    t = torch.tensor(rows_t, dtype=torch.long)
    acts = {}
    for L in layer_idx:
        h = cap.acts[L]
        acts[L] = h[b.to(h.device), t.to(h.device)].to("cpu", out_dtype)  # leaves the device in a stable dtype
    return _Rows(np.asarray(rows_b, dtype=np.int64) + first, np.asarray(rows_t, dtype=np.int64),
                 np.asarray(tok, dtype=np.int64), np.asarray(offs, dtype=np.int64).reshape(-1, 2), acts)


class _ShardCache:
    """Activation shards in one folder: ``shard-00000.safetensors``..., and ``manifest.json``
    written last (a cache without a manifest for this key is incomplete and rewritten)."""

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key, self.n = root, key, 0

    def complete(self) -> bool:
        m = self.root / "manifest.json"
        return m.is_file() and json.loads(m.read_text()).get("key") == self.key

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "manifest.json").unlink(missing_ok=True)
        for p in self.root.glob("shard-*.safetensors"):
            p.unlink()

    def write(self, batch: TokenBatch) -> None:
        from safetensors.torch import save_file

        tensors = {f"acts.{L}": a.contiguous() for L, a in batch.acts.items()}
        for name in ("text_index", "position", "token_id", "offsets"):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(getattr(batch, name)))
        tensors["texts"] = torch.tensor(batch.texts, dtype=torch.long)
        save_file(tensors, str(self.root / f"shard-{self.n:05d}.safetensors"))
        self.n += 1

    def mark_done(self) -> None:
        write_atomic(self.root / "manifest.json", json.dumps({"key": self.key, "n_shards": self.n}).encode())

    def read(self) -> Iterator[TokenBatch]:
        from safetensors.torch import load_file

        n = json.loads((self.root / "manifest.json").read_text())["n_shards"]
        for i in range(n):
            d = load_file(str(self.root / f"shard-{i:05d}.safetensors"))
            acts = {int(k.split(".", 1)[1]): v for k, v in d.items() if k.startswith("acts.")}
            lo, hi = (int(v) for v in d["texts"])
            yield TokenBatch(
                texts=(lo, hi), text_index=d["text_index"].numpy(), position=d["position"].numpy(),
                token_id=d["token_id"].numpy(), offsets=d["offsets"].numpy(), acts=acts,
            )
