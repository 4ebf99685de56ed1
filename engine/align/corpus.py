"""Corpora for alignment: reading a corpus file, the held-out split, and the corpus fingerprint.

Held-out texts are chosen by a hash of the text, not its position, so the split is stable when a
corpus is reordered or appended to; a map records the fingerprint of the texts it was fitted on (`engine.util.corpus_fingerprint`).

A plug-in may offer a built-in corpus with its own models and atlas (ConceptWorld: ``atlas align
--world``) by registering a provider in `BUILTIN_CORPORA`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import FormatError
from engine.registry import Registry

if TYPE_CHECKING:
    from engine.store.store import Store


@dataclass(frozen=True)
class BuiltinCorpus:
    """A plug-in's corpus in a store: training and held-out texts, the atlas they align to by
    default, and short names of its subject models (``{"a": "<model name>"}``)."""

    texts: list[str]
    heldout: list[str]
    atlas: str
    subjects: Mapping[str, str] = field(default_factory=dict)


# provider(store, size, seed) -> the corpus, its models and atlas registered in the store
CorpusProvider = Callable[["Store", str, int], BuiltinCorpus]
BUILTIN_CORPORA: Registry[CorpusProvider] = Registry("built-in corpus")

HELDOUT_FRACTION = 0.1  # share of a corpus file's texts held out (by a hash of the text, not its position)


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a corpus file: JSONL with a ``text`` field, or one document per non-empty line
    (a leading ``<number><TAB>``, as in ConceptWorld's document files, is dropped)."""
    import json

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read corpus {p}: {e}") from None
    texts = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise FormatError(f"{p}:{i}: expected a JSON object with a 'text' field") from None
            continue
        head, tab, rest = line.partition("\t")
        texts.append(rest if tab and head.strip().isdigit() else line)
    if not texts:
        raise FormatError(f"corpus {p} has no texts")
    return texts


def read_labelled_corpus(path: str | Path) -> tuple[list[str], list[str], dict[str, str]]:
    """``(texts, labels, descriptions)`` of a labelled corpus: JSONL rows with ``text`` and ``label``
    (and optionally ``description``, kept per label), or TSV lines ``label<TAB>text``."""
    import json

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read labelled corpus {p}: {e}") from None
    texts: list[str] = []
    labels: list[str] = []
    descriptions: dict[str, str] = {}
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
                text, label = str(row["text"]), str(row["label"])
            except (ValueError, KeyError, TypeError):
                raise FormatError(f"{p}:{i}: expected a JSON object with 'text' and 'label' fields") from None
            if row.get("description"):
                descriptions.setdefault(label, str(row["description"]))
        else:
            label, tab, text = line.partition("\t")
            if not tab:
                raise FormatError(f"{p}:{i}: expected 'label<TAB>text' (or use a .jsonl file)")
        texts.append(text)
        labels.append(label.strip())
    if not texts:
        raise FormatError(f"labelled corpus {p} has no texts")
    return texts, labels, descriptions


def split_heldout(texts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train, held-out): a text is held out when a hash of it falls in ``fraction`` (stable under
    reordering and appending). At least one text lands on each side when there are two."""
    cut = int(fraction * 2**32)
    train: list[str] = []
    held: list[str] = []
    for t in texts:
        h = int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:4], "little")
        (held if h < cut else train).append(t)
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train and len(held) > 1:
        train.append(held.pop())
    return train, held


