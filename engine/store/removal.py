"""Removing an atlas or a map, and what depends on them (`RemovalMixin`).

One path for both: what depends on the atlas or the map (maps on the atlas, labelling runs on the
maps, their label rows) is read and, unless asked to cascade, a removal that would take it along
is refused with `InUseError` naming it. Rows are deleted child tables first, one set-based
statement per table, in one transaction; the files (vectors, index, label index, map files) are
removed after the commit, so a crash leaves the rows (and all files) or no rows (and unclaimed
files, which `Store.gc` removes). A Milvus collection is dropped after the commit too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from engine.errors import InUseError
from engine.store import layout
from engine.store.atlases import AtlasesMixin, row_location
from engine.store.maps import MapsMixin
from engine.store.schema import AlignmentMapRow, AtlasRow, ConceptRow, FeatureLabelRow, LabelRunRow
from engine.util import failpoint


@dataclasses.dataclass(frozen=True)
class Dependents:
    """What depends on an atlas or a map: maps, labelling runs, their label rows, and the map files."""

    maps: list[str]
    runs: list[str]
    n_labels: int
    files: list[str]

    def describe(self) -> str:
        parts = []
        if self.maps:
            parts.append(f"{len(self.maps)} map(s) ({_names(self.maps)})")
        if self.runs:
            parts.append(f"{len(self.runs)} labelling run(s) ({_names(self.runs)}) with {self.n_labels} label rows")
        return " and ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class Removal:
    """What a removal deleted."""

    atlases: list[str]
    maps: list[str]
    runs: list[str]
    n_labels: int
    files: list[str]


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def _dependents(s: Session, maps_where: Any) -> Dependents:
    maps = s.execute(select(AlignmentMapRow.id, AlignmentMapRow.name, AlignmentMapRow.file)
                     .where(maps_where).order_by(AlignmentMapRow.name)).all()
    map_ids = [m[0] for m in maps]
    runs = list(s.scalars(select(LabelRunRow.name).where(LabelRunRow.map_id.in_(map_ids)).order_by(LabelRunRow.name)))
    n_labels = s.scalar(select(func.count()).select_from(FeatureLabelRow).join(
        LabelRunRow, FeatureLabelRow.run_id == LabelRunRow.id).where(LabelRunRow.map_id.in_(map_ids))) if runs else 0
    return Dependents([m[1] for m in maps], runs, int(n_labels or 0), [m[2] for m in maps])


class RemovalMixin(AtlasesMixin, MapsMixin):
    """Store methods that remove atlases and maps (and read what depends on them)."""

    def atlas_dependents(self, name: str) -> Dependents:
        """The maps on an atlas, the labelling runs on them and their label rows."""
        with self.read_session() as s:
            row = self._atlas_row(s, name)
            return _dependents(s, AlignmentMapRow.atlas_id == row.id)

    def map_dependents(self, name: str) -> Dependents:
        """The labelling runs on a map and their label rows."""
        with self.read_session() as s:
            row = self._map_row(s, name)
            deps = _dependents(s, AlignmentMapRow.id == row.id)
        return dataclasses.replace(deps, maps=[], files=[])

    def remove_atlas(self, name: str, cascade: bool = False) -> Removal:
        """Delete an atlas: its rows, then its files.

        While maps (and labelling runs on them) depend on it, refused with `InUseError` naming
        them, unless ``cascade``: then they go too.
        """
        return self._remove("atlas", name, cascade)

    def remove_map(self, name: str, cascade: bool = False) -> Removal:
        """Delete a map's row, then its file.

        While labelling runs use the map, refused with `InUseError` naming them, unless
        ``cascade``: then the runs and their labels go too.
        """
        return self._remove("map", name, cascade)

    def _remove(self, what: str, name: str, cascade: bool) -> Removal:
        """`remove_atlas` (``what="atlas"``) and `remove_map` (``"map"``): see the module docstring."""
        self.check_writable()
        collection = None
        with self.session() as s:
            if what == "atlas":
                row: Any = self._atlas_row(s, name)
                maps_where = AlignmentMapRow.atlas_id == row.id
            else:
                row = self._map_row(s, name)
                maps_where = AlignmentMapRow.id == row.id
            deps = _dependents(s, maps_where)
            blocked = deps.maps if what == "atlas" else deps.runs
            if blocked and not cascade:
                raise InUseError(_in_use(what, name, deps))
            files = list(deps.files)
            if what == "atlas":
                loc = row_location(row)
                collection = None if loc.files(row.index_file) else (loc, row.index_file)
                files = [row.vector_file, *loc.files(row.index_file), *layout.label_index_files(name, row.extra),
                         *files]
            map_ids = select(AlignmentMapRow.id).where(maps_where)
            run_ids = select(LabelRunRow.id).where(LabelRunRow.map_id.in_(map_ids))
            s.execute(delete(FeatureLabelRow).where(FeatureLabelRow.run_id.in_(run_ids)))
            s.execute(delete(LabelRunRow).where(LabelRunRow.map_id.in_(map_ids)))
            s.execute(delete(AlignmentMapRow).where(maps_where))
            if what == "atlas":
                s.execute(delete(ConceptRow).where(ConceptRow.atlas_id == row.id))
                s.execute(delete(AtlasRow).where(AtlasRow.id == row.id))
        failpoint(f"remove_{what}.committed")
        for f in files:
            (self.path / f).unlink(missing_ok=True)
        if what == "map":
            return Removal(atlases=[], maps=[name], runs=deps.runs, n_labels=deps.n_labels, files=files)
        if collection is not None:
            collection[0].discard(self.path, collection[1])
        self._indexes = {k: v for k, v in self._indexes.items() if k[0] != name}
        return Removal(atlases=[name], maps=deps.maps, runs=deps.runs, n_labels=deps.n_labels, files=files)


def _in_use(what: str, name: str, deps: Dependents) -> str:
    if what == "atlas":
        return (f"atlas {name!r} is used by {deps.describe()}; `atlas remove {name} --cascade` removes "
                "them too, or remove them first")
    return (f"map {name!r} is used by {len(deps.runs)} labelling run(s) ({', '.join(deps.runs[:5])}"
            f"{', ...' if len(deps.runs) > 5 else ''}) with {deps.n_labels} label rows; "
            f"`atlas map remove {name} --cascade` removes them too")
