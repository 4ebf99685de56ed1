"""Sparse autoencoders in ConceptWorld: one on the foundation's atlas layer, one per subject layer.

Real atlases are SAE dictionaries (Gemma Scope) and real bulk labelling labels another SAE
(Llama Scope) through a map, so a world carries SAEs too (docs/design.md §7). They are TopK SAEs
of EleutherAI's sparsify (``eai-sparsify``, the ``sae`` extra): its `SparseCoder` module, loss
(FVU + AuxK on dead latents), unit-norm decoder and ``save_to_disk`` layout, trained here on
activations this module hands it. sparsify's own `Trainer` is not used: it streams a Hugging
Face dataset through the model with hooks and distributed bookkeeping; the loop below is its
step for one hookpoint (mean-initialised ``b_dec``, decoder gradient made orthogonal to the
rows, rows renormalised, AuxK on latents that have not fired for a while), with Adam.

On disk, next to the world's models, as sparsify's trainer writes a run::

    <world>/saes/<sae fingerprint>/manifest.json      (written last)
    <world>/saes/<sae fingerprint>/<model key>/config.json   ({"model": <store name>, ...})
    <world>/saes/<sae fingerprint>/<model key>/<hookpoint>/cfg.json, sae.safetensors,
                                                          ground_truth.json
    <world>/saes/<sae fingerprint>/<model key>/<other hookpoint>/... + site.json   (on demand)

A subject SAE at a layer the stage did not train (by default subjects get one at their default
layer) is trained on first use by `ensure_sae`, with the same configuration, seed rule and
ground-truth rules, and cached beside the others under the same fingerprint.

The hookpoint folder (``h.2`` for GPT-2, ``layers.1`` for Llama / GPT-NeoX: the block, whose
output is ``resid_post``) is what ``atlas import-sae`` and ``atlas label --features`` read, with
the same reader as any sparsify checkpoint (`engine.atlas.formats.sparsify`). The stage is its
own cache on top of a built world, keyed by the world fingerprint and `SAEConfig`: the world's
models are never retrained, and the world's ``manifest.json`` is not touched.

Hyper-parameters (width multiple, k, steps) were chosen on the training documents only: the
fraction of variance unexplained and the dead share on a validation slice of the training split
(``fvu_val`` / ``dead_val`` in the manifest), never on an evaluation's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import AtlasError, ShapeError
from engine.extras import install_message
from engine.models.hooks import read_residuals, resolve_layer
from engine.util import build_then_rename, write_atomic
from engine.world.build import World
from engine.world.config import MODEL_KEYS

SAE_FORMAT = 1
SAES_DIR = "saes"
SAE_MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.json"
SITE_FILE = "site.json"  # an SAE trained on demand (`ensure_sae`): its manifest entry
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # the corpus' own word / punctuation split


class SAEUnavailableError(AtlasError):
    """The ``sae`` extra (eai-sparsify) is not installed, so a world cannot train its SAEs."""


@dataclass(frozen=True)
class SAEConfig:
    """What decides a world's SAEs (with the world fingerprint)."""

    expansion: int  # latents per residual dimension (Gemma Scope's widths are 4-450x d_model)
    k: int  # active latents per token (TopK)
    steps: int
    batch_tokens: int
    lr: float
    n_train_docs: int  # training documents whose tokens train the SAEs (the first ones)
    n_val_docs: int  # the next ones: validation FVU / dead share (choose hyper-parameters here)
    n_label_docs: int  # the next ones: ground-truth statistics of each latent (engine.world.ground_truth)
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 20_000  # tokens without firing after which a latent counts as dead (AuxK)
    seed: int = 0
    subject_layers: str = "all"  # "all" blocks of each subject, or "default" (its top block)

    def to_dict(self) -> dict:
        return asdict(self)


def sae_config_for(size: str) -> SAEConfig:
    """The default SAE configuration of a world size.

    tiny: 4x width, k=8, 300 steps (seconds per SAE on one thread); small: 8x width (the issue's
    example), k=16, 1,000 steps. Subjects get one SAE at their default (top) layer at build time
    (other layers: `ensure_sae`, on first use). Measured on
    the validation slice of tiny's training documents (seed 0, foundation): k=8 leaves an FVU of
    0.025 with 14% of the latents dead, k=4 an FVU of 0.036 with 39% dead; across tiny's three
    SAEs k=8 gives FVU 0.02-0.06 and 2-21% dead. The step budget is what the build-time budget
    allows (small: 768-1,024 latents, 20-25% dead for the two word-tokenizer models).
    """
    if size == "tiny":
        return SAEConfig(expansion=4, k=8, steps=300, batch_tokens=512, lr=2e-3, n_train_docs=800,
                         n_val_docs=200, n_label_docs=600, subject_layers="default")
    return SAEConfig(expansion=8, k=16, steps=1000, batch_tokens=512, lr=2e-3, n_train_docs=2000,
                     n_val_docs=400, n_label_docs=2000, subject_layers="default")


def sae_fingerprint(world: World, config: SAEConfig) -> str:
    payload = {"format": SAE_FORMAT, "world": world.fingerprint, "config": config.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def hookpoint(architecture: str, layer: int) -> str:
    """sparsify's name of block ``layer`` relative to the base model (``h.2``, ``layers.1``)."""
    return f"h.{layer}" if architecture == "gpt2" else f"layers.{layer}"


@dataclass(frozen=True)
class WorldSAE:
    """One trained SAE of a world: a sparsify hookpoint folder plus its latents' ground truth."""

    key: str  # model key: foundation, subject_a, subject_b
    model: str  # the model's store name
    layer: int
    path: Path  # the hookpoint folder (cfg.json + sae.safetensors + ground_truth.json)
    n_latents: int
    k: int
    metrics: dict
    reused: bool = False  # read from the cache, not trained by the call that returned it

    def ground_truth(self) -> list[dict]:
        return json.loads((self.path / GROUND_TRUTH).read_text(encoding="utf-8"))["latents"]

    def decoder(self) -> np.ndarray:
        from safetensors.numpy import load_file

        return load_file(self.path / "sae.safetensors")["W_dec"]


@dataclass(frozen=True)
class WorldSAEs:
    path: Path
    fingerprint: str
    config: SAEConfig
    saes: tuple[WorldSAE, ...]
    reused: bool = False

    def get(self, key: str, layer: int | None = None) -> WorldSAE:
        for s in self.saes:
            if s.key == key and (layer is None or s.layer == layer):
                return s
        raise AtlasError(f"no SAE of {key} at layer {layer} in {self.path}")


def _sae_sites(world: World, config: SAEConfig) -> list[tuple[str, int]]:
    sites = [("foundation", world.foundation.atlas_layer)]
    for key in MODEL_KEYS[1:]:
        m = world.model(key)
        layers = range(m.n_layers) if config.subject_layers == "all" else [m.default_layer]
        sites += [(key, L) for L in layers]
    return sites


def _require_sparsify():
    import contextlib
    import io

    try:
        # sparsify prints a note about Triton to stdout on import; that would corrupt `--json`
        with contextlib.redirect_stdout(io.StringIO()):
            from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        raise SAEUnavailableError(install_message("sae", "training ConceptWorld's SAEs (--no-sae skips them)")) from e
    return SparseCoder, SparseCoderConfig


def build_saes(world: World, config: SAEConfig | None = None, progress: bool = True) -> WorldSAEs:
    """Train (or reuse) the world's SAEs and their ground-truth labels; see the module docstring."""
    config = config or sae_config_for(world.size)
    fp = sae_fingerprint(world, config)
    root = world.path / SAES_DIR
    path = root / fp
    if (path / SAE_MANIFEST).exists():
        return load_saes(path, reused=True)
    _require_sparsify()
    root.mkdir(exist_ok=True)
    build_then_rename(root / f".{fp}.tmp{os.getpid()}", path,
                      lambda tmp: _build_into(tmp, world, config, fp, quiet=not progress), SAE_MANIFEST)
    return load_saes(path)


def load_saes(path: Path, reused: bool = False) -> WorldSAEs:
    m = json.loads((Path(path) / SAE_MANIFEST).read_text(encoding="utf-8"))
    saes = tuple(_sae_of(Path(path), s, reused) for s in m["saes"])
    return WorldSAEs(Path(path), m["fingerprint"], SAEConfig(**m["config"]), saes, reused)


def _sae_of(root: Path, entry: dict, reused: bool) -> WorldSAE:
    return WorldSAE(key=entry["key"], model=entry["model"], layer=entry["layer"], path=root / entry["folder"],
                    n_latents=entry["n_latents"], k=entry["k"], metrics=entry["metrics"], reused=reused)


def check_layers(wm: Any, layers: Sequence[int]) -> list[int]:
    """``layers`` of world model ``wm`` without repeats, each a block it has; `ShapeError` otherwise."""
    wanted = list(dict.fromkeys(int(v) for v in layers))
    bad = [v for v in wanted if not 0 <= v < wm.n_layers]
    if bad or not wanted:
        raise ShapeError(f"layers {bad or '[]'} are out of range for {wm.name} "
                         f"({wm.n_layers} layers: 0..{wm.n_layers - 1})")
    return wanted


def ensure_sae(world: World, saes: WorldSAEs, key: str, layer: int, progress: bool = True) -> WorldSAE:
    """The SAE of world model ``key`` at block ``layer`` (``resid_post``), trained on first use.

    One of ``saes`` (those `build_saes` trained with the world) when it has that site; else one an
    earlier call trained, read from the cache; else trained now exactly as `build_saes` trains
    its own (`_train_sites`: ``saes.config``, the same seed rule, tokens and ground-truth rules),
    into ``<saes folder>/<key>/<hookpoint>/`` beside the others, with a ``site.json`` holding its
    manifest entry. The folder appears whole (trained in a temporary folder, then renamed), so
    concurrent callers never see half an SAE. The world's SAE ``manifest.json`` and the model's
    sparsify ``config.json`` keep listing what `build_saes` trained; the hookpoint folder is
    still a complete sparsify checkpoint (`atlas import-sae`, `atlas label --features`).
    """
    wm = world.model(key)
    if not isinstance(layer, int):
        raise ShapeError(f"layer {layer!r} is not a block number of {wm.name}")
    check_layers(wm, [layer])
    for s in saes.saes:
        if s.key == key and s.layer == layer:
            return s
    hp = hookpoint(wm.architecture, layer)
    folder = saes.path / key / hp
    if (folder / SITE_FILE).exists():
        return _sae_of(saes.path, json.loads((folder / SITE_FILE).read_text(encoding="utf-8")), reused=True)
    _require_sparsify()
    def train(tmp: Path) -> None:
        entry = _train_sites(tmp, world, saes.config, key, [layer], quiet=not progress)[0]
        (tmp / key / hp / SITE_FILE).write_text(json.dumps(entry, indent=2), encoding="utf-8")
        (saes.path / key).mkdir(exist_ok=True)

    # another process that trains it first wins: the same SAE (deterministic)
    build_then_rename(saes.path / f".{key}.{hp}.tmp{os.getpid()}", folder, train, SITE_FILE, part=f"{key}/{hp}")
    return _sae_of(saes.path, json.loads((folder / SITE_FILE).read_text(encoding="utf-8")), reused=False)


def _splits(world: World, config: SAEConfig) -> tuple[list, list, list]:
    docs = world.train_docs
    a, b = config.n_train_docs, config.n_train_docs + config.n_val_docs
    c = b + config.n_label_docs
    if c > len(docs):
        raise AtlasError(f"the SAE stage needs {c} training documents; the world has {len(docs)}")
    return docs[:a], docs[a:b], docs[b:c]


def _build_into(path: Path, world: World, config: SAEConfig, fp: str, quiet: bool) -> None:
    sites = _sae_sites(world, config)
    entries = []
    t0 = time.perf_counter()
    for key in dict.fromkeys(k for k, _ in sites):
        entries += _train_sites(path, world, config, key, [L for k, L in sites if k == key], quiet)
    manifest = {"format": SAE_FORMAT, "fingerprint": fp, "world": world.fingerprint, "config": config.to_dict(),
                "saes": entries, "library": _library_version(), "total_s": round(time.perf_counter() - t0, 2)}
    write_atomic(path / SAE_MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))


def _train_sites(path: Path, world: World, config: SAEConfig, key: str, layers: Sequence[int], quiet: bool
                 ) -> list[dict]:
    """Train the SAEs of world model ``key`` at ``layers`` into ``path/<key>/<hookpoint>`` (sparsify's
    layout, with each latent's ground truth); returns their manifest entries. Each SAE depends only on
    the world, ``config``, the model and its layer (its seed and its training tokens), never on which
    other layers are trained with it."""
    from engine.progress import progress as progress_bar
    from engine.world.ground_truth import latent_ground_truth
    from engine.world.pipeline import reproducible

    train, val, label = _splits(world, config)
    entries = []
    with reproducible():
        wm = world.model(key)
        model, tok = wm.load()
        acts_train = token_activations(model, tok, [t for t, _ in train], layers)[0]
        acts_val = token_activations(model, tok, [t for t, _ in val], layers)[0]
        acts_label, tokens = token_activations(model, tok, [t for t, _ in label], layers)
        concepts = np.asarray([c for _, c in label], dtype=np.int64)[tokens["doc"]]
        (path / key).mkdir()
        (path / key / "config.json").write_text(json.dumps({
            "model": wm.name, "sae": {"activation": "topk", "expansion_factor": config.expansion, "k": config.k},
            "batch_size": config.batch_tokens, "loss_fn": "fvu", "optimizer": "adam", "lr": config.lr,
            "auxk_alpha": config.auxk_alpha, "dead_feature_threshold": config.dead_tokens,
            "hookpoints": [hookpoint(wm.architecture, L) for L in layers], "init_seeds": [config.seed],
            "run_name": f"conceptworld {world.name} {key}",
        }, indent=2), encoding="utf-8")
        for L in layers:
            hp = hookpoint(wm.architecture, L)
            t = time.perf_counter()
            bar = progress_bar(total=config.steps, desc=f"SAE {key} {hp}", unit="step", quiet=quiet)
            sae, metrics = train_sae(acts_train[L], acts_val[L], config,
                                     seed=world.seed * 1000 + MODEL_KEYS.index(key) * 100 + L,
                                     on_step=bar.update)
            bar.close()
            folder = path / key / hp
            sae.save_to_disk(folder)
            top_acts, top_idx = encode(sae, acts_label[L])
            gt = latent_ground_truth(top_acts, top_idx, sae.num_latents, concepts, tokens["word"],
                                     world.concepts)
            (folder / GROUND_TRUTH).write_text(json.dumps(gt, indent=1), encoding="utf-8")
            metrics["train_s"] = round(time.perf_counter() - t, 2)
            metrics["ground_truth"] = gt["summary"]
            entries.append({"key": key, "model": wm.name, "layer": L, "folder": f"{key}/{hp}",
                            "n_latents": sae.num_latents, "k": config.k, "metrics": metrics})
    return entries


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"eai-sparsify {version('eai-sparsify')}"
    except PackageNotFoundError:
        return "eai-sparsify"


@torch.no_grad()
def token_activations(model: torch.nn.Module, tokenizer, texts: Sequence[str], layers: Sequence[int],
                      batch_size: int = 32) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    """``resid_post`` of every non-special token of ``texts`` at ``layers``, and for each token its
    document index (``doc``) and the word of the text it lies in (``word``: the corpus' word or
    punctuation run holding the token's last character; a BPE piece maps to its whole word)."""
    block = {L: resolve_layer(model, L) for L in layers}
    acts: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    docs: list[np.ndarray] = []
    words: list[str] = []
    with read_residuals(model, list(layers), prepend=False) as captured:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start: start + batch_size])
            enc = tokenizer(batch, padding=True, truncation=True, return_special_tokens_mask=True,
                            return_offsets_mapping=True, return_tensors="pt")
            keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).numpy()
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            for L in layers:
                acts[L].append(captured.acts[block[L]].float().numpy()[keep])
            offsets = enc["offset_mapping"].numpy()
            for b, text in enumerate(batch):
                spans = [(m.start(), m.end(), m.group()) for m in _TOKEN_RE.finditer(text)]
                ends = np.asarray([e for _, e, _ in spans])
                idx = np.flatnonzero(keep[b])
                for i in idx:
                    j = int(np.searchsorted(ends, max(int(offsets[b, i, 1]), 1), side="left"))
                    words.append(spans[min(j, len(spans) - 1)][2])
                docs.append(np.full(len(idx), start + b, dtype=np.int64))
    return ({L: np.concatenate(v).astype(np.float32) for L, v in acts.items()},
            {"doc": np.concatenate(docs), "word": np.asarray(words)})


def train_sae(x: np.ndarray, x_val: np.ndarray, config: SAEConfig, seed: int, on_step=None) -> tuple[Any, dict]:
    """A sparsify TopK `SparseCoder` trained on the rows of ``x``; validation FVU and dead share on ``x_val``."""
    SparseCoder, SparseCoderConfig = _require_sparsify()
    torch.manual_seed(seed)
    d = x.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(activation="topk", expansion_factor=config.expansion, k=config.k,
                                           normalize_decoder=True))
    data = torch.from_numpy(x)
    sae.b_dec.data = data.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    warmup = max(1, config.steps // 20)
    for step in range(config.steps):
        for g in opt.param_groups:  # linear warm-up, then linear decay to 0 in the last fifth
            g["lr"] = config.lr * min(1.0, (step + 1) / warmup, 5 * (config.steps - step) / config.steps)
        batch = data[torch.randint(0, len(data), (config.batch_tokens,), generator=gen)]
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > config.dead_tokens
        out = sae(batch, dead_mask=dead)
        loss = out.fvu + config.auxk_alpha * out.auxk_loss
        opt.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        since_fired += len(batch)
        since_fired[out.latent_indices.flatten().unique()] = 0
        if on_step is not None:
            on_step(1)
    sae.set_decoder_norm_to_unit_norm()
    sae.eval()
    with torch.no_grad():
        v = torch.from_numpy(x_val)
        out = sae(v)
        fired = torch.zeros(sae.num_latents, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
    return sae, {"fvu_val": round(float(out.fvu), 4), "dead_val": round(float(1 - fired.float().mean()), 4),
                 "n_train_tokens": int(len(x)), "n_val_tokens": int(len(x_val))}


@torch.no_grad()
def encode(sae: Any, x: np.ndarray, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """TopK codes of the rows of ``x``: activations and latent indices, both ``(n_tokens, k)``."""
    acts, idx = [], []
    for s in range(0, len(x), batch):
        a, i, _ = sae.encode(torch.from_numpy(x[s: s + batch]))
        acts.append(a.numpy())
        idx.append(i.numpy())
    return np.concatenate(acts).astype(np.float32), np.concatenate(idx).astype(np.int64)


# ----------------------------------------------------------------------------- the SAE atlas

LABELS_FILE = "labels.jsonl"


def sae_atlas_name(world: World) -> str:
    """``world-<size>[-s<seed>]-sae``: the foundation SAE's latents as an atlas."""
    return f"{world.name}-sae"


def write_labels(sae: WorldSAE) -> Path:
    """The foundation SAE's ground-truth labels as a label file (``index``, ``label``, ``description``
    per labelled latent, JSONL), the way a Neuronpedia export ships explanations next to an SAE."""
    from engine.world.ground_truth import description

    path = sae.path / LABELS_FILE
    if not path.exists():
        lines = [json.dumps({"index": e["latent"], "label": e["label"], "description": description(e)})
                 for e in sae.ground_truth() if e["label"]]
        write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def register_sae_atlas(store, world: World, saes: WorldSAEs, replace: bool = False) -> dict[str, Any]:
    """Import the foundation SAE as atlas ``world-<size>-sae`` (as `atlas import-sae FOLDER --labels
    FILE` does: sparsify's reader, its encoder and TopK k kept); unlabelled latents stay unlabelled
    concepts. Kept if the store has it, unless ``replace``. The world's models must be registered."""
    from engine.atlas.importers import import_atlas
    from engine.errors import NotFoundError
    from engine.store.store import AtlasSource

    name = sae_atlas_name(world)
    sae = saes.get("foundation")
    try:
        info = store.atlas(name)
        existed = True
    except NotFoundError:
        existed = False
    if existed and (replace or info.revision != saes.fingerprint):
        store.remove_atlas(name)
        existed = False
    if not existed:
        info = import_atlas(store, name, sae.path, labels=write_labels(sae),
                            site=AtlasSource(revision=saes.fingerprint))
    n_labelled = sum(1 for e in sae.ground_truth() if e["label"])
    return {"atlas": name, "n_latents": sae.n_latents, "n_labelled": n_labelled, "atlas_existed": existed,
            "layer": sae.layer, "model": sae.model, "path": str(sae.path)}
