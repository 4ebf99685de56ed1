"""Registered models: the ``models`` rows (subjects of maps, models of atlases).

A model row records where to load the model from (``source``: a path or hub id), its revision,
architecture, width, depth and tokenizer fingerprint. Atlases and maps point at their model's
row; `get_or_create_model` gives them one when the model is not registered yet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import NotFoundError
from engine.store.base import StoreBase
from engine.store.schema import ModelRow


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str | None
    revision: str | None
    architecture: str | None
    d_model: int | None
    n_layers: int | None
    tokenizer_fingerprint: str | None


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
        """Register a model, or update the fields given for one already registered."""
        with self.session() as s:
            row = get_or_create_model(s, name)
            for key, value in dict(
                source=source, architecture=architecture, d_model=d_model, n_layers=n_layers,
                revision=revision, tokenizer_fingerprint=tokenizer_fingerprint,
            ).items():
                if value is not None:
                    setattr(row, key, value)
            if extra:
                row.extra = {**(row.extra or {}), **extra}
            s.flush()
            return _model_info(row)

    def get_model(self, name: str) -> ModelInfo:
        with self.session() as s:
            return _model_info(self._model_row(s, name))

    def model_extra(self, name: str) -> dict[str, Any]:
        """The ``extra`` JSON of a registered model (e.g. ``kind``), empty when none or unknown."""
        with self.session() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            return dict(row.extra or {}) if row is not None else {}

    def models(self) -> list[ModelInfo]:
        with self.session() as s:
            return [_model_info(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.name))]

    def _model_row(self, s: Session, name: str) -> ModelRow:
        row = s.scalar(select(ModelRow).where(ModelRow.name == name))
        if row is None:
            raise NotFoundError(f"no model named {name!r}; `atlas models` lists them")
        return row


def get_or_create_model(s: Session, name: str) -> ModelRow:
    """The row of model ``name`` in session ``s``, added (with only its name) if missing."""
    row = s.scalar(select(ModelRow).where(ModelRow.name == name))
    if row is None:
        row = ModelRow(name=name, extra={})
        s.add(row)
        s.flush()
    return row


def _model_info(row: ModelRow) -> ModelInfo:
    return ModelInfo(
        row.name, row.source, row.revision, row.architecture, row.d_model, row.n_layers,
        row.tokenizer_fingerprint,
    )
