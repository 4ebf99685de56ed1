"""Label files for an atlas: CSV, JSONL, and Neuronpedia explanation exports (JSONL[.gz]).

A reader returns plain data (`LabelTable`); a malformed file raises `FormatError` naming the
file, the line and what was wrong, and labels that do not fit the atlas raise `ShapeError`.
Nothing else escapes, whatever the bytes; CSV fields may be as long as JSONL values (a
description of megabytes reads the same from either).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import zlib
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


# CSV fields as long as JSONL values: csv's default limit (128 KiB) refuses long descriptions.
CSV_FIELD_LIMIT = 2**31 - 1


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first header name
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _index_of(value: Any, path: Path, where: str) -> int:
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and text.isascii() and text.lstrip("-").isdigit() and len(text) < 30:
        return int(text)
    raise FormatError.at(path, f"{where}: index {str(value)[:40]!r} is not an integer")


def _text(value: Any, path: Path, where: str, what: str) -> str | None:
    """A label or description: a string (numbers are written as strings), valid UTF-8."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FormatError.at(path, f"{where}: {what} must be a string, got {type(value).__name__}")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError.at(path, f"{where}: {what} is not valid Unicode (a lone surrogate)") from None
    return text


def read_labels(path: str | Path) -> LabelTable:
    """Labels from CSV (``index,label,description``), JSONL, or a Neuronpedia export (JSONL[.gz]).

    Neuronpedia rows carry ``index`` and ``description`` (the explanation); the description is the
    label. Where a feature has several explanations (JSONL), the first is kept; a CSV with an index
    twice is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such label file")
    labels: dict[int, str] = {}
    descriptions: dict[int, str] = {}
    name = path.name.lower()
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with _open_text(path) as f:
            if name.endswith((".csv", ".csv.gz")):
                reader = csv.DictReader(f)
                if not reader.fieldnames or "index" not in reader.fieldnames:
                    raise FormatError.at(path, "a label CSV needs a header with index,label[,description]")
                if "label" not in reader.fieldnames and "description" not in reader.fieldnames:
                    raise FormatError.at(path, "a label CSV needs a label or description column")
                first_line: dict[int, int] = {}
                for row in reader:
                    where = f"line {reader.line_num}"
                    i = _index_of(row.get("index"), path, where)
                    if i in first_line:  # a CSV is one row per feature: a second one is a mistake, not an alternative
                        raise FormatError.at(path, f"{where}: index {i} appears twice (first on line {first_line[i]}); "
                                                   "a label CSV has one row per feature")
                    first_line[i] = reader.line_num
                    _add_label(labels, descriptions, i,
                               _text(row.get("label"), path, where, "label"),
                               _text(row.get("description"), path, where, "description"))
            elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FormatError.at(path, f"line {lineno}: not valid JSON ({e.msg})") from None
                    except (ValueError, RecursionError) as e:  # e.g. a number of 5,000 digits, deep nesting
                        raise FormatError.at(path, f"line {lineno}: not valid JSON ({str(e)[:80]})") from None
                    if not isinstance(row, dict) or "index" not in row:
                        raise FormatError.at(path, f"line {lineno}: each row needs an 'index' (and 'label' or 'description')")
                    where = f"line {lineno}"
                    _add_label(labels, descriptions, _index_of(row["index"], path, where),
                               _text(row.get("label"), path, where, "label"),
                               _text(row.get("description") or row.get("explanation"), path, where, "description"))
            else:
                raise FormatError.at(path, "unknown label format; use .csv, .jsonl or .jsonl.gz")
    except csv.Error as e:
        raise FormatError.at(path, f"not a readable CSV file ({str(e)[:120]})") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        raise FormatError.at(path, f"cannot be read ({str(e)[:120]})") from None
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
