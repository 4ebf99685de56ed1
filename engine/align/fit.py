"""Fitting alignment maps: from sufficient statistics, and from a corpus in one pass (docs/design.md §5).

One pass runs both models over the training texts (and one over the held-out texts), draws the
requested pairings from the same forward passes, and accumulates one `SufficientStats` per
(pairing, subject layer); every method and every layer is then fitted from those statistics
without touching the models again. Held-out pairs come from texts the fit never saw: they choose
hyper-parameters (ridge's λ) and give the fit metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.align.corpus import split_heldout
from engine.align.map import AlignmentMap, MapSites, plain_json, save_map
from engine.align.methods import LinearFit, get_method, heldout_r2
from engine.align.pairing import PairingConfig, check_pairing, iter_batch_pairs, pair_batches, pass_lengths
from engine.align.request import AlignRequest
from engine.align.stats import SufficientStats
from engine.distributed.ray_exec import RayConfig, StoreLocation, cluster_cpus, map_ordered, ray_session
from engine.errors import AtlasError, BadValueError, ShapeError, SiteMismatchError
from engine.models.activations import auto_threads, torch_threads
from engine.models.devices import ACTIVATION_DTYPE
from engine.models.hooks import Site, resolve_blocks
from engine.models.loading import ModelKind, d_model_of, load_registered, tokenizer_fingerprint
from engine.models.registry import resolve_model
from engine.progress import progress
from engine.store.store import MapInfo, Store
from engine.util import corpus_fingerprint, failpoint

COSINE_SAMPLE = 2000  # held-out pairs kept for the mean-cosine metric


# ----------------------------------------------------------------------------- corpus


# ----------------------------------------------------------------------------- one pass


@dataclass
class PairedStats:
    """Training and held-out statistics per (pairing, subject layer), from one pass each."""

    train: dict[tuple[str, int], SufficientStats] = field(default_factory=dict)
    heldout: dict[tuple[str, int], SufficientStats] = field(default_factory=dict)
    corpus_fingerprint: str = ""

    def fit(self, pairing: str, layer: int, method: str, sites: MapSites | None = None,
            **params: Any) -> AlignmentMap:
        """The map of ``method`` fitted on (``pairing``, ``layer``): its held-out statistics choose
        hyper-parameters and give the metrics; the corpus fingerprint is recorded with it."""
        return fit_map(self.train[(pairing, layer)], method, heldout=self.heldout.get((pairing, layer)), sites=sites,
                       pairing=pairing, corpus_fingerprint=self.corpus_fingerprint, **params)

    def merge(self, other: PairedStats) -> None:
        """Fold the statistics of another shard of the corpus into these (exact: they are sums).

        Statistics with no pairs yet are replaced by the other shard's, reservoir sample included
        (`SufficientStats.merge` keeps only this side's sample, so held-out texts go to one shard).
        """
        for mine, theirs in ((self.train, other.train), (self.heldout, other.heldout)):
            for key, st in theirs.items():
                if key not in mine or mine[key].count == 0:
                    mine[key] = st
                else:
                    mine[key].merge(st)


def accumulate_pairs(
    subject: tuple[torch.nn.Module, Any],
    foundation: tuple[torch.nn.Module, Any],
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    subject_site: Site,
    foundation_site: Site,
    config: PairingConfig = PairingConfig(),
    *,
    quiet: bool = False,
) -> PairedStats:
    """Run both models over the texts once and accumulate statistics for every pairing of
    ``config`` and every layer of ``subject_site`` (the foundation site has one layer).

    ``config.max_pairs`` caps the training pairs of each pairing (the pass stops once every
    pairing has them); held-out texts are used whole. ``config.train_sample`` keeps that many
    training pairs as a reservoir sample (`method_config` sets it for a method that trains on pairs). ``threads="auto"`` runs narrow models on one
    torch thread (see `engine.models.activations.torch_threads`).
    """
    threads = config.threads
    if threads == "auto":
        threads = auto_threads(subject[0], foundation[0])
    with torch_threads(threads):  # type: ignore[arg-type]
        return _accumulate_pairs(subject, foundation, train_texts, heldout_texts,
                                 subject_site.resolved(subject[0]), foundation_site.resolved(foundation[0]), config,
                                 quiet)


def _accumulate_pairs(subject: tuple[torch.nn.Module, Any], foundation: tuple[torch.nn.Module, Any],
                      train_texts: Sequence[str], heldout_texts: Sequence[str], s_site: Site, f_site: Site,
                      config: PairingConfig, quiet: bool) -> PairedStats:
    d_s, d_f = d_model_of(subject[0]), d_model_of(foundation[0])
    for p in config.pairings:
        check_pairing(p, subject[1], foundation[1])
    out = PairedStats(corpus_fingerprint=corpus_fingerprint([*train_texts, "\x00heldout\x00", *heldout_texts]))
    for split, texts, cap in (("train", train_texts, config.max_pairs), ("heldout", heldout_texts, None)):
        target = out.train if split == "train" else out.heldout
        for p in config.pairings:
            for L in s_site.layers:
                target[(p, L)] = SufficientStats(d_s, d_f, normalize=config.normalize,
                                                 sample_size=COSINE_SAMPLE if split == "heldout" else config.train_sample,
                                                 gemm_dtype=config.stats_dtype)
        if not texts:
            continue
        counts = dict.fromkeys(config.pairings, 0)
        for sb, fb in iter_batch_pairs(
            subject, foundation, texts, s_site, f_site, batch_size=config.batch_size,
            lengths=pass_lengths(config.pairings), cache_dir=config.cache_dir if cap is None else None, dtype=ACTIVATION_DTYPE,
            desc=None if quiet else f"pairs ({split})",
        ):
            for p in config.pairings:
                if cap is not None and counts[p] >= cap:
                    continue
                chunk = pair_batches(sb, fb, texts, p, s_site.layers, f_site.layer, config.pools.get(p))
                if cap is not None and counts[p] + chunk.n > cap:
                    chunk = chunk.head(cap - counts[p])
                counts[p] += chunk.n
                for L in s_site.layers:
                    target[(p, L)].update(chunk.x[L], chunk.y)
            if cap is not None and all(c >= cap for c in counts.values()):
                break
    return out


# ----------------------------------------------------------------------------- on Ray


def accumulate_pairs_on_ray(
    store: Store,
    subject: str,
    foundation: str,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    sites: tuple[Site, Site],
    config: PairingConfig,
    ray: RayConfig,
    *,
    kind: ModelKind | None = None,
    quiet: bool = False,
) -> PairedStats:
    """`accumulate_pairs` of the store's models ``subject`` and ``foundation``, on Ray workers.

    The texts are cut into one task per cluster CPU: contiguous shards of the training texts, at
    multiples of ``config.batch_size`` (so every forward pass sees the batches an in-process pass
    sees), the last with all the held-out texts (their reservoir sample is drawn as in-process).
    Each task loads both models from the store with the one model loader and returns its
    `PairedStats`; the driver merges them (sums: the same map to float rounding). Sites must be
    resolved (absolute layers). ``config.max_pairs`` is refused: it caps pairs in corpus order.
    """
    subject_site, foundation_site = sites
    if config.max_pairs is not None:
        raise BadValueError("a pair cap (--max-tokens) takes pairs in corpus order and cannot be sharded; "
                            "with Ray give a shorter corpus instead")
    where = StoreLocation.of(store)
    with ray_session(ray) as r:
        n_shards = cluster_cpus(r)
        bs = config.batch_size
        # texts per shard, whole batches; the last shard also takes the held-out texts, so about
        # as many texts each
        per = -(-(len(train_texts) + len(heldout_texts)) // (n_shards * bs)) * bs
        cuts = [min(i * per, len(train_texts)) for i in range(n_shards)] + [len(train_texts)]
        shards: list[tuple[Any, ...]] = [
            (where, subject, kind, foundation, subject_site, foundation_site, config, list(train_texts[a:b]),
             list(heldout_texts) if i == n_shards - 1 else [])
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
        ]
        shards = [sh for sh in shards[:-1] if sh[7]] + shards[-1:]  # no task for an empty shard
        out = PairedStats(corpus_fingerprint=corpus_fingerprint([*train_texts, "\x00heldout\x00", *heldout_texts]))
        bar = progress(total=len(shards), desc="pairs (ray shards)", unit="shard", quiet=quiet)
        try:
            for part in map_ordered(r, stats_of_shard, shards, window=len(shards), max_retries=ray.max_retries):
                out.merge(part)
                bar.update(1)
        finally:
            bar.close()
    return out


def stats_of_shard(where: StoreLocation, subject: str, kind: ModelKind | None, foundation: str, subject_site: Site,
                   foundation_site: Site, config: PairingConfig, train_texts: list[str],
                   heldout_texts: list[str]) -> PairedStats:
    """One Ray task of `accumulate_pairs_on_ray`: load both models from the store, run the pass."""
    store = where.open()
    try:
        _, sm, stok = resolve_model(store, subject, kind=kind, dtype=config.dtype,
                                    layer_module=subject_site.layer_module, device=config.device)
        fm, ftok = load_registered(store, foundation, dtype=config.dtype, device=config.device)
    finally:
        store.close()
    failpoint("align.shard")
    return accumulate_pairs((sm, stok), (fm, ftok), train_texts, heldout_texts, subject_site, foundation_site,
                            config, quiet=True)


# ----------------------------------------------------------------------------- atlas align


def align_subject(store: Store, request: AlignRequest, *, quiet: bool = False) -> MapInfo:
    """Fit and store the map of ``request.subject`` at its site (one layer) onto its atlas.

    `align_layers` for a site of one layer (a `ShapeError` otherwise).
    """
    if request.site is None:
        raise ShapeError("align_subject fits one layer: give the request a site (align_layers sweeps several)")
    request.site.layer  # noqa: B018 - one layer here (a ShapeError otherwise); align_layers sweeps several
    return align_layers(store, request, quiet=quiet)[0]


def align_layers(store: Store, request: AlignRequest, *, quiet: bool = False) -> list[MapInfo]:
    """Fit and store a map per layer of ``request.site`` (``None``: every block of the subject) onto
    ``request.atlas``, in one pass over the texts (``atlas align``).

    Without held-out texts a tenth of the texts (by hash) is held out. ``pairing="auto"`` is
    ``token`` when the two tokenizers are the same and ``span`` otherwise; the request's config says
    how the pass pairs (its pools, caps, batch size and dtype, in which both models are loaded); its
    ``pairings`` are replaced by the pairing. The subject's ``kind`` (causal | encoder) defaults to
    its registered kind (causal for a new one).

    Each batch runs each model once, reading every requested subject layer; one `SufficientStats`
    per layer (O(layers × d²) memory) gives one map per layer, saved under the request's ``name``
    with ``{layer}`` replaced (or ``<name>-L<layer>`` when several layers and no ``{layer}``), else
    the default name. Returns the saved maps in layer order.

    With ``request.ray`` the pass runs on Ray workers (`accumulate_pairs_on_ray`): the same
    statistics, merged from shards of the corpus.
    """
    method, pairing, site, kind = request.method, request.pairing, request.site, request.kind
    params = request.method_params()  # an unknown method fails now, not after the pass over the corpus
    check_method_params(method, params)
    config = method_config(request.config or PairingConfig(), [method])
    ainfo = store.atlas(request.atlas)
    s_name, sm, stok = resolve_model(store, request.subject, kind=kind, dtype=config.dtype,
                                     layer_module=site.layer_module if site else None, device=config.device)
    fm, ftok = load_registered(store, ainfo.model, dtype=config.dtype, device=config.device)
    if d_model_of(fm) != ainfo.dim:
        raise SiteMismatchError(
            f"atlas {ainfo.name!r} has d={ainfo.dim} but its model {ainfo.model!r} has d={d_model_of(fm)}"
        )
    if site is None:
        site = Site(tuple(range(len(resolve_blocks(sm)))))
    site = site.resolved(sm)
    layers = sorted(set(site.layers))
    site = Site(tuple(layers), site.hook, site.layer_module)
    if pairing == "auto":
        pairing = "token" if tokenizer_fingerprint(stok) == tokenizer_fingerprint(ftok) else "span"
    texts, heldout_texts = request.texts, request.heldout
    if heldout_texts is None:
        texts, heldout_texts = split_heldout(texts)
    pool = config.pools.get(pairing, config.pools.get("auto"))
    config = dataclasses.replace(config, pairings=(pairing,), pools={pairing: pool} if pool else {})
    f_site = Site((ainfo.layer,), ainfo.hook)
    if request.ray is None:
        stats = accumulate_pairs((sm, stok), (fm, ftok), texts, heldout_texts, site, f_site, config, quiet=quiet)
    else:
        check_pairing(pairing, stok, ftok)
        stats = accumulate_pairs_on_ray(store, s_name, ainfo.model, texts, heldout_texts,
                                        (site.resolved(sm), f_site.resolved(fm)), config, request.ray, kind=kind,
                                        quiet=quiet)
    out = []
    for L in layers:
        sites = MapSites(s_name, L, ainfo.name, ainfo.model, ainfo.layer, site.hook, ainfo.hook)
        try:
            amap = stats.fit(pairing, L, method, sites, **params)
        except CorpusTooSmallError as e:
            raise CorpusTooSmallError(f"{e} (pairing {pairing!r}, {len(texts)} training texts)") from None
        out.append(save_map(store, amap, _layer_name(request.name, L, len(layers)), overwrite=request.overwrite))
    return out


def method_config(config: PairingConfig, methods: Sequence[str]) -> PairingConfig:
    """``config`` with the training sample the largest of ``methods`` asks for (rcsls trains on pairs)."""
    need = max((get_method(m).train_sample for m in methods), default=0)
    return dataclasses.replace(config, train_sample=need) if need > config.train_sample else config


def check_method_params(method: str, params: dict[str, Any]) -> None:
    """A one-line `BadValueError` when ``method`` needs parameters only its caller can give
    (self_learning: the subject's and the atlas's feature dictionaries), before any pass."""
    missing = get_method(method).missing(params)
    if missing:
        raise BadValueError(
            f"method {method!r} needs {' and '.join(missing)} (the subject's and the atlas's feature dictionaries), "
            "which atlas align does not have: fit it from Python (fit_map(..., subject_vectors=..., "
            "atlas_vectors=...)) or through atlas eval labelling --world --features sae")


def _layer_name(name: str | None, layer: int, n_layers: int) -> str | None:
    if name is None:
        return None
    if "{layer}" in name:
        return name.replace("{layer}", str(layer))
    return name if n_layers == 1 else f"{name}-L{layer}"


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
    check_method_params(method, params)
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
