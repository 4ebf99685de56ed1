"""Build (or reuse) a ConceptWorld: corpus, tokenizers, three trained models, directions, gates.

A world lives in ``<root>/world-<size>-<fingerprint>/`` (the store passes ``<store>/models/``).
It is built in a temporary sibling folder and renamed into place only once complete, with its
``manifest.json`` written last: a crash at any point leaves either no world or a whole one, and
two processes building the same world at once both end up with the one that was renamed first.
A world folder that has a manifest is reused as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import FormatError, NotFoundError
from engine.util import build_then_rename, write_atomic_with
from engine.world.concepts import Concept
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
    other_topic_prompts,
    plurality_concept,
)
from engine.world.gates import WorldReport


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

        from engine.models.loading import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(self.path)
        model.eval()
        return model, AutoTokenizer.from_pretrained(self.path)


@dataclass
class World:
    """A built ConceptWorld (see docs/design.md §7)."""

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
        from engine.world.pipeline import reproducible

        m = self.model(model_key)
        layer = m.default_layer if layer is None else layer
        path = self.path / DIRECTIONS_DIR / f"{model_key}-L{layer}.safetensors"
        if path.exists():
            return load_file(path)["directions"]
        model, tok = m.load()
        with reproducible():  # one thread: the same directions on any machine, and fast on a busy one
            dirs = concept_directions(model, tok, self.heldout_docs, len(self.concepts), [layer])[layer]
        path.parent.mkdir(exist_ok=True)
        write_atomic_with(path, lambda tmp: save_file({"directions": np.ascontiguousarray(dirs)}, tmp))
        return dirs


def world_name(size: str, seed: int) -> str:
    return f"world-{size}" if seed == 0 else f"world-{size}-s{seed}"


def world_path(root: Path, size: str, seed: int, config: WorldConfig | None = None) -> Path:
    config = config or config_for(size)
    return Path(root) / f"world-{size}-{fingerprint(config, seed)}"


def build_world(size: str = "tiny", seed: int = 0, root: Path | None = None, progress: bool = True,
                config: WorldConfig | None = None, evaluate: bool = True, parallel: bool = True) -> World:
    """Build the world of ``size`` and ``seed`` under ``root`` (or reuse it if already built).

    ``config`` overrides the size's default configuration (its ``size`` must match). With
    ``evaluate`` the learnability gates are measured and kept in the manifest as ``report``.
    ``parallel`` trains the three models in three processes (same weights as one after another).
    """
    from engine.world.pipeline import build_into

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
    _remove_abandoned_builds(Path(root), path.name)
    # Another process that finishes the same world first wins: theirs is kept.
    build_then_rename(Path(root) / f".{path.name}.tmp{os.getpid()}", path,
                      lambda tmp: build_into(tmp, config, seed, evaluate=evaluate, quiet=not progress,
                                             parallel=parallel), MANIFEST)
    return load_world(path)


def _remove_abandoned_builds(root: Path, name: str) -> None:
    """Delete temporary build folders of ``name`` left by processes that no longer run (killed builds)."""
    for tmp in root.glob(f".{name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # a live process of another user


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
    models: dict[str, Any] = {  # foundation, subject_a, subject_b: keyword arguments of World
        key: WorldModel(key=key, name=f"{prefix}-{key.replace('_', '-')}", path=path / key, **{
            k: v for k, v in meta.items() if k != "final_loss"})
        for key, meta in manifest["models"].items()
    }
    return World(
        size=size, seed=seed, fingerprint=manifest["fingerprint"], path=path, config=config,
        concepts=config.concepts(), train_docs=documents_from_text(
            (path / TRAIN_DOCS).read_text(encoding="utf-8")),
        heldout_docs=documents_from_text((path / HELDOUT_DOCS).read_text(encoding="utf-8")),
        report=WorldReport.from_dict(manifest["report"]) if manifest.get("report") else None,
        timings=manifest.get("timings", {}), **models,
    )
