"""Steering with SAE latents on ConceptWorld: a topic latent's decoder row through the inverse map.

Next to steering with topic means (`engine.world.eval.steering`), the realistic form: the
direction for concept c is the decoder row of the foundation SAE latent whose ground truth is c's
topic (the one with the largest topic share), sent into the subject through the inverse of a map
onto the SAE atlas ``world-<size>-sae`` (`evaluate_sae_labelling`'s maps). A concept whose topic
no foundation latent carries gets the latent whose activation leans most towards it (largest
topic share among latents whose top concept is c), or no direction (a zero row: unsteered) when
none leans towards it; ``coverage`` says how many concepts had a topic latent. The same maps also
carry the topic means (the world atlas's vectors, at the same foundation site), so the two kinds
of direction are compared through identical maps, beside the subject's native directions.

Scored with `engine.steering.faithfulness.evaluate_steering` exactly as the topic-mean
evaluation: site and strength chosen on held-out template prompts, faithfulness on the neutral
prompts. In the report, transferred rows have method ``sae-<method>`` or ``mean-<method>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.steering.faithfulness import DirectionSet, SteeringGrid, SteeringReport, evaluate_steering
from engine.store.store import Store
from engine.world.locate import ensure_registered, subject_key


def sae_concept_latents(ground_truth: Sequence[dict], concept_names: Sequence[str]) -> tuple[list[int | None], int]:
    """For each concept, the foundation latent to steer with (None: none leans towards it), and
    how many concepts have a latent whose ground truth is their topic."""
    out: list[int | None] = []
    covered = 0
    for name in concept_names:
        topic = [e for e in ground_truth if e["key"] == f"topic:{name}"]
        leaning = [e for e in ground_truth if e["top_concept"] == name and e["fires"] > 0 and e["kind"] != "word"]
        pool = topic or leaning
        covered += bool(topic)
        out.append(max(pool, key=lambda e: e["topic_share"])["latent"] if pool else None)
    return out, covered


def evaluate_sae_steering(store: Store, size: str = "small", seed: int = 0, *, subject: str = "a",
                          methods: Sequence[str] = ("procrustes", "ridge"), grid: SteeringGrid | None = None,
                          max_docs: int | None = None, quiet: bool = False,
                          device: str = "cpu", dtype: str = "float32") -> tuple[SteeringReport, dict[str, Any]]:
    """Steering faithfulness with SAE-latent directions and with topic means, through the same maps
    (``grid`` None: the world steering evaluation's strengths, added at every position).

    Returns the report and ``{"coverage", "n_concepts", "latents", "maps"}``.
    """
    from engine.models.activations import auto_threads, torch_threads
    from engine.models.loading import load_model
    from engine.world.eval.sae_labelling import MAX_DOCS, MapFitting, sae_maps
    from engine.world.eval.steering import DEFAULT_STRENGTHS, template_prompts
    from engine.world.register import concept_ordinals
    from engine.world.sae import build_saes, register_sae_atlas

    key = subject_key(subject)
    world = ensure_registered(store, size, seed)
    saes = build_saes(world, progress=not quiet)
    register_sae_atlas(store, world, saes)
    wm = world.model(key)
    maps = sae_maps(store, world, saes, key, methods,
                    MapFitting(max_docs=max_docs or MAX_DOCS, device=device, dtype=dtype), quiet=quiet)
    maps = [(p, m, amap) for p, m, amap in maps if p in ("token", "span")]  # one pairing: the usual one
    decoder = saes.get("foundation").decoder()
    latents, covered = sae_concept_latents(saes.get("foundation").ground_truth(), [c.name for c in world.concepts])
    rows = np.stack([decoder[i] if i is not None else np.zeros(decoder.shape[1], np.float32) for i in latents])
    means = store.atlas_vectors(world.atlas_name)[concept_ordinals(store, world)]  # topic means, same site
    sites: list[DirectionSet] = []
    for _pairing, method, amap in maps:
        sae_dirs = amap.inverse_directions(rows)
        sae_dirs[[i for i, v in enumerate(latents) if v is None]] = 0.0
        sites += [DirectionSet("transferred", amap.subject_layer, sae_dirs, amap.subject_resid_norm, amap.name,
                               f"sae-{method}", dict(amap.metrics)),
                  DirectionSet("transferred", amap.subject_layer, amap.inverse_directions(means),
                               amap.subject_resid_norm, amap.name, f"mean-{method}", dict(amap.metrics))]
    L = wm.default_layer
    sites.append(DirectionSet("native", L, np.asarray(world.concept_directions(key, L), np.float32),
                              maps[0][2].subject_resid_norm))
    model, tok = load_model(wm.path, device=device, dtype=dtype)
    with torch_threads(auto_threads(model)):
        report = evaluate_steering(
            model, tok, world.plurality_concept, sites, neutral_prompts=world.neutral_prompts,
            heldout_prompts=template_prompts(world.neutral_prompts), other_topic_prompts=world.other_topic_prompts,
            grid=grid or SteeringGrid(DEFAULT_STRENGTHS), quiet=quiet,
        )
    report.settings.update(world=world.name, subject=wm.name, atlas=f"{world.name}-sae")
    info = {"coverage": covered, "n_concepts": len(world.concepts), "latents": latents,
            "maps": [amap.name for _, _, amap in maps]}
    return report, info
