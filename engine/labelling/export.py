"""Reading a labelling run back: labels feature by feature, and exports (JSONL, CSV, Neuronpedia).

Exports carry, per feature, the margin between the top two scores: a transferred label whose
runner-up scores almost as high is a guess, one far ahead is a confident match. Rows are streamed
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

from engine.errors import AtlasError, BadValueError
from engine.registry import Registry
from engine.store.store import Hit, LabellingRun, Store


@dataclasses.dataclass(frozen=True)
class FeatureLabels:
    """The hits of one feature, with the margin between its top two scores (a confidence signal)."""

    feature: int
    hits: list[Hit]

    @property
    def margin(self) -> float | None:
        return self.hits[0].score - self.hits[1].score if len(self.hits) > 1 else None


def iter_labels(store: Store, name: str, *, chunk: int = 20_000) -> Iterator[FeatureLabels]:
    """The labels of a run, feature by feature in order (streamed from the database)."""
    run = store.run(name)
    current: int | None = None
    hits: list[Hit] = []
    for lo in range(0, run.n_done, chunk):  # keyset chunks: bounded memory and no long read cursor
        rows = store.run_label_rows(name, lo, lo + chunk)
        for f, rank, score, ordinal, label, labelled in rows:
            if f != current:
                if current is not None:
                    yield FeatureLabels(current, hits)
                current, hits = f, []
            hits.append(Hit(f"{run.atlas}/{ordinal}", run.atlas, ordinal, label, float(score), rank, labelled))
    if current is not None:
        yield FeatureLabels(current, hits)


def label_page(store: Store, name: str, order: str = "feature", *, descending: bool = False, offset: int = 0,
               limit: int = 100) -> list[FeatureLabels]:
    """One page of a run's features with their hits, ordered by feature, top score or margin
    (`Store.run_label_page`): what a browser pages through without loading the run."""
    run = store.run(name)
    out: list[FeatureLabels] = []
    for f, rank, score, ordinal, label, labelled in store.run_label_page(
            name, order, descending=descending, offset=offset, limit=limit):
        if not out or out[-1].feature != f:
            out.append(FeatureLabels(f, []))
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


def export_run(store: Store, name: str, out: TextIO, fmt: ExportFormat = "jsonl", *, partial: bool = False) -> int:
    """Write a run's labels to ``out`` in a registered format; returns the number of features written.

    An unfinished run is refused unless ``partial`` (then its finished prefix is written).
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
    m = store.map_info(run.map)
    ctx = ExportContext(run, m.subject_model, m.subject_layer, m.subject_hook)
    return writer(ctx, iter_labels(store, name), out)


@register_label_format("jsonl")
def _jsonl(ctx: ExportContext, features: Iterable[FeatureLabels], out: TextIO) -> int:
    """One object per feature: top label, concept, score, margin, and all hits."""
    n = 0
    for fl in features:
        top = fl.hits[0]
        out.write(json.dumps({
            "feature": fl.feature, "label": top.label, "concept": top.ref, "score": top.score, "margin": fl.margin,
            "hits": [{"rank": h.rank, "concept": h.ref, "label": h.label, "score": h.score} for h in fl.hits],
        }, ensure_ascii=False) + "\n")
        n += 1
    return n


@register_label_format("csv")
def _csv(ctx: ExportContext, features: Iterable[FeatureLabels], out: TextIO) -> int:
    """One row per (feature, rank), with the feature's margin on each row."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["feature", "rank", "concept", "label", "score", "margin"])
    n = 0
    for fl in features:
        margin = "" if fl.margin is None else repr(fl.margin)
        for h in fl.hits:
            writer.writerow([fl.feature, h.rank, h.ref, h.label, repr(h.score), margin])
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
            "modelId": ctx.subject_model, "layer": layer, "index": str(fl.feature), "description": top.label,
            "explanationModelName": f"concept-atlas:{ctx.run.map}", "typeName": "concept-atlas-transfer",
            "score": top.score, "concept": top.ref, "margin": fl.margin,
        }, ensure_ascii=False) + "\n")
        n += 1
    return n
