"""Registered models: the ``models`` rows (subjects of maps, models of atlases).

A model row records where to load the model from (``source``: a path or hub id), its revision,
architecture, width, depth and tokenizer fingerprint. Atlases and maps point at their model's
row; `get_or_create_model` gives them one when the model is not registered yet.

Sources are recorded so that a store works from any folder and after it is copied or moved
(docs/design.md §3): ``source_kind`` says how to read ``source``: ``store`` (a path relative to the
store root, for a folder inside the store), ``path`` (an absolute path outside it) or ``hub`` (a hub
id). `ModelInfo.source` is always the resolved form: an absolute path, or the hub id.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import AtlasError, NotFoundError
from engine.store.base import StoreBase
from engine.store.schema import AlignmentMapRow, AtlasRow, ModelRow

SOURCE_KINDS = ("store", "path", "hub")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str | None
    revision: str | None
    architecture: str | None
    d_model: int | None
    n_layers: int | None
    tokenizer_fingerprint: str | None
    source_kind: str | None = None  # store | path | hub (None: no source recorded)
    kind: str | None = None  # causal | encoder, as registered
    layer_module: str | None = None  # the block list's attribute path, when named by hand

    @property
    def recorded_path(self) -> Path | None:
        """The folder the model loads from, or None for a hub id or no source."""
        return Path(self.source) if self.source and self.source_kind in ("store", "path") else None


class ModelInUseError(AtlasError):
    """A model that atlases or maps still point at cannot be removed."""


def looks_like_path(source: str) -> bool:
    """A source names a local folder (not a hub id) when it exists, is absolute, or starts with ``.``/``~``."""
    return os.path.isabs(source) or source.startswith((".", "~")) or Path(source).expanduser().exists()


def record_source(source: str, root: Path) -> tuple[str, str]:
    """``(recorded source, source_kind)`` of a path or hub id for a store at ``root``: a folder inside
    the store relative to its root, any other folder absolute, a hub id as given."""
    if not looks_like_path(source):
        return source, "hub"
    p = Path(source).expanduser().resolve()
    try:
        return p.relative_to(Path(root).resolve()).as_posix(), "store"
    except ValueError:
        return str(p), "path"


def resolve_source(recorded: str | None, source_kind: str | None, root: Path) -> str | None:
    """The loadable form of a recorded source: store-relative paths joined to the store root."""
    if not recorded:
        return recorded
    if source_kind == "store":
        return str(Path(root).resolve() / recorded)
    return recorded


class ModelsMixin(StoreBase):
    """Store methods over the ``models`` table."""

    def add_model(
        self,
        name: str,
        source: str | None = None,
        architecture: str | None = None,
        d_model: int | None = None,
        n_layers: int | None = None,
        revision: str | None = None,
        tokenizer_fingerprint: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ModelInfo:
        """Register a model, or update the fields given for one already registered.

        ``source`` is a folder or a hub id; a folder inside the store is recorded relative to the
        store root, any other folder as an absolute path (`record_source`).
        """
        with self.session() as s:
            row = get_or_create_model(s, name)
            if source is not None:
                row.source, row.source_kind = record_source(source, self.path)
            for key, value in dict(
                architecture=architecture, d_model=d_model, n_layers=n_layers,
                revision=revision, tokenizer_fingerprint=tokenizer_fingerprint,
            ).items():
                if value is not None:
                    setattr(row, key, value)
            if extra:
                row.extra = {**(row.extra or {}), **extra}
            s.flush()
            return self._info(row)

    def get_model(self, name: str) -> ModelInfo:
        with self.session() as s:
            return self._info(self._model_row(s, name))

    def model_users(self, name: str) -> dict[str, list[str]]:
        """The atlases whose site is in model ``name`` and the maps whose subject it is."""
        with self.session() as s:
            row = self._model_row(s, name)
            atlases = s.scalars(select(AtlasRow.name).where(AtlasRow.model_id == row.id).order_by(AtlasRow.name))
            maps = s.scalars(select(AlignmentMapRow.name).where(AlignmentMapRow.subject_model_id == row.id)
                             .order_by(AlignmentMapRow.name))
            return {"atlases": list(atlases), "maps": list(maps)}

    def remove_model(self, name: str) -> None:
        """Forget a registered model (its row only: the weights are the user's). Refused while an
        atlas or a map uses it (`ModelInUseError` naming them)."""
        users = self.model_users(name)
        if users["atlases"] or users["maps"]:
            what = "; ".join(f"{k} {', '.join(v)}" for k, v in users.items() if v)
            hint = f"`atlas map remove {users['maps'][0]}`" if users["maps"] else "removing the atlas"
            raise ModelInUseError(f"model {name!r} is used by {what}; remove those first (e.g. {hint})")
        with self.session() as s:
            s.delete(self._model_row(s, name))

    def model_extra(self, name: str) -> dict[str, Any]:
        """The ``extra`` JSON of a registered model (e.g. ``kind``), empty when none or unknown."""
        with self.session() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            return dict(row.extra or {}) if row is not None else {}

    def models(self) -> list[ModelInfo]:
        with self.session() as s:
            return [self._info(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.name))]

    def _model_row(self, s: Session, name: str) -> ModelRow:
        row = s.scalar(select(ModelRow).where(ModelRow.name == name))
        if row is None:
            raise NotFoundError(
                f"no model named {name!r}; `atlas models` lists them, `atlas models add {name} --source PATH|HUB_ID` "
                "registers one"
            )
        return row

    def _info(self, row: ModelRow) -> ModelInfo:
        extra = row.extra or {}
        return ModelInfo(
            row.name, resolve_source(row.source, row.source_kind, self.path), row.revision, row.architecture,
            row.d_model, row.n_layers, row.tokenizer_fingerprint, row.source_kind if row.source else None,
            extra.get("kind"), extra.get("layer_module"),
        )


def get_or_create_model(s: Session, name: str) -> ModelRow:
    """The row of model ``name`` in session ``s``, added (with only its name) if missing."""
    row = s.scalar(select(ModelRow).where(ModelRow.name == name))
    if row is None:
        row = ModelRow(name=name, extra={})
        s.add(row)
        s.flush()
    return row
