"""Fitting alignment maps from a corpus, and the retrieval evaluation (DESIGN §5, §8).

One pass runs both models over the training texts (and one over the held-out texts), draws the
requested pairings from the same forward passes, and accumulates one `SufficientStats` per
(pairing, subject layer); every method and every layer is then fitted from those statistics
without touching the models again. Held-out pairs come from texts the fit never saw: they choose
hyper-parameters (ridge's λ) and give the fit metrics; the retrieval evaluation uses concept
directions only, never to choose anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.align.map import AlignmentMap
from engine.align.metrics import retrieval_metrics
from engine.align.pairing import check_pairing
from engine.errors import FormatError, NotFoundError, SiteMismatchError
from engine.models.activations import (
    auto_threads,
    corpus_fingerprint,
    iter_batch_pairs,
    pair_batches,
    torch_threads,
)
from engine.models.loading import d_model_of, model_info, resolve_layer, tokenizer_fingerprint
from engine.store.maps import CorpusTooSmallError, MapInfo, MapSites, SufficientStats, fit_map, save_map

HELDOUT_FRACTION = 0.1  # share of a corpus file's texts held out (by a hash of the text, not its position)
COSINE_SAMPLE = 2000  # held-out pairs kept for the mean-cosine metric


# ----------------------------------------------------------------------------- corpus


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a corpus file: JSONL with a ``text`` field, or one document per non-empty line
    (a leading ``<number><TAB>``, as in ConceptWorld's document files, is dropped)."""
    import json

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read corpus {p}: {e}") from None
    texts = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise FormatError(f"{p}:{i}: expected a JSON object with a 'text' field") from None
            continue
        head, tab, rest = line.partition("\t")
        texts.append(rest if tab and head.strip().isdigit() else line)
    if not texts:
        raise FormatError(f"corpus {p} has no texts")
    return texts


def split_heldout(texts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train, held-out): a text is held out when a hash of it falls in ``fraction`` (stable under
    reordering and appending). At least one text lands on each side when there are two."""
    cut = int(fraction * 2**32)
    train, held = [], []
    for t in texts:
        h = int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:4], "little")
        (held if h < cut else train).append(t)
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train and len(held) > 1:
        train.append(held.pop())
    return train, held


# ----------------------------------------------------------------------------- one pass


@dataclass
class PairedStats:
    """Training and held-out statistics per (pairing, subject layer), from one pass each."""

    train: dict[tuple[str, int], SufficientStats] = field(default_factory=dict)
    heldout: dict[tuple[str, int], SufficientStats] = field(default_factory=dict)
    corpus_fingerprint: str = ""


def accumulate_pairs(
    subject: tuple[torch.nn.Module, Any],
    foundation: tuple[torch.nn.Module, Any],
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    subject_layers: Sequence[int],
    foundation_layer: int,
    pairings: Sequence[str] = ("token",),
    *,
    pools: dict[str, str | None] | None = None,
    normalize: bool = False,
    max_pairs: int | None = None,
    batch_size: int = 16,
    subject_site: str = "resid_post",
    foundation_site: str = "resid_post",
    subject_layer_module: str | None = None,
    foundation_layer_module: str | None = None,
    cache_dir: str | Path | None = None,
    dtype: Any = torch.float32,
    threads: int | str | None = "auto",
    quiet: bool = False,
) -> PairedStats:
    """Run both models over the texts once and accumulate statistics for every pairing and layer.

    ``max_pairs`` caps the training pairs of each pairing (the pass stops once every pairing has
    them); held-out texts are used whole. ``threads="auto"`` runs narrow models on one torch
    thread (see `engine.models.activations.torch_threads`). ``cache_dir`` caches both models'
    activations as shards for the next fit on the same texts; ``dtype`` is the activations' dtype
    (statistics are float32 GEMMs into float64 whatever it is).
    """
    if threads == "auto":
        threads = auto_threads(subject[0], foundation[0])
    with torch_threads(threads):  # type: ignore[arg-type]
        return _accumulate_pairs(
            subject, foundation, train_texts, heldout_texts, subject_layers, foundation_layer, pairings, pools,
            normalize, max_pairs, batch_size, subject_site, foundation_site, subject_layer_module,
            foundation_layer_module, cache_dir, dtype, quiet,
        )


def _accumulate_pairs(subject, foundation, train_texts, heldout_texts, subject_layers, foundation_layer, pairings,
                      pools, normalize, max_pairs, batch_size, subject_site, foundation_site, subject_layer_module,
                      foundation_layer_module, cache_dir, dtype, quiet) -> PairedStats:
    pools = pools or {}
    sm, fm = subject[0], foundation[0]
    s_layers = [resolve_layer(sm, L, subject_layer_module) for L in subject_layers]
    f_layer = resolve_layer(fm, foundation_layer, foundation_layer_module)
    d_s, d_f = d_model_of(sm), d_model_of(fm)
    for p in pairings:
        check_pairing(p, subject[1], foundation[1])
    out = PairedStats(corpus_fingerprint=corpus_fingerprint([*train_texts, "\x00heldout\x00", *heldout_texts]))
    for split, texts, cap in (("train", train_texts, max_pairs), ("heldout", heldout_texts, None)):
        target = out.train if split == "train" else out.heldout
        for p in pairings:
            for L in s_layers:
                target[(p, L)] = SufficientStats(d_s, d_f, normalize=normalize,
                                                 sample_size=COSINE_SAMPLE if split == "heldout" else 0)
        if not texts:
            continue
        counts = dict.fromkeys(pairings, 0)
        for sb, fb in iter_batch_pairs(
            subject, foundation, texts, s_layers, f_layer, subject_site=subject_site,
            foundation_site=foundation_site, batch_size=batch_size, subject_layer_module=subject_layer_module,
            foundation_layer_module=foundation_layer_module, cache_dir=cache_dir if cap is None else None,
            dtype=dtype, desc=f"pairs ({split})", quiet=quiet,
        ):
            for p in pairings:
                if cap is not None and counts[p] >= cap:
                    continue
                chunk = pair_batches(sb, fb, texts, p, s_layers, f_layer, pools.get(p))
                if cap is not None and counts[p] + chunk.n > cap:
                    chunk = chunk.head(cap - counts[p])
                counts[p] += chunk.n
                for L in s_layers:
                    target[(p, L)].update(chunk.x[L], chunk.y)
            if cap is not None and all(c >= cap for c in counts.values()):
                break
    return out


# ----------------------------------------------------------------------------- atlas align


def resolve_subject(store: Any, subject: str, kind: str = "causal", revision: str | None = None,
                    dtype: Any = torch.float32, layer_module: str | None = None):
    """``(name, model, tokenizer)`` of a subject given as a store model name or a path / hub id.

    A model not yet in the store is registered under its folder name (or hub id) with its
    architecture, width, depth and tokenizer fingerprint.
    """
    from engine.models.loading import load_model

    try:
        info = store.get_model(subject)
    except NotFoundError:
        info = None
    if info is not None:
        if not info.source:
            raise NotFoundError(f"model {subject!r} has no recorded source (path or hub id) to load it from")
        model, tok = load_model(info.source, kind=kind, dtype=dtype, revision=revision or info.revision)
        return info.name, model, tok
    model, tok = load_model(subject, kind=kind, dtype=dtype, revision=revision)
    p = Path(subject).expanduser()
    name = p.resolve().name if p.exists() else subject
    mi = model_info(model, tok, layer_module)
    store.add_model(name, source=str(p.resolve()) if p.exists() else subject, architecture=mi.architecture,
                    d_model=mi.d_model, n_layers=mi.n_layers, revision=revision,
                    tokenizer_fingerprint=mi.tokenizer_fingerprint, extra={"kind": kind})
    return name, model, tok


def load_atlas_model(store: Any, atlas: Any, dtype: Any = torch.float32, kind: str | None = None):
    """The foundation model of an atlas, loaded from the source recorded in the store."""
    from engine.models.loading import load_model

    info = store.get_model(atlas.model)
    if not info.source:
        raise NotFoundError(
            f"atlas {atlas.name!r} is on model {atlas.model!r}, which has no recorded source to load it from; "
            "register the model with its path"
        )
    kind = kind or (store_extra(store, atlas.model).get("kind") or "causal")
    return load_model(info.source, kind=kind, dtype=dtype, revision=info.revision)


def store_extra(store: Any, model_name: str) -> dict[str, Any]:
    """The ``extra`` JSON of a registered model (e.g. ``kind``), empty when none."""
    from sqlalchemy import select

    from engine.store.schema import ModelRow

    with store.session() as s:
        row = s.scalar(select(ModelRow).where(ModelRow.name == model_name))
        return dict(row.extra or {}) if row is not None else {}


def align_subject(
    store: Any,
    subject: str,
    layer: int,
    atlas: str,
    texts: Sequence[str],
    heldout_texts: Sequence[str] | None = None,
    *,
    method: str = "procrustes",
    pairing: str = "auto",
    pool: str | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    normalize: bool = False,
    hook: str = "resid_post",
    layer_module: str | None = None,
    kind: str = "causal",
    dtype: Any = torch.float32,
    cache: bool = False,
    name: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    **params: Any,
) -> MapInfo:
    """Fit and store the map of ``subject`` at ``layer`` onto ``atlas`` (the ``atlas align`` command).

    Without ``heldout_texts`` a tenth of ``texts`` (by hash) is held out. ``pairing="auto"`` is
    ``token`` when the two tokenizers are the same and ``span`` otherwise. ``dtype`` loads both
    models in that dtype; ``cache`` keeps their activations under the store's ``activations/``.
    """
    from engine.store import layout

    ainfo = store.atlas(atlas)
    s_name, sm, stok = resolve_subject(store, subject, kind=kind, dtype=dtype, layer_module=layer_module)
    fm, ftok = load_atlas_model(store, ainfo, dtype=dtype)
    if d_model_of(fm) != ainfo.dim:
        raise SiteMismatchError(
            f"atlas {ainfo.name!r} has d={ainfo.dim} but its model {ainfo.model!r} has d={d_model_of(fm)}"
        )
    L = resolve_layer(sm, layer, layer_module)
    if pairing == "auto":
        pairing = "token" if tokenizer_fingerprint(stok) == tokenizer_fingerprint(ftok) else "span"
    if heldout_texts is None:
        texts, heldout_texts = split_heldout(texts)
    stats = accumulate_pairs(
        (sm, stok), (fm, ftok), texts, heldout_texts, [L], ainfo.layer, [pairing], pools={pairing: pool},
        normalize=normalize, max_pairs=max_pairs, batch_size=batch_size, subject_site=hook,
        foundation_site=ainfo.hook, subject_layer_module=layer_module,
        cache_dir=Path(store.path) / layout.ACTIVATIONS_DIR if cache else None, quiet=quiet,
    )
    sites = MapSites(s_name, L, ainfo.name, ainfo.model, ainfo.layer, hook, ainfo.hook)
    try:
        amap = fit_map(stats.train[(pairing, L)], method, heldout=stats.heldout[(pairing, L)], sites=sites,
                       pairing=pairing, corpus_fingerprint=stats.corpus_fingerprint, **params)
    except CorpusTooSmallError as e:
        raise CorpusTooSmallError(f"{e} (pairing {pairing!r}, {len(texts)} training texts)") from None
    return save_map(store, amap, name, overwrite=overwrite)


# ----------------------------------------------------------------------------- retrieval evaluation


@dataclass(frozen=True)
class RetrievalRow:
    """One cell of the retrieval table (DESIGN §8)."""

    subject: str
    method: str
    pairing: str
    layer: int
    mrr: float
    mpp: float
    top1: float
    top5: float
    n_queries: int
    n_pairs: int
    heldout_r2: float | None


def evaluate_maps(
    stats: PairedStats,
    queries: dict[int, np.ndarray],
    targets: np.ndarray,
    true_index: np.ndarray,
    methods: Sequence[str],
    subject: str = "",
) -> list[RetrievalRow]:
    """Fit every method on every (pairing, layer) of ``stats`` and rank the mapped ``queries[layer]``
    (the subject's own concept directions, (n, d_subject)) among ``targets`` (N, d_atlas)."""
    rows = []
    for (pairing, layer), train in sorted(stats.train.items()):
        for method in methods:
            amap: AlignmentMap = fit_map(train, method, heldout=stats.heldout.get((pairing, layer)))
            m = retrieval_metrics(amap.map_directions(queries[layer]), targets, true_index)
            rows.append(RetrievalRow(subject, method, pairing, layer, m.mrr, m.mpp, m.top1, m.top5, m.n,
                                     amap.n_pairs, amap.metrics.get("heldout_r2")))
    return rows


# ----------------------------------------------------------------------------- ConceptWorld


def world_of_store(store: Any, size: str = "tiny", seed: int = 0):
    """The ConceptWorld of this size and seed, built (or found cached) under the store's models/."""
    from engine.store import layout
    from engine.world import build_world

    return build_world(size=size, seed=seed, root=Path(store.path) / layout.MODELS_DIR)


def ensure_world_registered(store: Any, size: str = "tiny", seed: int = 0):
    """The world, with its models and atlas registered in the store (once)."""
    from engine.world import register_world

    world = world_of_store(store, size, seed)
    try:
        store.atlas(world.atlas_name)
    except NotFoundError:
        register_world(store, world)
    return world


def world_texts(world: Any) -> tuple[list[str], list[str]]:
    """(training texts, validation texts) for fitting maps on a world.

    Both come from the world's training documents (a tenth held out by hash, for λ and the fit
    metrics). The world's own held-out documents define the ground-truth concept directions the
    retrieval evaluation ranks, so no fit ever sees them.
    """
    return split_heldout([t for t, _ in world.train_docs])


SUBJECT_KEYS = {"a": "subject_a", "b": "subject_b"}


def evaluate_world_retrieval(
    store: Any,
    size: str = "tiny",
    seed: int = 0,
    methods: Sequence[str] = ("procrustes", "ridge", "correlation"),
    layers: Sequence[int] | None = None,
    pairings: Sequence[str] | None = None,
    subjects: Sequence[str] | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    quiet: bool = False,
    world: Any = None,
) -> list[RetrievalRow]:
    """Retrieval MRR / MPP / top-k per subject × pairing × layer × method on ConceptWorld.

    Targets are the foundation's concept directions at the atlas layer (the world atlas's
    vectors); queries are each subject's own concept directions at each of its layers. Subject A
    shares the foundation's tokenizer (``token`` pairing by default); subject B does not
    (``span`` and ``text``).
    """
    from engine.models.loading import load_model

    world = world or world_of_store(store, size, seed)
    atlas_layer = world.foundation.atlas_layer
    foundation = load_model(world.foundation.path)
    targets = np.asarray(world.concept_directions("foundation", atlas_layer))  # (K, d_f)
    true_index = np.arange(targets.shape[0])
    train, val = world_texts(world)
    rows: list[RetrievalRow] = []
    for s in subjects or ("a", "b"):
        key = SUBJECT_KEYS.get(s.lower().removeprefix("subject_"))
        if key is None:
            raise NotFoundError(f"unknown world subject {s!r}; use a or b")
        spec = world.model(key)
        sub = load_model(spec.path)
        same_tok = tokenizer_fingerprint(sub[1]) == tokenizer_fingerprint(foundation[1])
        ps = list(pairings or (("token",) if same_tok else ("span", "text")))
        if not same_tok and "token" in ps:
            ps.remove("token")  # impossible across tokenizers; the table says so by its absence
        if not ps:
            continue
        ls = [resolve_layer(sub[0], L) for L in (layers if layers is not None else range(spec.n_layers))]
        stats = accumulate_pairs(sub, foundation, train, val, ls, atlas_layer, ps, max_pairs=max_pairs,
                                 batch_size=batch_size, quiet=quiet)
        queries = {L: np.asarray(world.concept_directions(key, L)) for L in ls}
        rows += evaluate_maps(stats, queries, targets, true_index, methods, subject=spec.name)
    return rows
