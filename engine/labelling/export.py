"""Reading a labelling run back: labels feature by feature, and exports as JSONL or CSV.

Exports carry, per feature, the margin between the top two scores: a transferred label whose
runner-up scores almost as high is a guess, one far ahead is a confident match. Rows are streamed
from the database (`Store.run_label_rows`) in keyset chunks of features, so exporting a
million-feature run holds one chunk in memory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from typing import Literal, TextIO

from engine.errors import AtlasError
from engine.store.store import Hit, Store

ExportFormat = Literal["jsonl", "csv"]
EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "csv")


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


def export_run(store: Store, name: str, out: TextIO, fmt: ExportFormat = "jsonl", *, partial: bool = False) -> int:
    """Write a run's labels to ``out``; returns the number of features written.

    JSONL: one object per feature (top label, score, margin, and all hits). CSV: one row per
    (feature, rank) with the feature's margin on each row. An unfinished run is refused unless
    ``partial`` (then its finished prefix is written).
    """
    if fmt not in EXPORT_FORMATS:
        raise AtlasError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    run = store.run(name)
    if run.status != "done" and not partial:
        raise AtlasError(
            f"run {name!r} is {run.status} at {run.n_done}/{run.n_features} features; "
            f"`atlas label --resume {name}` finishes it, or pass --partial to export what is done"
        )
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer:
        writer.writerow(["feature", "rank", "concept", "label", "score", "margin"])
    n = 0
    for fl in iter_labels(store, name):
        margin = fl.margin
        if writer:
            for h in fl.hits:
                writer.writerow([fl.feature, h.rank, h.ref, h.label, repr(h.score),
                                 "" if margin is None else repr(margin)])
        else:
            top = fl.hits[0]
            out.write(json.dumps({
                "feature": fl.feature, "label": top.label, "concept": top.ref, "score": top.score,
                "margin": margin,
                "hits": [{"rank": h.rank, "concept": h.ref, "label": h.label, "score": h.score} for h in fl.hits],
            }, ensure_ascii=False) + "\n")
        n += 1
    return n
