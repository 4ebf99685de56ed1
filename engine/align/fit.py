"""Fitting alignment maps: from sufficient statistics, and from a corpus in one pass (DESIGN §5).

One pass runs both models over the training texts (and one over the held-out texts), draws the
requested pairings from the same forward passes, and accumulates one `SufficientStats` per
(pairing, subject layer); every method and every layer is then fitted from those statistics
without touching the models again. Held-out pairs come from texts the fit never saw: they choose
hyper-parameters (ridge's λ) and give the fit metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.align.corpus import split_heldout
from engine.align.map import AlignmentMap, MapSites, plain_json
from engine.align.methods import LinearFit, get_method, heldout_r2
from engine.align.pairing import check_pairing, iter_batch_pairs, pair_batches
from engine.align.stats import SufficientStats
from engine.errors import AtlasError, NotFoundError, ShapeError, SiteMismatchError
from engine.models.activations import auto_threads, torch_threads
from engine.models.hooks import resolve_layer
from engine.models.loading import d_model_of, model_info, tokenizer_fingerprint
from engine.store.store import MapInfo, Store
from engine.util import corpus_fingerprint

COSINE_SAMPLE = 2000  # held-out pairs kept for the mean-cosine metric


# ----------------------------------------------------------------------------- corpus


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


def resolve_subject(store: Store, subject: str, kind: str = "causal", revision: str | None = None,
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


def load_atlas_model(store: Store, atlas: Any, dtype: Any = torch.float32, kind: str | None = None):
    """The foundation model of an atlas, loaded from the source recorded in the store."""
    from engine.models.loading import load_model

    info = store.get_model(atlas.model)
    if not info.source:
        raise NotFoundError(
            f"atlas {atlas.name!r} is on model {atlas.model!r}, which has no recorded source to load it from; "
            "register the model with its path"
        )
    kind = kind or (store.model_extra(atlas.model).get("kind") or "causal")
    return load_model(info.source, kind=kind, dtype=dtype, revision=info.revision)


def align_subject(
    store: Store,
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
    return store.save_map(amap, name, overwrite=overwrite)


# ----------------------------------------------------------------------------- retrieval evaluation


# ----------------------------------------------------------------------------- ConceptWorld


class CorpusTooSmallError(AtlasError):
    """Fewer pairs than dimensions: the fit would be underdetermined."""


def fit_map(
    stats: SufficientStats,
    method: str = "procrustes",
    heldout: SufficientStats | None = None,
    *,
    sites: MapSites | None = None,
    pairing: str | None = None,
    corpus_fingerprint: str | None = None,
    **params: Any,
) -> AlignmentMap:
    """Fit an `AlignmentMap` from training statistics with a registered method.

    ``heldout`` statistics (pairs from texts not in the training set) choose hyper-parameters
    (ridge's λ) and give the fit metrics: held-out R² both ways and, from their reservoir sample,
    the mean cosine between mapped and true atlas activations.
    """
    m = get_method(method)
    n, d_x, d_y = stats.count, stats.d_x, stats.d_y
    if n < max(d_x, d_y):
        raise CorpusTooSmallError(
            f"only {n} pairs for d_subject={d_x}, d_atlas={d_y}: a fit needs at least as many pairs as "
            f"dimensions ({max(d_x, d_y)}); use a larger corpus or raise --max-tokens"
        )
    if heldout is not None and (heldout.d_x, heldout.d_y, heldout.normalize) != (d_x, d_y, stats.normalize):
        raise ShapeError("held-out statistics must have the training statistics' dimensions and normalisation")
    fit: LinearFit = m.fit(stats, heldout, **params)
    metrics = fit_metrics(fit, stats, heldout)
    s = sites
    return AlignmentMap(
        weight=fit.A, inverse_weight=fit.B, subject_mean=fit.mean_x, atlas_mean=fit.mean_y, method=method,
        subject_model=s.subject_model if s else "", subject_layer=s.subject_layer if s else -1,
        subject_hook=s.subject_hook if s else "resid_post", atlas=s.atlas if s else "",
        atlas_model=s.atlas_model if s else "", atlas_layer=s.atlas_layer if s else -1,
        atlas_hook=s.atlas_hook if s else "resid_post", pairing=pairing,
        params=plain_json(fit.params), n_pairs=n, corpus_fingerprint=corpus_fingerprint, metrics=metrics,
    )


def fit_metrics(fit: LinearFit, train: SufficientStats, heldout: SufficientStats | None) -> dict[str, Any]:
    """Typical norms of both sites, train R², and held-out R² (both ways) and mean cosines."""
    out: dict[str, Any] = {
        "subject_resid_norm": train.mean_norm_x,
        "atlas_resid_norm": train.mean_norm_y,
        "train_r2": heldout_r2(fit, train),
    }
    if heldout is None or heldout.count == 0:
        return out
    out["n_heldout"] = heldout.count
    out["heldout_r2"] = heldout_r2(fit, heldout)
    out["heldout_r2_inverse"] = heldout_r2(fit, heldout, inverse=True)
    X, Y = heldout.sample()
    if len(X):
        pred = (X.astype(np.float64) - fit.mean_x) @ fit.A + fit.mean_y  # (k, d_y)
        out["heldout_cosine"] = _mean_cosine(pred, Y)
        out["heldout_cosine_centred"] = _mean_cosine(pred - fit.mean_y, Y - fit.mean_y)
        out["n_cosine_sample"] = int(len(X))
    return out


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))
