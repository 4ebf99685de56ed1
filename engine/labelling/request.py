"""What a labelling run is asked for, and how it ranks: `LabelRequest`, `prepare_run` (which checks
the request against the map and the features and records the run), `Ranking` (criterion, atlas-side
statistic, confidence model) and the shipped confidence models.

The loop that carries a recorded run out, resumably, is `engine.labelling.run`, which also exports
these names (its module docstring says how criteria, confidence and labelled-only runs behave).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources
from typing import Any

import numpy as np

from engine.align.map import AlignmentMap, load_map
from engine.errors import AtlasError, BadValueError, NotFoundError
from engine.labelling.confidence import SIGNALS, ConfidenceModel, label_signals, mutual_nearest
from engine.labelling.criteria import (
    DEFAULT_CRITERION,
    DEFAULT_CSLS_K,
    AtlasStat,
    candidate_k,
    check_criterion,
    rerank,
)
from engine.labelling.sources import FeatureSource, open_feature_source
from engine.store.runs import LabellingRun
from engine.store.store import Store
from engine.util import MAX_NAME, check_k

DEFAULT_K = 5
DEFAULT_BATCH = 4096  # features per transaction: a few seconds of search on a 100k atlas


# ---------------------------------------------------------------------- ranking and confidence


@functools.lru_cache(maxsize=1)
def _default_models() -> dict[str, Any]:
    text = resources.files("engine.labelling").joinpath("confidence_default.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def default_confidence(key: str, labelled_only: bool = False) -> ConfidenceModel:
    """The shipped confidence model for ``key``: ``map.nn`` (score, margin: a run without the
    atlas-side statistic), ``map.stat`` (all four signals), ``activations`` (co-activation runs);
    with ``labelled_only`` its twin fitted on the labelled concepts' scores (``<key>.labelled``).
    Fitted on development worlds only; the file's ``meta`` says which."""
    key = f"{key}.labelled" if labelled_only else key
    models = _default_models()["models"]
    if key not in models:
        raise BadValueError(f"no default confidence model {key!r}; known: {', '.join(sorted(models))}")
    return ConfidenceModel.from_json(json.dumps(models[key]))


@dataclasses.dataclass(frozen=True)
class Ranking:
    """How a run turns a batch's cosine (or correlation) candidates into its rows: the criterion,
    the atlas-side statistic it needs (and the confidence reads, where present) and the confidence model."""

    criterion: str = DEFAULT_CRITERION
    csls_k: int = DEFAULT_CSLS_K
    stat: AtlasStat | None = None
    confidence: ConfidenceModel | None = None

    def candidates(self, k: int, n_atlas: int) -> int:
        """How many candidates a batch fetches: ``k`` for ``nn`` (2 at least where a confidence
        needs the margin), else `candidate_k`."""
        if self.criterion == "nn":
            return min(n_atlas, max(k, 2 if self.confidence is not None else 1))
        return candidate_k(k, n_atlas, self.csls_k)

    def rank(self, cand_scores: np.ndarray, cand_ids: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The rows of a batch from its candidates (b, k') in descending score: ``(scores (b, k),
        ids (b, k), confidence (b,) or None)``."""
        scores, ids = rerank(cand_scores, cand_ids, self.criterion, self.stat, k)
        if self.confidence is None:
            return scores, ids, None
        return scores, ids, self.confidence.predict(self.signals(cand_scores, cand_ids)[:, self._columns()])

    def signals(self, cand_scores: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
        """`label_signals` of the candidates' cosine ranking (as the default models were fitted):
        score and margin; the CSLS gap and mutual nearest neighbour where the run has the statistic."""
        s = np.asarray(cand_scores, dtype=np.float32)
        i = np.asarray(cand_ids, dtype=np.int64)
        if s.shape[1] < 2:  # a one-concept atlas: no runner-up
            s = np.concatenate([s, np.full_like(s[:, :1], np.nan)], 1)
            i = np.concatenate([i, np.full_like(i[:, :1], -1)], 1)
        csls = mutual = None
        if self.stat is not None:
            csls = rerank(s, i, "csls", self.stat, 2)[0]
            if self.stat.best is not None:
                mutual = mutual_nearest(i[:, 0], s[:, 0], self.stat.best)
        return label_signals(s[:, :2], i[:, :2], csls_scores=csls, mutual=mutual)

    def _columns(self) -> list[int]:
        assert self.confidence is not None
        return [SIGNALS.index(name) for name in self.confidence.signals]

    def params(self) -> dict[str, Any]:
        """What a run records of it (the statistic is a file of its own)."""
        return {"criterion": self.criterion, "csls_k": self.csls_k,
                "confidence": None if self.confidence is None else json.loads(self.confidence.to_json())}


def _confidence_model(criterion: str, confidence: ConfidenceModel | str | None, labelled_only: bool = False
                      ) -> ConfidenceModel | None:
    """The model a new map run records: ``"default"`` picks the shipped one for the criterion
    (``map.nn`` for nn, ``map.stat`` otherwise; their ``.labelled`` twins for a labelled-only
    run), ``"none"`` / None records none."""
    if confidence is None or confidence == "none":
        return None
    if isinstance(confidence, ConfidenceModel):
        return confidence
    if confidence != "default":
        raise BadValueError(f"confidence must be a ConfidenceModel, 'default' or 'none', got {confidence!r}")
    return default_confidence("map.nn" if criterion == "nn" else "map.stat", labelled_only)


# ---------------------------------------------------------------------- runs


def default_run_name(map_name: str, source: str, k: int) -> str:
    """``<map>.<source file stem>.k<k>``, the stem shortened so the name fits `check_name`'s limit."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", source.rstrip("/").replace("#", "-").rsplit("/", 1)[-1]).strip("._")
    tail = f".k{k}"
    room = MAX_NAME - len(map_name.encode("utf-8")) - 1 - len(tail)  # the stem is ASCII: chars are bytes
    stem = (stem or "features")[: max(room, 1)].rstrip(".") or "features"
    return f"{map_name}.{stem}{tail}"


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run just created, with the map and features it was checked against: `run_labelling` uses
    them instead of loading the map and opening the features again."""

    run: LabellingRun
    amap: AlignmentMap
    source: FeatureSource


@dataclasses.dataclass(frozen=True)
class LabelRequest:
    """What a labelling run is asked for: `atlas label`'s options, the Python API's keywords.

    ``features`` are labelled (see `engine.labelling.sources`) through map ``map_name``, top ``k``
    concepts each, ``batch_size`` features per committed batch, under run ``name`` (default
    `default_run_name`). ``criterion`` (``nn``, ``csls``, ``isf``) ranks the atlas concepts
    (``csls_k``: CSLS's neighbourhood); ``confidence`` is the `ConfidenceModel` each label's
    confidence comes from (``"default"``: the shipped one; ``"none"``: no confidence).
    ``match="activations"`` labels an SAE's latents by co-activation over ``corpus`` (``pairing``
    token / span, default the map's; ``max_pairs`` pairs at most; `engine.labelling.matching`)
    instead of through the map's directions. ``labelled_only`` ranks only the atlas concepts that
    carry a label (a hit on an unlabelled one names nothing); the run records which they were.
    """

    map_name: str
    features: str
    k: int = DEFAULT_K
    name: str | None = None
    batch_size: int = DEFAULT_BATCH
    key: str | None = None  # the matrix's key inside an .npz / .safetensors feature file
    site_check: bool = True
    overwrite: bool = False
    criterion: str = DEFAULT_CRITERION
    csls_k: int = DEFAULT_CSLS_K
    confidence: ConfidenceModel | str | None = "default"
    match: str = "map"
    corpus: str | None = None
    pairing: str | None = None
    max_pairs: int | None = None
    labelled_only: bool = False


def prepare_run(store: Store, request: LabelRequest) -> PreparedRun:
    """Record a new run of ``request`` (a `LabelRequest`).

    The features' width must be the map's subject width; where the source records its site
    (SAELens ``cfg.json``) the model and layer must be the map's too, unless ``site_check=False``.
    """
    r = request
    map_name, features, k, name, batch_size = r.map_name, r.features, r.k, r.name, r.batch_size
    criterion, csls_k, confidence, match = r.criterion, r.csls_k, r.confidence, r.match
    corpus, pairing, max_pairs, site_check = r.corpus, r.pairing, r.max_pairs, r.site_check

    check_k(k)
    check_criterion(criterion)
    if batch_size < 1:
        raise AtlasError(f"--batch must be >= 1, got {batch_size}")
    if not isinstance(csls_k, int) or csls_k < 1:
        raise BadValueError(f"--csls-k must be a whole number >= 1, got {csls_k!r}")
    if match != "map":  # activation matching (engine.labelling.matching) needs torch: a map run never loads it
        from engine.labelling.matching import check_match

        check_match(match)
    if match == "activations" and confidence == "default":
        confidence = default_confidence("activations", r.labelled_only)
    ranking = Ranking(criterion, csls_k, None, _confidence_model(criterion, confidence, r.labelled_only))
    amap = load_map(store, map_name)
    source = open_feature_source(features, key=r.key, store=store, amap=amap)
    check_source_site(store, amap, source, site_check)
    extra: dict[str, Any] = {}
    if match == "activations":
        from engine.labelling.matching import match_spec

        extra["match"] = match_spec(amap, source, corpus, pairing, max_pairs).params()
    elif corpus is not None or pairing is not None or max_pairs is not None:
        raise BadValueError("--corpus, --pairing and --max-pairs apply to --match activations only")
    info = store.atlas(amap.atlas)
    n_concepts = info.n_concepts
    if r.labelled_only:
        if not info.n_labelled:
            raise BadValueError(f"--labelled-only: atlas {info.name!r} has no labelled concepts")
        n_concepts = info.n_labelled
        extra["labelled_only"] = True
    run = store.add_run(
        name or default_run_name(map_name if match == "map" else f"{map_name}.act", source.spec, k), map_name,
        feature_source=source.spec, fingerprint=source.fingerprint, n_features=source.n_features,
        k=min(k, n_concepts), batch_size=batch_size,
        params={"source_kind": source.kind, "site_check": site_check, "k_requested": k, "method": match,
                **ranking.params(), **extra}, overwrite=r.overwrite,
    )
    return PreparedRun(run, amap, source)


def create_run(store: Store, map_name: str, features: str, **options: Any) -> LabellingRun:
    """`prepare_run` of ``LabelRequest(map_name, features, **options)``, for the run only."""
    return prepare_run(store, LabelRequest(map_name, features, **options)).run


def check_source_site(store: Store, amap: AlignmentMap, source: FeatureSource, site_check: bool = True) -> None:
    """Width always; model, layer and hook where the source records them (and ``site_check``)."""
    model = source.model
    if model is not None:
        known: set[str | None] = {amap.subject_model}
        try:
            known.add(store.get_model(amap.subject_model).source)
        except NotFoundError:
            pass
        model = None if model in known else model
    if site_check:
        amap.check_site(model, source.layer, source.dim, source.hook)
    else:
        amap.check_site(None, None, source.dim, None)

