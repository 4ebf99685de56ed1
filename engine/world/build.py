"""Build (or reuse) a ConceptWorld: corpus, tokenizers, three trained models, directions, gates.

A world lives in ``<root>/world-<size>-<fingerprint>/`` (the store passes ``<store>/models/``).
It is built in a temporary sibling folder and renamed into place only once complete, with its
``manifest.json`` written last: a crash at any point leaves either no world or a whole one, and
two processes building the same world at once both end up with the one that was renamed first.
A world folder that has a manifest is reused as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import FormatError, NotFoundError
from engine.progress import progress as progress_bar
from engine.world.concepts import Concept, concept_table
from engine.world.config import (
    DIRECTIONS_DIR,
    HELDOUT_DOCS,
    MANIFEST,
    MODEL_KEYS,
    TRAIN_DOCS,
    WORLD_FORMAT,
    WorldConfig,
    config_for,
    fingerprint,
)
from engine.world.corpus import (
    NEUTRAL_PROMPTS,
    Document,
    documents_from_text,
    documents_to_text,
    make_corpus,
    other_topic_prompts,
    plurality_concept,
)
from engine.world.gates import WorldReport

_TOKENIZER_KIND = {"foundation": "word", "subject_a": "word", "subject_b": "bpe"}


@dataclass(frozen=True)
class WorldModel:
    """One trained model of a world: a folder loadable with ``AutoModelForCausalLM``/``AutoTokenizer``."""

    key: str  # "foundation", "subject_a" or "subject_b"
    name: str  # its name in the store, e.g. "world-tiny-foundation"
    path: Path
    architecture: str  # "gpt2", "llama", "gpt_neox"
    d_model: int
    n_layers: int
    default_layer: int  # the atlas layer for the foundation; the top block for the subjects
    tokenizer_kind: str  # "word" (shared) or "bpe"
    tokenizer_fingerprint: str

    @property
    def atlas_layer(self) -> int:
        return self.default_layer

    def load(self):
        """``(model, tokenizer)``, the model in eval mode on CPU."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.path)
        model.eval()
        return model, AutoTokenizer.from_pretrained(self.path)


@dataclass
class World:
    """A built ConceptWorld (see DESIGN §7)."""

    size: str
    seed: int
    fingerprint: str
    path: Path
    config: WorldConfig
    concepts: list[Concept]
    foundation: WorldModel
    subject_a: WorldModel
    subject_b: WorldModel
    train_docs: list[Document]
    heldout_docs: list[Document]
    report: WorldReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False

    @property
    def name(self) -> str:
        """Prefix of every name this world registers: ``world-<size>`` (``-s<seed>`` unless seed 0)."""
        return world_name(self.size, self.seed)

    @property
    def atlas_name(self) -> str:
        return self.name

    @property
    def models(self) -> dict[str, WorldModel]:
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def model(self, key: str) -> WorldModel:
        if key not in MODEL_KEYS:
            raise NotFoundError(f"no world model {key!r}; the models are {', '.join(MODEL_KEYS)}")
        return getattr(self, key)

    def load(self, key: str):
        """``(model, tokenizer)`` of one of the world's models."""
        return self.model(key).load()

    @property
    def neutral_prompts(self) -> list[str]:
        """Prompts of function words only (no topic)."""
        return list(NEUTRAL_PROMPTS)

    @property
    def other_topic_prompts(self) -> list[Document]:
        """First sentences of held-out documents, 5 per concept: prompts that already have a topic."""
        return other_topic_prompts(self.heldout_docs, per_concept=5)

    def plurality_concept(self, text: str) -> int | None:
        """Index of the concept with strictly the most member words in ``text`` (None if none or a tie)."""
        return plurality_concept(text, self.concepts)

    def concept_directions(self, model_key: str, layer: int | None = None) -> np.ndarray:
        """Ground-truth concept directions ``(K, d_model)`` of a model at ``resid_post`` of ``layer``.

        Centred topic means over the held-out documents (`engine.world.directions`); computed once
        and cached in the world folder as safetensors.
        """
        from safetensors.numpy import load_file, save_file

        from engine.world.directions import concept_directions

        m = self.model(model_key)
        layer = m.default_layer if layer is None else layer
        path = self.path / DIRECTIONS_DIR / f"{model_key}-L{layer}.safetensors"
        if path.exists():
            return load_file(path)["directions"]
        model, tok = m.load()
        dirs = concept_directions(model, tok, self.heldout_docs, len(self.concepts), [layer])[layer]
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"directions": np.ascontiguousarray(dirs)}, tmp)
        os.replace(tmp, path)
        return dirs


def world_name(size: str, seed: int) -> str:
    return f"world-{size}" if seed == 0 else f"world-{size}-s{seed}"


def world_path(root: Path, size: str, seed: int, config: WorldConfig | None = None) -> Path:
    config = config or config_for(size)
    return Path(root) / f"world-{size}-{fingerprint(config, seed)}"


def build_world(size: str = "tiny", seed: int = 0, root: Path | None = None, progress: bool = True,
                config: WorldConfig | None = None, evaluate: bool = True) -> World:
    """Build the world of ``size`` and ``seed`` under ``root`` (or reuse it if already built).

    ``config`` overrides the size's default configuration (its ``size`` must match). With
    ``evaluate`` the learnability gates are measured and kept in the manifest as ``report``.
    """
    if root is None:
        raise ValueError("build_world needs root, the cache folder (the store passes <store>/models)")
    config = config or config_for(size)
    if config.size != size:
        raise ValueError(f"config is for size {config.size!r}, not {size!r}")
    path = world_path(root, size, seed, config)
    if (path / MANIFEST).exists():
        world = load_world(path)
        world.reused = True
        return world
    tmp = Path(root) / f".{path.name}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _reproducible(), _no_transformers_bars():
            _build_into(tmp, config, seed, evaluate, quiet=not progress)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / MANIFEST).exists():
                raise
            # Another process finished the same world first: keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_world(path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _build_into(path: Path, config: WorldConfig, seed: int, evaluate: bool, quiet: bool) -> None:
    from engine.world import gates
    from engine.world.tokenizers import tokenizer_fingerprint, train_bpe_tokenizer, train_word_tokenizer
    from engine.world.train import encode_documents, make_model, train_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    concepts = concept_table(config.n_concepts)
    corpus = make_corpus(concepts, config.n_train_docs, config.n_heldout_per_concept, seed, config.max_words,
                         config.mix_prob, wrap=lambda it, name: progress_bar(it, desc=f"corpus ({name})", unit="doc", quiet=quiet))
    _write_text(path / TRAIN_DOCS, documents_to_text(corpus.train))
    _write_text(path / HELDOUT_DOCS, documents_to_text(corpus.heldout))
    texts = [t for t, _ in corpus.train]
    timings["corpus_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    tokenizers = {
        "word": train_word_tokenizer(texts, max_length=config.foundation.max_length),
        "bpe": train_bpe_tokenizer(texts, config.bpe_vocab_size, max_length=config.subject_b.max_length),
    }
    timings["tokenizers_s"] = time.perf_counter() - t

    probe_docs = corpus.train[: config.n_probe_per_concept * config.n_concepts]
    models_meta: dict[str, dict] = {}
    results: list[gates.ModelGates] = []
    for key in MODEL_KEYS:
        spec = config.spec(key)
        tok = tokenizers[_TOKENIZER_KIND[key]]
        tok.model_max_length = spec.max_length
        train_ids = encode_documents(texts, tok, spec.max_length)
        t = time.perf_counter()
        model = make_model(spec, tok, seed * 1000 + spec.seed)
        losses = train_model(model, train_ids, spec, seed=seed * 1000 + spec.seed, pad_id=tok.pad_token_id,
                             desc=f"train {key} ({spec.architecture} {spec.n_layers}x{spec.d_model})", quiet=quiet)
        timings[f"train_{key}_s"] = time.perf_counter() - t
        model.save_pretrained(path / key)
        tok.save_pretrained(path / key)
        layer = spec.n_layers - 1
        models_meta[key] = {
            "architecture": spec.architecture, "d_model": spec.d_model, "n_layers": spec.n_layers,
            "default_layer": layer, "tokenizer_kind": _TOKENIZER_KIND[key],
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "final_loss": float(np.mean(losses[-20:])),
        }
        if evaluate:
            t = time.perf_counter()
            results.append(gates.measure_model(key, model, tok, corpus.train, corpus.heldout, probe_docs, concepts,
                                               layer, spec.max_length))
            timings[f"gates_{key}_s"] = time.perf_counter() - t

    report = (WorldReport(results, gates.GateThresholds(min_persistence=config.min_persistence))
              if evaluate else None)
    timings["total_s"] = time.perf_counter() - t0
    manifest = {
        "format": WORLD_FORMAT,
        "size": config.size,
        "seed": seed,
        "fingerprint": fingerprint(config, seed),
        "config": config.to_dict(),
        "concepts": [c.name for c in concepts],
        "models": models_meta,
        "report": report.to_dict() if report else None,
        "timings": timings,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, path / MANIFEST)


class _reproducible:
    """One intra-op thread and deterministic kernels while building; previous settings restored after.

    One thread makes the float reductions, hence the weights, independent of the machine's core
    count, and on a shared machine it is also faster: measured here under load ~8 on 2 cores, a
    2x64 GPT-2 step took 40 ms with one thread and 830 ms with two (threads spin-wait on each
    other); on an idle machine two threads are only ~1.5x faster.
    """

    def __enter__(self):
        self._deterministic = torch.are_deterministic_algorithms_enabled()
        self._threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._deterministic)
        torch.set_num_threads(self._threads)


@contextlib.contextmanager
def _no_transformers_bars():
    """Hide the bars `transformers` shows while saving weights: the build has its own."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_world(path: Path) -> World:
    """Open a built world folder (one with a ``manifest.json``)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} is not a built world (no {MANIFEST}); build it with `atlas world build`") from e
    except json.JSONDecodeError as e:
        raise FormatError(f"{path / MANIFEST} is not valid JSON ({e}); delete the folder and build again") from e
    if manifest.get("format") != WORLD_FORMAT:
        raise FormatError(f"{path} was built by another version of ConceptWorld (format "
                          f"{manifest.get('format')}, expected {WORLD_FORMAT}); build it again")
    config = WorldConfig.from_dict(manifest["config"])
    size, seed = manifest["size"], manifest["seed"]
    prefix = world_name(size, seed)
    models = {
        key: WorldModel(key=key, name=f"{prefix}-{key.replace('_', '-')}", path=path / key, **{
            k: v for k, v in meta.items() if k != "final_loss"})
        for key, meta in manifest["models"].items()
    }
    return World(
        size=size, seed=seed, fingerprint=manifest["fingerprint"], path=path, config=config,
        concepts=concept_table(config.n_concepts), train_docs=documents_from_text(
            (path / TRAIN_DOCS).read_text(encoding="utf-8")),
        heldout_docs=documents_from_text((path / HELDOUT_DOCS).read_text(encoding="utf-8")),
        report=WorldReport.from_dict(manifest["report"]) if manifest.get("report") else None,
        timings=manifest.get("timings", {}), **models,
    )
