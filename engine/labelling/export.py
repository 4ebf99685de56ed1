"""Reading a labelling run back: labels feature by feature, and exports (JSONL, CSV, Neuronpedia).

Exports carry, per feature, the margin between the top two scores (a transferred label whose
runner-up scores almost as high is a guess, one far ahead is a confident match) and the label's
confidence, the probability that its first hit is right (`engine.labelling.confidence`; None for
runs written before labels had one). With ``min_confidence`` a feature below it is written as an
explicit `NO_MATCH` (label ``"no match"``, no concept, its hits kept for reference), never dropped. Rows are streamed
from the database (`Store.run_label_rows`) in keyset chunks of features, so exporting a
million-feature run holds one chunk in memory. Formats are writers in a registry
(`register_label_format`), so another tool's shape is one function.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import numpy as np

from engine.errors import AtlasError, BadValueError
from engine.labelling.confidence import NO_MATCH, threshold_rows
from engine.registry import Registry
from engine.store.store import Hit, LabellingRun, Store


@dataclasses.dataclass(frozen=True)
class FeatureLabels:
    """The hits of one feature, with the margin between its top two scores (a confidence signal)."""

    feature: int
    hits: list[Hit]
    confidence: float | None = None  # the probability that the first hit is right (None: not recorded)
    matched: bool = True  # False: below the reader's --min-confidence, shown as NO_MATCH

    @property
    def margin(self) -> float | None:
        return self.hits[0].score - self.hits[1].score if len(self.hits) > 1 else None

    @property
    def label(self) -> str:
        """The first hit's label, or `NO_MATCH` below the threshold."""
        return self.hits[0].label if self.matched else NO_MATCH

    @property
    def concept(self) -> str | None:
        return self.hits[0].ref if self.matched else None


def apply_threshold(features: Iterable[FeatureLabels], min_confidence: float | None) -> Iterator[FeatureLabels]:
    """The features with ``matched`` set by ``min_confidence`` (None: all match). A feature without
    a recorded confidence cannot pass a threshold: it reads as no match."""
    if min_confidence is not None:
        threshold_rows(np.zeros(0), min_confidence)  # checks the range
    for fl in features:
        if min_confidence is None:
            yield fl
        else:
            ok = fl.confidence is not None and bool(threshold_rows(np.array([fl.confidence]), min_confidence)[0])
            yield dataclasses.replace(fl, matched=ok)


def check_confidence_recorded(run: LabellingRun, min_confidence: float | None) -> None:
    """A threshold on a run that recorded no confidence is refused (every row would be no match)."""
    if min_confidence is not None and not run.params.get("confidence"):
        raise BadValueError(f"run {run.name!r} records no label confidence (it was labelled before labels "
                            f"had one); relabel it (`atlas label ... --overwrite --name {run.name}`) or drop "
                            "--min-confidence")


def iter_labels(store: Store, name: str, *, chunk: int = 20_000) -> Iterator[FeatureLabels]:
    """The labels of a run, feature by feature in order (streamed from the database)."""
    run = store.run(name)
    current: int | None = None
    hits: list[Hit] = []
    conf: float | None = None
    for lo in range(0, run.n_done, chunk):  # keyset chunks: bounded memory and no long read cursor
        rows = store.run_label_rows(name, lo, lo + chunk)
        for f, rank, score, ordinal, label, labelled, confidence in rows:
            if f != current:
                if current is not None:
                    yield FeatureLabels(current, hits, conf)
                current, hits, conf = f, [], None
            if rank == 1 and confidence is not None:
                conf = float(confidence)
            hits.append(Hit(f"{run.atlas}/{ordinal}", run.atlas, ordinal, label, float(score), rank, labelled))
    if current is not None:
        yield FeatureLabels(current, hits, conf)


def label_page(store: Store, name: str, order: str = "feature", *, descending: bool = False, offset: int = 0,
               limit: int = 100) -> list[FeatureLabels]:
    """One page of a run's features with their hits and confidence, ordered by feature, top score,
    margin or confidence (`Store.run_label_page`): what a browser pages through without loading the run."""
    run = store.run(name)
    out: list[FeatureLabels] = []
    for f, rank, score, ordinal, label, labelled, confidence in store.run_label_page(
            name, order, descending=descending, offset=offset, limit=limit):
        if not out or out[-1].feature != f:
            out.append(FeatureLabels(f, [], None))
        if rank == 1 and confidence is not None:
            out[-1] = dataclasses.replace(out[-1], confidence=float(confidence))
        out[-1].hits.append(Hit(f"{run.atlas}/{ordinal}", run.atlas, ordinal, label, float(score), rank, labelled))
    return out


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What a writer may name besides the labels: the run and its map's subject site."""

    run: LabellingRun
    subject_model: str
    subject_layer: int
    subject_hook: str


LabelWriter = Callable[[ExportContext, Iterable[FeatureLabels], TextIO], int]
EXPORT_FORMATS: Registry[LabelWriter] = Registry("label export format")
ExportFormat = str  # a name in EXPORT_FORMATS: jsonl, csv, neuronpedia, or one registered


def register_label_format(name: str) -> Callable[[LabelWriter], LabelWriter]:
    """Register ``writer(context, features, out) -> n_features`` as export format ``name`` (once)."""
    return EXPORT_FORMATS.register(name)


def export_run(store: Store, name: str, out: TextIO, fmt: ExportFormat = "jsonl", *, partial: bool = False,
               min_confidence: float | None = None) -> int:
    """Write a run's labels to ``out`` in a registered format; returns the number of features written.

    An unfinished run is refused unless ``partial`` (then its finished prefix is written). With
    ``min_confidence`` every feature is still written, those below it as `NO_MATCH`.
    """
    writer = EXPORT_FORMATS.get(fmt)
    if writer is None:
        raise BadValueError(f"unknown export format {fmt!r}; use one of {', '.join(sorted(EXPORT_FORMATS))}")
    run = store.run(name)
    if run.status != "done" and not partial:
        raise AtlasError(
            f"run {name!r} is {run.status} at {run.n_done}/{run.n_features} features; "
            f"`atlas label --resume {name}` finishes it, or pass --partial to export what is done"
        )
    check_confidence_recorded(run, min_confidence)
    m = store.map_info(run.map)
    ctx = ExportContext(run, m.subject_model, m.subject_layer, m.subject_hook)
    return writer(ctx, apply_threshold(iter_labels(store, name), min_confidence), out)


@register_label_format("jsonl")
def _jsonl(ctx: ExportContext, features: Iterable[FeatureLabels], out: TextIO) -> int:
    """One object per feature: top label, concept, score, margin, confidence, and all hits."""
    n = 0
    for fl in features:
        top = fl.hits[0]
        out.write(json.dumps({
            "feature": fl.feature, "label": fl.label, "concept": fl.concept, "score": top.score, "margin": fl.margin,
            "confidence": fl.confidence, "hits": [{"rank": h.rank, "concept": h.ref, "label": h.label, "score": h.score} for h in fl.hits],
        }, ensure_ascii=False) + "\n")
        n += 1
    return n


@register_label_format("csv")
def _csv(ctx: ExportContext, features: Iterable[FeatureLabels], out: TextIO) -> int:
    """One row per (feature, rank), with the feature's margin and confidence on each row; a feature
    below --min-confidence is one row of rank 0 labelled `NO_MATCH` (its confidence, no concept)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["feature", "rank", "concept", "label", "score", "margin", "confidence"])
    n = 0
    for fl in features:
        margin = "" if fl.margin is None else repr(fl.margin)
        conf = "" if fl.confidence is None else repr(fl.confidence)
        if not fl.matched:
            writer.writerow([fl.feature, 0, "", NO_MATCH, "", margin, conf])
        for h in fl.hits if fl.matched else ():
            writer.writerow([fl.feature, h.rank, h.ref, h.label, repr(h.score), margin, conf])
        n += 1
    return n


@register_label_format("neuronpedia")
def _neuronpedia(ctx: ExportContext, features: Iterable[FeatureLabels], out: TextIO) -> int:
    """Rows shaped like a Neuronpedia explanations export, one per feature with its top label:
    ``modelId`` (the subject model), ``layer`` (``<subject layer>-<run>``, where Neuronpedia names
    the SAE), ``index`` (the feature), ``description`` (the label), ``explanationModelName``
    (``concept-atlas:<map>``), ``score`` (the cosine), ``typeName``. The atlas's own Neuronpedia
    importer (`engine.atlas.labels.read_labels`) reads them back."""
    n = 0
    layer = f"{ctx.subject_layer}-{ctx.run.name}"
    for fl in features:
        top = fl.hits[0]
        out.write(json.dumps({
            "modelId": ctx.subject_model, "layer": layer, "index": str(fl.feature), "description": fl.label,
            "explanationModelName": f"concept-atlas:{ctx.run.map}", "typeName": "concept-atlas-transfer",
            "score": top.score, "concept": fl.concept, "margin": fl.margin, "confidence": fl.confidence,
        }, ensure_ascii=False) + "\n")
        n += 1
    return n
