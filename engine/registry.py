"""One registry type for every name → entry table the engine keeps (alignment methods, steering
modes, export formats, ...).

A `Registry` is a ``dict`` (look-ups, ``in``, ``sorted(...)`` work as on any mapping) that refuses
a second entry under one name: plug-ins register with ``@REGISTRY.register("name")`` or
``REGISTRY.add("name", entry)``, and a duplicate is a programming error (``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engine.errors import BadValueError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Entries by name; ``kind`` names what it holds in messages ("steering mode", ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (once); returns the entry."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: ``@registry.register("name")`` registers the decorated object under ``name``."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    def lookup(self, name: str) -> T:
        """The entry under ``name``; an unknown name is a `BadValueError` listing the known ones."""
        try:
            return self[name]
        except KeyError:
            raise BadValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}") from None
