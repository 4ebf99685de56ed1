"""Named errors of the engine.

Every error a user can cause (a wrong name, a wrong shape, a missing or damaged file) is an
`AtlasError` subclass whose message says what was wrong and how to fix it. The CLI turns them
into one-line messages with exit code 1; nothing else in the library should print.
"""

from __future__ import annotations


class AtlasError(Exception):
    """Base class of every error the engine raises for a user's input or store state."""


class StoreNotFoundError(AtlasError):
    """The store directory or its database does not exist or is not initialised."""


class ConnectionLostError(StoreNotFoundError):
    """The database server closed this process's open connection (a restart, a failover): the
    transaction in flight was rolled back, unless the connection was lost while it committed."""


class StoreOutdatedError(AtlasError):
    """The store's database is at an older schema revision than this code expects."""


class NotFoundError(AtlasError):
    """A named object (atlas, concept, model, map, run) does not exist in the store."""


class BadNameError(AtlasError):
    """A name for an atlas, map or run breaks the naming rule (names become file names)."""


class DuplicateError(AtlasError):
    """An object with the same name already exists."""


class BadValueError(AtlasError, ValueError):
    """A parameter is out of range or not one of the known names (a k, a method, a pairing, a spec)."""


class ShapeError(AtlasError):
    """An array has the wrong shape or dimension for where it is used."""


class FormatError(AtlasError):
    """An input file is unreadable, malformed, or not in the expected format."""

    @classmethod
    def at(cls, path: object, what: str) -> FormatError:
        """``FormatError("<path>: <what>")``: the file first, then what is wrong with it."""
        return cls(f"{path}: {what}")


class SourceChangedError(AtlasError):
    """A run resumed, or a plan run, on a map, atlas or features that changed since it was made."""


class IndexIntegrityError(AtlasError):
    """An index file is missing, corrupt, or out of date with the vectors it derives from."""


class IndexUnavailableError(AtlasError):
    """The service holding an atlas's index (a Milvus server or Milvus Lite folder) cannot be reached."""


class SiteMismatchError(AtlasError):
    """An alignment map or direction is applied to another model, layer or dimension than its own."""


class ArchitectureError(AtlasError):
    """A model's architecture is not known to the layer resolver."""


class StoreBusyError(AtlasError):
    """Another process held the store database's write lock for longer than the busy timeout."""


class StoreCorruptError(AtlasError):
    """The store database is not a readable SQLite database (garbage, truncated, damaged)."""


class ReadOnlyStoreError(AtlasError):
    """A write was asked of a store whose database or folders cannot be written."""


class InUseError(AtlasError):
    """An object cannot be removed while others depend on it (maps on an atlas, runs on a map)."""
