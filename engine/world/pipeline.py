"""The build pipeline of a world: corpus, tokenizers, three models trained side by side, gates.

The three models are independent once the corpus and tokenizers are on disk, so each trains in
its own (spawned) process on one torch thread. One thread makes the weights independent of
the machine's core count (float reductions are not split), and on a shared machine it is also
much faster: measured here under load ~8 on 2 cores, a 2x64 GPT-2 step took 40 ms on one thread
and 830 ms on two, whose threads spin-wait on each other. Separate processes then use the cores
that one thread leaves idle. The result does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as queue_mod
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch

from engine.errors import AtlasError
from engine.models.loading import quiet_transformers
from engine.progress import progress as progress_bar
from engine.util import write_atomic
from engine.world.config import (
    HELDOUT_DOCS,
    MANIFEST,
    MODEL_KEYS,
    TRAIN_DOCS,
    WORLD_FORMAT,
    WorldConfig,
    fingerprint,
)
from engine.world.corpus import documents_from_text, documents_to_text, make_corpus

TOKENIZER_KIND = {"foundation": "word", "subject_a": "word", "subject_b": "bpe"}


class WorldBuildError(AtlasError):
    """Building a ConceptWorld failed (a training process crashed or was killed)."""


@contextlib.contextmanager
def reproducible():
    """One intra-op thread, deterministic kernels, no `transformers` bars; settings restored after."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with quiet_transformers():
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def build_into(path: Path, config: WorldConfig, seed: int, evaluate: bool = True, quiet: bool = False,
               parallel: bool = True) -> dict:
    """Build every part of a world into the empty folder ``path``; write its manifest last and return it."""
    from engine.world.tokenizers import train_bpe_tokenizer, train_word_tokenizer

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    concepts = config.concepts()
    corpus = make_corpus(concepts, config.n_train_docs, config.n_heldout_per_concept, seed, config.max_words,
                         config.mix_prob,
                         wrap=lambda it, name: progress_bar(it, desc=f"corpus ({name})", unit="doc", quiet=quiet),
                         two_topics=config.two_topics())
    _write_text(path / TRAIN_DOCS, documents_to_text(corpus.train))
    _write_text(path / HELDOUT_DOCS, documents_to_text(corpus.heldout))
    timings["corpus_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    texts = [d for d, _ in corpus.train]
    tokenizers = {
        "word": train_word_tokenizer(texts, max_length=config.foundation.max_length),
        "bpe": train_bpe_tokenizer(texts, config.bpe_vocab_size, max_length=config.subject_b.max_length),
    }
    for key in MODEL_KEYS:
        tok = tokenizers[TOKENIZER_KIND[key]]
        tok.model_max_length = config.spec(key).max_length
        tok.save_pretrained(path / key)
    timings["tokenizers_s"] = time.perf_counter() - t

    t = time.perf_counter()
    results = (_train_in_processes if parallel else _train_here)(path, config, seed, evaluate, quiet)
    timings["training_wall_s"] = time.perf_counter() - t
    for key in MODEL_KEYS:
        timings.update(results[key]["timings"])

    report = None
    if evaluate:
        from engine.world.gates import GateThresholds, ModelGates, WorldReport

        report = WorldReport([ModelGates(**results[k]["gates"]) for k in MODEL_KEYS],
                             GateThresholds(min_persistence=config.min_persistence))
    timings["total_s"] = time.perf_counter() - t0
    manifest = {
        "format": WORLD_FORMAT,
        "size": config.size,
        "seed": seed,
        "fingerprint": fingerprint(config, seed),
        "config": config.to_dict(),
        "concepts": [c.name for c in concepts],
        "models": {k: results[k]["meta"] for k in MODEL_KEYS},
        "report": report.to_dict() if report else None,
        "timings": timings,
        "torch": torch.__version__,
        "threads_per_model": 1,
    }
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest


def train_one(path: str | Path, key: str, config_dict: dict, seed: int, evaluate: bool,
              on_steps=None, quiet: bool = True) -> dict:
    """Train, save and (with ``evaluate``) measure one world model; the corpus and its tokenizer are in ``path``.

    Returns ``{"meta": ..., "gates": ... | None, "timings": ...}`` (plain data: it crosses processes).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    import engine.world.gates as gates
    from engine.world.tokenizers import tokenizer_fingerprint
    from engine.world.train import encode_documents, make_model, train_model

    path = Path(path)
    config = WorldConfig.from_dict(config_dict)
    spec = config.spec(key)
    concepts = config.concepts()
    train_docs = documents_from_text((path / TRAIN_DOCS).read_text(encoding="utf-8"))
    heldout = documents_from_text((path / HELDOUT_DOCS).read_text(encoding="utf-8"))
    # the world's tokenizers are fast (`tokenizers`-backed) ones: engine.world.tokenizers builds them
    tok = cast(PreTrainedTokenizerFast, AutoTokenizer.from_pretrained(path / key))
    model_seed = seed * 1000 + spec.seed
    timings = {}
    with reproducible():
        t = time.perf_counter()
        train_ids = encode_documents([d for d, _ in train_docs], tok, spec.max_length)
        model = make_model(spec, tok, model_seed)
        losses = train_model(model, train_ids, spec, seed=model_seed, pad_id=tok.pad_token_id, quiet=quiet,
                             desc=f"train {key} ({spec.architecture} {spec.n_layers}x{spec.d_model})",
                             on_steps=on_steps)
        timings[f"train_{key}_s"] = time.perf_counter() - t
        model.save_pretrained(path / key)
        layer = spec.n_layers - 1
        result = None
        if evaluate:
            t = time.perf_counter()
            probe_docs = train_docs[: config.n_probe_per_concept * config.n_concepts]
            result = vars(gates.measure_model(key, model, tok, train_docs, heldout, probe_docs, concepts, layer,
                                              spec.max_length))
            timings[f"gates_{key}_s"] = time.perf_counter() - t
    meta = {
        "architecture": spec.architecture, "d_model": spec.d_model, "n_layers": spec.n_layers,
        "default_layer": layer, "tokenizer_kind": TOKENIZER_KIND[key],
        "tokenizer_fingerprint": tokenizer_fingerprint(tok), "final_loss": float(np.mean(losses[-20:])),
    }
    return {"meta": meta, "gates": result, "timings": timings}


def _train_here(path: Path, config: WorldConfig, seed: int, evaluate: bool, quiet: bool) -> dict[str, dict]:
    return {key: train_one(path, key, config.to_dict(), seed, evaluate, quiet=quiet) for key in MODEL_KEYS}


_PROTOCOL = "@@conceptworld "  # prefix of the lines a training process writes for its parent


def _worker_main(argv: list[str]) -> None:
    """Entry point of a training process (``python -m engine.world.pipeline JOB_JSON``)."""
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(argv[0])
    out = sys.stdout

    def say(kind: str, payload) -> None:
        out.write(_PROTOCOL + json.dumps([kind, payload]) + "\n")
        out.flush()

    res = train_one(job["path"], job["key"], job["config"], job["seed"], job["evaluate"],
                    on_steps=lambda n: say("steps", n))
    say("done", res)


def _train_in_processes(path: Path, config: WorldConfig, seed: int, evaluate: bool,
                        quiet: bool) -> dict[str, dict]:
    """Train the three models in three child processes and gather their results.

    Children are fresh interpreters (``python -m engine.world.pipeline``), not multiprocessing
    spawns: spawning re-imports the caller's main module, which breaks any script that builds a
    world without an ``if __name__ == "__main__"`` guard.
    """
    import collections
    import subprocess
    import sys
    import threading

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    events: queue_mod.Queue = queue_mod.Queue()
    stderr_tail: dict[str, collections.deque] = {}

    def read(key: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None  # opened with stdout=PIPE
        for line in proc.stdout:
            if line.startswith(_PROTOCOL):
                events.put((key, *json.loads(line[len(_PROTOCOL):])))
        proc.wait()
        events.put((key, "exit", proc.returncode))

    def drain(key: str, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None  # opened with stderr=PIPE
        for line in proc.stderr:
            stderr_tail[key].append(line.rstrip())

    procs: dict[str, subprocess.Popen] = {}
    threads = []
    total = sum(config.spec(k).steps for k in MODEL_KEYS)
    bar = progress_bar(total=total, desc="train " + ", ".join(
        f"{config.spec(k).architecture} {config.spec(k).n_layers}x{config.spec(k).d_model}" for k in MODEL_KEYS),
        unit="step", quiet=quiet)
    results: dict[str, dict] = {}
    try:
        for key in MODEL_KEYS:
            job = {"path": str(path), "key": key, "config": config.to_dict(), "seed": seed, "evaluate": evaluate}
            procs[key] = subprocess.Popen([sys.executable, "-m", "engine.world.pipeline", json.dumps(job)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            stderr_tail[key] = collections.deque(maxlen=30)
            threads += [threading.Thread(target=read, args=(key, procs[key]), daemon=True),
                        threading.Thread(target=drain, args=(key, procs[key]), daemon=True)]
        for t in threads:
            t.start()
        exited: set[str] = set()
        while len(exited) < len(procs):
            key, kind, payload = events.get()
            if kind == "steps":
                bar.update(payload)
            elif kind == "done":
                results[key] = payload
            elif kind == "exit":
                exited.add(key)
                if key not in results:
                    procs[key].wait()
                    for t in threads:
                        t.join(timeout=5)
                    tail = "\n".join(stderr_tail[key])
                    raise WorldBuildError(f"training {key} failed (exit code {payload}):\n{tail}")
    finally:
        bar.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
    return results


if __name__ == "__main__":
    import sys

    _worker_main(sys.argv[1:])
