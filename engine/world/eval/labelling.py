"""Labelling accuracy on ConceptWorld: label a subject's own concept directions through its map.

What this measures is the whole labelling path a user runs (`atlas label MAP --features
native:`): the subject's native concept directions (centred topic means at the map's layer, the
world's ground truth) are read as a feature source, projected through the stored map, searched in
the world atlas and written as a labelling run; the run's stored labels are then compared with the
truth, feature i being the world's concept i. Top-1 is the share of features whose first label is
their concept; top-5 the share with it among the first five. Maps are the store's maps onto the
world atlas from each subject; a subject with none gets a Procrustes map fitted on the world's
training documents first (`engine.align.fit.align_subject`, held-out documents for its metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from engine.errors import NotFoundError
from engine.models.hooks import Site
from engine.store.store import Store
from engine.world.locate import ensure_registered, world_texts
from engine.world.register import concept_ordinals

EVAL_RUN_PREFIX = "eval-labelling."
SUBJECT_KEYS = ("subject_a", "subject_b")


@dataclasses.dataclass(frozen=True)
class LabellingEvalRow:
    subject: str  # the subject model's store name
    method: str  # the map's alignment method
    map: str
    layer: int
    n: int  # features labelled (the world's concepts)
    top1: float
    top5: float
    run: str  # the labelling run holding the labels (`atlas export RUN`)


def evaluate_world_labelling(store: Store, size: str = "small", seed: int = 0, maps: list[str] | None = None,
                             quiet: bool = False, device: str = "cpu", dtype: str = "float32") -> list[LabellingEvalRow]:
    """Top-1 / top-5 labelling accuracy of each world subject's native directions, per map."""
    from engine.labelling.export import iter_labels
    from engine.labelling.run import label_features


    world = ensure_registered(store, size, seed)
    subjects = {getattr(world, k).name: k for k in SUBJECT_KEYS}
    on_world = [m for m in store.maps() if m.atlas == world.atlas_name and m.subject_model in subjects]
    if maps:
        unknown = sorted(set(maps) - {m.name for m in on_world})
        if unknown:
            raise NotFoundError(f"no map {unknown[0]!r} from a subject of {world.name} onto atlas "
                                f"{world.atlas_name!r}; `atlas maps` lists them")
        on_world = [m for m in on_world if m.name in maps]
    else:
        for name, key in subjects.items():
            if not any(m.subject_model == name for m in on_world):
                on_world.append(_fit_default_map(store, world, key, quiet, device, dtype))

    truth = concept_ordinals(store, world)  # (K,) atlas ordinal of concept i
    rows = []
    for m in sorted(on_world, key=lambda m: (m.subject_model, m.method, m.name)):
        run = label_features(store, m.name, f"native:{size}:{seed}", k=5, name=f"{EVAL_RUN_PREFIX}{m.name}",
                             overwrite=True, quiet=quiet)
        got = np.full((run.n_features, 5), -1, dtype=np.int64)
        for fl in iter_labels(store, run.name):
            got[fl.feature, : len(fl.hits)] = [h.ordinal for h in fl.hits]
        t = truth[: run.n_features, None]
        rows.append(LabellingEvalRow(
            subject=m.subject_model, method=m.method, map=m.name, layer=m.subject_layer, n=run.n_features,
            top1=float(np.mean(got[:, 0] == t[:, 0])), top5=float(np.mean((got == t).any(axis=1))), run=run.name,
        ))
    return rows


def _fit_default_map(store: Store, world: Any, key: str, quiet: bool, device: str = "cpu", dtype: str = "float32"):
    from engine.align.fit import align_subject
    from engine.align.pairing import PairingConfig
    from engine.align.request import AlignRequest

    wm = getattr(world, key)
    # Validation texts come from the training documents: the world's held-out documents define the
    # ground-truth directions being scored, so no fit (nor its metrics) may see them.
    train, val = world_texts(world)
    request = AlignRequest(wm.name, world.atlas_name, train, val, Site((wm.default_layer,)), method="procrustes",
                           config=PairingConfig(device=device, dtype=dtype))
    return align_subject(store, request, quiet=quiet)
