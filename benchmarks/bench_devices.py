"""Activation collection (tokens/s) and steered generation on each available device, one run each.

A GPT-2-shaped model (``--layers`` × ``--d``, random weights, built locally: nothing is downloaded)
and a word-level tokenizer; the same texts on every device. Reports, per device and dtype:
tokens/s of `engine.models.activations.collect` over all layers, and seconds for a steered /
unsteered generation pair (`engine.steering.generate.generate_pair`).

    python benchmarks/bench_devices.py [--devices cpu,cuda] [--layers 12] [--d 768] [--texts 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from engine.models.activations import collect
from engine.models.hooks import Site
from engine.models.loading import load_model
from engine.steering.edits import SteeringEdit
from engine.steering.generate import generate_pair

WORDS = ("the a red green blue cat dog bird rain snow wind sun song piano drum violin city river road "
         "house tree stone fire water day night small big old new quiet loud").split()


def build(folder: Path, layers: int, d: int) -> Path:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 40)) for _ in range(200)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                     eos_token="<eos>", model_max_length=256)
    cfg = T.GPT2Config(n_layer=layers, n_embd=d, n_head=max(1, d // 64), vocab_size=tok.get_vocab_size(),
                       n_positions=256, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    T.GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(folder: Path, device: str, dtype: str, n_texts: int, layers: int) -> dict:
    model, tok = load_model(folder, device=device, dtype=dtype)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, 120)) for _ in range(n_texts)]
    list(collect(model, tok, texts[:16], Site(tuple(range(layers))), batch_size=16, desc=None))  # warm-up
    sync(device)
    t = time.perf_counter()
    n = sum(b.n_tokens for b in collect(model, tok, texts, Site(tuple(range(layers))), batch_size=32, desc=None))
    sync(device)
    collect_s = time.perf_counter() - t
    u = np.random.default_rng(2).normal(size=model.config.n_embd).astype(np.float32)
    edit = SteeringEdit(layers // 2, u, 1.0, 1.0)
    t = time.perf_counter()
    generate_pair(model, tok, ["the red cat"] * 8, [edit], max_new_tokens=32)
    sync(device)
    return {"device": device, "dtype": dtype, "tokens": n, "collect_tokens_per_s": round(n / collect_s),
            "steered_pair_s": round(time.perf_counter() - t, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "gpt2", args.layers, args.d)
        for device in args.devices.split(","):
            for dtype in ("float32", "bfloat16") if device.startswith("cuda") else ("float32",):
                rows.append(measure(folder, device, dtype, args.texts, args.layers))
    if args.json:
        print(json.dumps(rows))
        return
    base = rows[0]["collect_tokens_per_s"]
    for r in rows:
        print(f"{r['device']:>7} {r['dtype']:>9}: collect {r['collect_tokens_per_s']:>9,} tokens/s "
              f"({r['collect_tokens_per_s'] / base:5.1f}x {rows[0]['device']}), steered generation pair "
              f"{r['steered_pair_s']:.2f} s")


if __name__ == "__main__":
    main()
