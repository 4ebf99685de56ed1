"""Label files for an atlas: CSV, JSONL, and Neuronpedia explanation exports (JSONL[.gz]).

A reader returns plain data (`LabelTable`); a malformed file raises `FormatError` naming the
file, the line and what was wrong, and labels that do not fit the atlas raise `ShapeError`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from pathlib import Path
from typing import Any

from engine.errors import FormatError, ShapeError


@dataclasses.dataclass
class LabelTable:
    """Labels by feature index; indices without a row stay unlabelled."""

    labels: dict[int, str]
    descriptions: dict[int, str]
    source: str

    def for_n(self, n: int) -> tuple[list[str | None], list[str | None]]:
        bad = [i for i in self.labels if not 0 <= i < n]
        if bad:
            raise ShapeError(
                f"{self.source} labels feature index {max(bad)} but the atlas has {n} vectors "
                f"(indices 0..{n - 1}): labels and vectors do not match"
            )
        return [self.labels.get(i) for i in range(n)], [self.descriptions.get(i) for i in range(n)]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _index_of(value: Any, path: Path, where: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise FormatError.at(path, f"{where}: index {value!r} is not an integer") from None


def read_labels(path: str | Path) -> LabelTable:
    """Labels from CSV (``index,label,description``), JSONL, or a Neuronpedia export (JSONL[.gz]).

    Neuronpedia rows carry ``index`` and ``description`` (the explanation); the description is the
    label. Where a feature has several explanations, the first is kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such label file")
    labels: dict[int, str] = {}
    descriptions: dict[int, str] = {}
    name = path.name.lower()
    try:
        with _open_text(path) as f:
            if name.endswith((".csv", ".csv.gz")):
                reader = csv.DictReader(f)
                if not reader.fieldnames or "index" not in reader.fieldnames:
                    raise FormatError.at(path, "a label CSV needs a header with index,label[,description]")
                if "label" not in reader.fieldnames and "description" not in reader.fieldnames:
                    raise FormatError.at(path, "a label CSV needs a label or description column")
                for lineno, row in enumerate(reader, start=2):
                    _add_label(labels, descriptions, _index_of(row.get("index"), path, f"line {lineno}"),
                               row.get("label"), row.get("description"))
            elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FormatError.at(path, f"line {lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict) or "index" not in row:
                        raise FormatError.at(path, f"line {lineno}: each row needs an 'index' (and 'label' or 'description')")
                    _add_label(labels, descriptions, _index_of(row["index"], path, f"line {lineno}"),
                               row.get("label"), row.get("description") or row.get("explanation"))
            else:
                raise FormatError.at(path, "unknown label format; use .csv, .jsonl or .jsonl.gz")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise FormatError.at(path, f"cannot be read ({e})") from None
    return LabelTable(labels, descriptions, str(path))


def _add_label(labels: dict[int, str], descriptions: dict[int, str], i: int, label: Any, description: Any) -> None:
    if i in labels:  # keep the first explanation of a feature
        return
    label = (str(label).strip() if label else "") or (str(description).strip() if description else "")
    if not label:
        return
    labels[i] = label
    if description:
        descriptions[i] = str(description).strip()
