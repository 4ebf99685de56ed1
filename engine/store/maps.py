"""Stored alignment maps: the ``alignment_maps`` rows and the ``maps/`` files (`MapsMixin`).

The store saves and loads a map as plain data, a `MapRecord`: its tensors (numpy arrays) and its
provenance (plain JSON: sites, method, parameters, metrics). The map itself
(`engine.align.map.AlignmentMap`: ``to_record`` / ``from_record``, and `engine.align.map.save_map`
/ `load_map` over the methods here) and how it is fitted (`engine.align.fit`) live in
``engine.align``, which the store never imports: opening a store does not import torch.

A map is stored as ``maps/<name>@<token>.safetensors``, a file name this write owns
(`engine.store.layout`; written to a temporary file, renamed atomically) and committed to the
database last, with its checksum, so a crash leaves the old map or the new one (and an unclaimed
file, which `Store.gc` removes). Removing a map that labelling runs use is refused unless asked to
cascade (`engine.store.removal`). The provenance is also in the file's metadata, so a map file
describes itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from engine.errors import DuplicateError, FormatError, NotFoundError, SiteMismatchError
from engine.store import layout
from engine.store.base import StoreBase
from engine.store.schema import AlignmentMapRow, AtlasRow, ModelRow
from engine.util import check_name, failpoint, utcnow, write_store_file


@dataclass(frozen=True)
class MapRecord:
    """A map as the store saves and loads it: its tensors by name and its provenance, plain JSON data
    with at least ``subject_model``, ``subject_layer``, ``subject_hook``, ``atlas``, ``method``,
    ``d_subject`` and ``d_atlas`` (``pairing``, ``params``, ``n_pairs``, ``corpus_fingerprint``,
    ``metrics`` and ``name`` where known). A loaded record's provenance is the database row's, with
    the atlas's site (``atlas_model``, ``atlas_layer``, ``atlas_hook``)."""

    tensors: dict[str, np.ndarray]
    provenance: dict[str, Any]

    def to_bytes(self) -> bytes:
        """The map file: the tensors as float32 safetensors, the provenance in its metadata."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()}
        return save(tensors, metadata={"provenance": json.dumps(self.provenance)})

    @classmethod
    def from_bytes(cls, data: bytes) -> MapRecord:
        """A map file's tensors and provenance; a file that does not parse is a `FormatError`."""
        from safetensors.numpy import load

        try:
            tensors = load(data)
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__", {}) or {}
            provenance = json.loads(meta.get("provenance", "{}"))
        except Exception as e:  # any parse failure means: not a map file
            raise FormatError(f"not an alignment-map file: {e}") from None
        return cls(dict(tensors), dict(provenance))


@dataclass(frozen=True)
class MapInfo:
    """A stored map as the store lists it."""

    name: str
    subject_model: str
    subject_layer: int
    subject_hook: str
    atlas: str
    atlas_layer: int
    method: str
    pairing: str | None
    d_subject: int
    d_atlas: int
    n_pairs: int
    heldout_r2: float | None
    heldout_cosine: float | None
    corpus_fingerprint: str | None
    file: str
    sha256: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    created_at: dt.datetime | None


def default_map_name(provenance: dict[str, Any]) -> str:
    p = provenance
    name = f"{p['subject_model']}-L{p['subject_layer']}-{p['atlas']}-{p['method']}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name).lstrip(".")


class MapsMixin(StoreBase):
    """Store methods over alignment maps: their rows and files."""

    def save_map_record(self, record: MapRecord, name: str | None = None, overwrite: bool = False) -> MapInfo:
        """Store a map (`MapRecord`) as ``name``: its file to ``maps/`` (atomic), then the database row.

        The subject model and the atlas must be in the store. With ``overwrite`` an existing map of
        that name is replaced: the new file gets a new name, the row is switched in one transaction,
        and only then is the old file removed, so a crash leaves the old map or the new one.
        """
        self.check_writable()
        p = record.provenance
        name = name or p.get("name") or default_map_name(p)
        check_name(name, "map")
        with self.read_session() as s:  # early, friendly checks; all repeated under the write lock
            self._map_targets(s, p, name, overwrite)
        p = {**p, "name": name}
        data = MapRecord(record.tensors, p).to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        token = self.claim_token()  # before the file: `Store.gc` keeps it until the row claims it
        rel = layout.map_file(name, token)  # this write's own file
        path = self.path / rel
        old_file = None
        try:
            write_store_file(path, data)
            failpoint("save_map.file_written")
            with self.session() as s:
                model, atlas, row = self._map_targets(s, p, name, overwrite)
                if row is None:
                    row = AlignmentMapRow(name=name)
                    s.add(row)
                else:  # a replacement is a new map: it is created now
                    old_file, row.created_at = row.file, utcnow()
                row.subject_model_id, row.subject_layer = model.id, p["subject_layer"]
                row.subject_hook = p["subject_hook"]
                row.atlas_id, row.method, row.pairing = atlas.id, p["method"], p.get("pairing")
                row.params, row.file, row.sha256 = p.get("params") or {}, rel, sha
                row.d_subject, row.d_atlas, row.n_pairs = p["d_subject"], p["d_atlas"], p.get("n_pairs", 0)
                row.corpus_fingerprint, row.metrics = p.get("corpus_fingerprint"), p.get("metrics") or {}
        except IntegrityError:
            path.unlink(missing_ok=True)
            raise DuplicateError(f"a map named {name!r} was saved while this one was; pick another --name "
                                 "or pass --overwrite") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            self.release_claim(token)
        failpoint("save_map.committed")
        if old_file is not None and old_file != rel:
            (self.path / old_file).unlink(missing_ok=True)
        return self.map_info(name)

    def _map_targets(self, s, p: dict[str, Any], name: str, overwrite: bool):
        """(subject model row, atlas row, existing map row or None) of a map to save, checked."""
        model = s.scalar(select(ModelRow).where(ModelRow.name == p["subject_model"]))
        if model is None:
            raise NotFoundError(f"no model named {p['subject_model']!r} in the store; register the subject first")
        atlas = s.scalar(select(AtlasRow).where(AtlasRow.name == p["atlas"]))
        if atlas is None:
            raise NotFoundError(f"no atlas named {p['atlas']!r}; `atlas atlases` lists them")
        if atlas.dim != p["d_atlas"]:
            raise SiteMismatchError(f"atlas {p['atlas']!r} has d={atlas.dim}, the map maps into d={p['d_atlas']}")
        old = s.scalar(select(AlignmentMapRow).where(AlignmentMapRow.name == name))
        if old is not None and not overwrite:
            raise DuplicateError(f"a map named {name!r} exists; pick another --name or pass --overwrite")
        return model, atlas, old

    def maps(self) -> list[MapInfo]:
        """Every stored map, by name."""
        return self._map_rows()

    def map_info(self, name: str) -> MapInfo:
        """A stored map's provenance and metrics (its row; `load_map` reads the map itself)."""
        rows = self._map_rows(name)
        if not rows:
            raise NotFoundError(f"no map named {name!r}; `atlas maps` lists them")
        return rows[0]

    def map_record(self, name: str) -> MapRecord:
        """A stored map's tensors and provenance (the database row's, with its atlas's site), its file
        checked against the checksum in the database."""
        for attempt in range(3):
            info = self.map_info(name)
            path = self.path / info.file
            try:
                data = path.read_bytes()
                break
            except FileNotFoundError:
                if attempt < 2 and self.map_info(name).file != info.file:
                    continue  # overwritten while read: the row moved to the new file, and the old one went
                raise NotFoundError(f"the file of map {name!r} is missing ({path}); refit it with `atlas align`") from None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise FormatError(
                f"the file of map {name!r} ({path}) does not match its checksum; refit it with `atlas align`"
            )
        with self.read_session() as s:  # the atlas's site (its model, layer and hook)
            atlas_model, atlas_layer, atlas_hook = s.execute(
                select(ModelRow.name, AtlasRow.layer, AtlasRow.hook)
                .join(ModelRow, AtlasRow.model_id == ModelRow.id)
                .where(AtlasRow.name == info.atlas)
            ).one()
        record = MapRecord.from_bytes(data)
        return MapRecord(record.tensors, {**record.provenance, **dict(
            name=name, subject_model=info.subject_model, subject_layer=info.subject_layer,
            subject_hook=info.subject_hook, atlas=info.atlas, atlas_model=atlas_model, atlas_layer=atlas_layer,
            atlas_hook=atlas_hook, method=info.method, pairing=info.pairing, params=info.params,
            n_pairs=info.n_pairs, corpus_fingerprint=info.corpus_fingerprint, metrics=info.metrics,
            d_subject=info.d_subject, d_atlas=info.d_atlas,
        )})

    def _map_row(self, s, name: str) -> AlignmentMapRow:
        row = s.scalar(select(AlignmentMapRow).where(AlignmentMapRow.name == name))
        if row is None:
            raise NotFoundError(f"no map named {name!r}; `atlas maps` lists them")
        return row

    def _map_rows(self, name: str | None = None) -> list[MapInfo]:
        q = (
            select(AlignmentMapRow, ModelRow.name, AtlasRow.name, AtlasRow.layer)
            .join(ModelRow, AlignmentMapRow.subject_model_id == ModelRow.id)
            .join(AtlasRow, AlignmentMapRow.atlas_id == AtlasRow.id)
            .order_by(AlignmentMapRow.name)
        )
        if name is not None:
            q = q.where(AlignmentMapRow.name == name)
        out = []
        with self.read_session() as s:
            for r, model, atlas, atlas_layer in s.execute(q):
                m = r.metrics or {}
                out.append(MapInfo(
                    name=r.name, subject_model=model, subject_layer=r.subject_layer, subject_hook=r.subject_hook,
                    atlas=atlas, atlas_layer=atlas_layer, method=r.method, pairing=r.pairing,
                    d_subject=r.d_subject, d_atlas=r.d_atlas, n_pairs=r.n_pairs, heldout_r2=m.get("heldout_r2"),
                    heldout_cosine=m.get("heldout_cosine"), corpus_fingerprint=r.corpus_fingerprint, file=r.file,
                    sha256=r.sha256, params=dict(r.params or {}), metrics=dict(m), created_at=r.created_at,
                ))
        return out
