"""Cost of steering hooks in generation (issue: steered generation ≤ 1.1 × unsteered).

Builds a random Llama-style causal LM (default 4 layers, d=256; the world models are smaller, so
the hooks' share of the time is larger there than in a real model), then times `generate` with no
edits and with edits, interleaved run by run so that load on this shared machine hits both
alike, and reports the median time of each and their ratio. Greedy decoding with the KV cache,
the end-of-text token blocked so every run makes the same number of tokens.

    python benchmarks/bench_steering.py [--layers 4] [--d 256] [--batch 8] [--new 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.models.loading import load_model
from engine.steering.edits import SteeringEdit
from engine.steering.generate import GenerationSettings, generate, special_token_ids

WORDS = "the a and then there was it is in with of we i think but so".split()


def build_model(folder: Path, n_layers: int, d: int, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = specials + WORDS + [f"w{i}" for i in range(vocab - len(WORDS) - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                     eos_token="<eos>", model_max_length=512)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
                      num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                      max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.layers, args.d, args.vocab)
        model, tok = load_model(tmp)
    prompts = ["it was the"] * args.batch
    blocked = special_token_ids(tok)
    mid = args.layers // 2

    def edits(mode: str, n_layers: int) -> list[SteeringEdit]:
        return [SteeringEdit(layer, rng.normal(size=args.d), 1.0, 10.0, mode=mode)
                for layer in range(mid, mid + n_layers)]

    cases = {
        "unsteered": ([], "all"),
        "add, 1 layer": (edits("add", 1), "all"),
        "add, 1 layer, new positions": (edits("add", 1), "new"),
        "clamp, 1 layer": (edits("clamp", 1), "all"),
        f"add, {min(2, args.layers - mid)} layer(s) x 2 concepts": (
            edits("add", min(2, args.layers - mid)) * 2, "all"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for e, pos in cases.values():  # warm-up
        generate(model, tok, prompts[:1], e, positions=pos, settings=GenerationSettings(4), blocked=blocked)
    for _ in range(args.reps):
        for name, (e, pos) in cases.items():
            t0 = time.perf_counter()
            out = generate(model, tok, prompts, e, positions=pos, settings=GenerationSettings(args.new),
                           blocked=blocked)
            times[name].append(time.perf_counter() - t0)
            assert all(len(g.token_ids) == args.new for g in out)
    base = statistics.median(times["unsteered"])
    n_tok = args.batch * args.new
    print(f"model: Llama {args.layers} layers, d={args.d}; {args.batch} prompts x {args.new} new tokens, "
          f"greedy with KV cache, {args.reps} interleaved reps, {torch.get_num_threads()} thread(s)")
    print(f"{'case':40s} {'median s':>9s} {'tok/s':>8s} {'ratio':>6s}")
    worst = 0.0
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        worst = max(worst, ratio)
        print(f"{name:40s} {med:9.3f} {n_tok / med:8.0f} {ratio:6.3f}")
    print(f"worst steered / unsteered ratio: {worst:.3f} (target <= 1.1): {'PASS' if worst <= 1.1 else 'FAIL'}")


if __name__ == "__main__":
    main()
