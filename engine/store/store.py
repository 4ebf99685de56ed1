"""The store: one directory holding the metadata database, atlas vectors, indexes and maps.

`Store` is the one object the rest of the engine is handed. Its methods are grouped by concept
in mixins, each in the module that owns that concept's tables and files and explains how they
are written:

- `engine.store.base`: the folder, the database engine and sessions; `init` / `open`;
- `engine.store.models`: registered models;
- `engine.store.atlases`: atlases, their vector files and indexes (why files are written first
  and the database committed last); `engine.store.vectorfiles` checks and writes the vectors,
  `engine.store.index_location` builds and places an index (a FAISS file or a Milvus collection);
- `engine.store.reads`: the reads of atlases and concepts and the search of an atlas's index,
  in plain SQL (`StoreReads`, which `StoreBase` runs through its sessions and the plain ``sqlite3``
  reader of the one-shot commands, `engine.store.reader`, through its connection); the records they
  return (`AtlasInfo`, `Concept`, `Hit`) are `engine.store.records`;
- `engine.store.removal`: removing atlases and maps (and what depends on them);
- `engine.store.maps`: alignment maps, their rows and files (how a map is replaced safely);
- `engine.store.passes`: the run API of resumable passes (the guarded step transaction that makes a
  run resumable exactly), shared by:
- `engine.store.runs`: labelling runs and their labels (the loop itself is `engine.labelling.run`);
- `engine.store.contexts`: top-contexts runs and their windows (the pass is `engine.labelling.contexts`).
- `engine.store.files`: the store's files as a whole: claimed files, leftovers of interrupted
  writes, `gc`, `verify`.

The dataclasses they return are re-exported here, so callers import them from one place.
"""

from __future__ import annotations

from engine.store.atlases import AtlasInfo, AtlasSource, IndexStatus
from engine.store.base import StoreBase, make_engine
from engine.store.contexts import ConceptContext, ContextRun, ContextsMixin
from engine.store.files import FilesMixin, Leftover, MapFileStatus, StoreReport
from engine.store.index_location import IndexPlacement
from engine.store.maps import MapInfo, MapsMixin
from engine.store.models import ModelInfo, ModelsMixin
from engine.store.records import Concept, Hit, parse_concept_ref
from engine.store.removal import Dependents, Removal, RemovalMixin
from engine.store.runs import LabellingRun, RunsMixin

__all__ = [
    "AtlasInfo", "AtlasSource", "Concept", "ConceptContext", "ContextRun", "Dependents", "Hit", "IndexPlacement", "IndexStatus", "LabellingRun",
    "Leftover", "MapFileStatus", "MapInfo", "ModelInfo", "Removal", "Store", "StoreReport", "make_engine",
    "parse_concept_ref",
]


class Store(ModelsMixin, FilesMixin, RemovalMixin, MapsMixin, RunsMixin, ContextsMixin, StoreBase):
    """An opened store. Use `Store.init` to create one and `Store.open` to open an existing one."""
