"""Steering evaluation on ConceptWorld: maps found or fitted, directions, prompts, the report.

Glue between a built world (`engine.world`) and the world-agnostic evaluation in
`engine.steering.faithfulness`: transferred directions are the world atlas's concept vectors sent
through each stored map of the subject; native directions are the subject's own centred topic
means (the world's ground truth); faithfulness is scored by the world's plurality-concept
reader. Site choice uses `template_prompts`, topic-free prompts that are not the evaluation
prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import ShapeError
from engine.steering.faithfulness import DirectionSet, SteeringGrid, SteeringReport, evaluate_steering
from engine.store.store import Store
from engine.world.locate import ensure_registered, subject_key, world_texts
from engine.world.register import concept_ordinals


def template_prompts(exclude: Sequence[str] = ()) -> list[str]:
    """Topic-free held-out prompts for choosing the site: the words of ConceptWorld's body
    templates before their first slot ("i saw a", "we looked at the", ...), minus ``exclude``
    (the evaluation prompts)."""
    from engine.world.corpus import BODY_TEMPLATES, OPENING_TEMPLATES

    skip = {p.strip() for p in exclude}
    out = []
    for t in BODY_TEMPLATES + OPENING_TEMPLATES:
        head = t.split("{", 1)[0].strip()
        if head and head not in skip and head not in out:
            out.append(head)
    return out


# × typical residual norm, about √2 apart: on ConceptWorld the useful range is 0.25-0.75 (the
# typical norm is many times a topic direction's natural length) and ≥ 1 breaks the text.
DEFAULT_STRENGTHS: tuple[float, ...] = (0.125, 0.25, 0.35, 0.5, 0.7, 1.0, 2.0)
DEFAULT_METHODS: tuple[str, ...] = ("procrustes", "ridge")  # maps fitted when the store has none
MAX_FIT_PAIRS = 200_000  # pairs per fitted map: ~1,000x the width of a world model, a fraction of the corpus


def world_maps(store: Store, world: Any, key: str, layers: Sequence[int] | None = None, map_name: str | None = None,
               methods: Sequence[str] = DEFAULT_METHODS, max_pairs: int | None = MAX_FIT_PAIRS,
               quiet: bool = False, device: str = "cpu", dtype: str = "float32") -> list[Any]:
    """The stored maps of a world subject onto the world atlas at ``layers`` (default: all).

    With ``map_name``, that map only. Otherwise every (layer, method) of ``methods`` the store
    lacks is fitted first, from one pass over (at most ``max_pairs`` pairs of) the world's
    training texts, and stored.
    """
    from engine.align.fit import accumulate_pairs
    from engine.align.map import MapSites, load_map, save_map
    from engine.align.pairing import PairingConfig
    from engine.errors import NotFoundError
    from engine.models.hooks import Site
    from engine.models.loading import load_model


    wm = world.model(key)
    on_world = [m for m in store.maps() if m.atlas == world.atlas_name and m.subject_model == wm.name]
    if map_name is not None:
        if map_name not in {m.name for m in on_world}:
            raise NotFoundError(f"no map {map_name!r} from {wm.name!r} onto atlas {world.atlas_name!r}; "
                                "`atlas maps` lists them")
        return [load_map(store, map_name)]
    wanted = list(range(wm.n_layers)) if layers is None else [int(v) for v in layers]
    bad = [v for v in wanted if not 0 <= v < wm.n_layers]
    if bad:
        raise ShapeError(f"layers {bad} are out of range for {wm.name} ({wm.n_layers} layers: 0..{wm.n_layers - 1})")
    have = {(m.subject_layer, m.method) for m in on_world}
    todo = [(L, meth) for L in wanted for meth in methods if (L, meth) not in have]
    if todo:
        atlas = store.atlas(world.atlas_name)
        subject = load_model(wm.path, device=device, dtype=dtype)
        foundation = load_model(world.foundation.path, device=device, dtype=dtype)
        pairing = "token" if wm.tokenizer_fingerprint == world.foundation.tokenizer_fingerprint else "span"
        train, held = world_texts(world)
        fit_layers = sorted({L for L, _ in todo})
        stats = accumulate_pairs(subject, foundation, train, held, Site(tuple(fit_layers)), Site((atlas.layer,)),
                                 PairingConfig((pairing,), max_pairs=max_pairs), quiet=quiet)
        taken = {m.name for m in store.maps()}
        for L, meth in todo:
            sites = MapSites(wm.name, L, atlas.name, atlas.model, atlas.layer)
            amap = stats.fit(pairing, L, meth, sites)
            name = f"{wm.name}-L{L}-{meth}"
            if name in taken:
                name = f"{name}-{pairing}"
            save_map(store, amap, name)
        on_world = [m for m in store.maps() if m.atlas == world.atlas_name and m.subject_model == wm.name]
    return [load_map(store, m.name) for m in on_world if m.subject_layer in wanted]


def world_sites(store: Store, world: Any, key: str, maps: Sequence[Any]) -> list[DirectionSet]:
    """Transferred directions through each map, and the subject's native directions at each of
    their layers, one row per world concept."""
    atlas = store.atlas_vectors(world.atlas_name)[concept_ordinals(store, world)]  # (K, d_atlas)
    sites = [DirectionSet("transferred", m.subject_layer, m.inverse_directions(atlas), m.subject_resid_norm,
                          m.name, m.method, dict(m.metrics)) for m in maps]
    norms: dict[int, float] = {}
    for m in maps:  # one norm per layer: every map of a layer measured the same site
        norms.setdefault(m.subject_layer, m.subject_resid_norm)
    sites += [DirectionSet("native", L, np.asarray(world.concept_directions(key, L), dtype=np.float32), norm)
              for L, norm in sorted(norms.items())]
    return sites


def evaluate_world_steering(
    store: Store, size: str = "small", seed: int = 0, *, subject: str = "a", grid: SteeringGrid | None = None,
    layers: Sequence[int] | None = None, map_name: str | None = None, quiet: bool = False, device: str = "cpu",
    dtype: str = "float32",
) -> SteeringReport:
    """Steering faithfulness on ConceptWorld (`atlas eval steering --world`).

    The world is built (or reused) and registered; maps of the subject onto the world atlas are
    found or fitted (Procrustes and ridge at every layer); evaluation prompts are the world's
    neutral prompts, site choice uses `template_prompts` (never the evaluation prompts), and the
    world's other-topic prompts are reported at the chosen cells. ``grid`` None: `DEFAULT_STRENGTHS`
    added at every position.
    """
    from engine.models.activations import auto_threads, torch_threads
    from engine.models.loading import load_model

    key = subject_key(subject)
    world = ensure_registered(store, size, seed)
    maps = world_maps(store, world, key, layers, map_name, quiet=quiet, device=device, dtype=dtype)
    model, tok = load_model(world.model(key).path, device=device, dtype=dtype)
    with torch_threads(auto_threads(model)):
        report = evaluate_steering(
            model, tok, world.plurality_concept, world_sites(store, world, key, maps),
            neutral_prompts=world.neutral_prompts, heldout_prompts=template_prompts(world.neutral_prompts),
            other_topic_prompts=world.other_topic_prompts, grid=grid or SteeringGrid(DEFAULT_STRENGTHS), quiet=quiet,
        )
    report.settings.update(world=world.name, subject=world.model(key).name, atlas=world.atlas_name)
    return report
