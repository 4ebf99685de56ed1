"""The ``atlas`` command line: a thin layer over the ``engine`` library.

Each area of the engine registers its commands from its own module (listed in ``_COMMAND_MODULES``);
heavy imports (torch, transformers) happen inside commands so ``atlas --help`` stays fast.
Command groups beyond the core (ConceptWorld's ``world`` and ``eval``, the ``demo``, or a
third-party package's) are plug-ins: entry points of the group ``concept_atlas.cli`` whose object
is a ``register(cli)`` function (`load_plugins`). The core CLI imports no world module.
Errors the engine raises for user mistakes (`engine.errors.AtlasError`) become one-line messages
with exit code 1, never tracebacks.

The core's command modules load on demand (`LazyCommands`, issue 26): ``atlas show`` imports the
modules in `_COMMAND_MODULES` order until one registers ``show`` (the store commands, the first),
so a one-shot read does not import the alignment, labelling or steering commands; listing the
commands (``--help``, ``cli.commands`` iterated) loads them all. The plug-ins load when any command
other than the one-shot reads of `PLUGIN_FREE_COMMANDS` is looked up (and when the commands are
listed): they install ConceptWorld into the core's registries (the ``native:`` feature source, its
model loader), which commands of other modules use, and importing them imports the whole store
(SQLAlchemy), which those reads do without (`engine.store.reader`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click

from engine import __version__
from engine.errors import AtlasError

if TYPE_CHECKING:
    import importlib.metadata


class AtlasGroup(click.Group):
    """A click group that turns `AtlasError` (and an index spec `indexes` refuses) into a one-line message
    and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            raise click.ClickException(str(e)) from e
        except ValueError as e:
            spec_errors = sys.modules.get("indexes.base")  # loaded only if an index was made: --help stays fast
            if spec_errors is not None and isinstance(e, spec_errors.IndexSpecError):
                raise click.ClickException(str(e)) from e
            raise

    def group(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", AtlasGroup)
        return super().group(*args, **kwargs)


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="atlas")
def cli() -> None:
    """Concept Atlas: label, search and steer new language models through a labelled atlas.

    A store (--store DIR, env ATLAS_STORE, default ./atlas-store) holds the metadata database,
    atlas vectors, FAISS indexes and alignment maps. Start with `atlas init`.
    """


# Modules that register commands on `cli` (each defines `register(cli)`).
_COMMAND_MODULES = [
    "engine.cli.store_cmds",
    "engine.cli.setup_cmds",
    "engine.cli.align_cmds",
    "engine.cli.label_cmds",
    "engine.cli.contexts_cmds",
    "engine.cli.steer_cmds",
    "engine.cli.serve_cmds",
]


PLUGIN_GROUP = "concept_atlas.cli"  # entry points: name = "module:register"
BUILTIN_PLUGINS = "engine.cli.plugins"  # the package of the built-in plug-ins


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed distributions' entry points of `PLUGIN_GROUP`."""
    import importlib.metadata  # ~0.1 s: only where a plug-in is looked for

    return list(importlib.metadata.entry_points(group=PLUGIN_GROUP))


def load_plugins(group: click.Group, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[str]:
    """Register the commands of every CLI plug-in on ``group``; returns the modules loaded, in order.

    Plug-ins are the entry points of `PLUGIN_GROUP` (``entry_points``: default, the installed
    ones), each a ``register(cli)`` function. The built-in plug-ins (every module of
    `BUILTIN_PLUGINS`) are declared there too, and are loaded from the package itself when the
    installed metadata does not name them (an editable install from before they were declared), so
    the CLI is whole either way. A third-party plug-in that fails to load is reported on stderr
    and skipped; a built-in one raises.
    """
    loaded: list[str] = []
    for ep in plugin_entry_points() if entry_points is None else entry_points:
        module = ep.value.split(":")[0].strip()
        if module in loaded:
            continue
        try:
            register: Callable[[click.Group], None] = ep.load()
            register(group)
        except Exception as e:
            if module.startswith(BUILTIN_PLUGINS + "."):
                raise
            click.echo(f"atlas: plug-in {ep.name!r} ({ep.value}) was not loaded: {e}", err=True)
            continue
        loaded.append(module)
    package = importlib.import_module(BUILTIN_PLUGINS)
    for info in pkgutil.iter_modules(package.__path__, BUILTIN_PLUGINS + "."):
        if info.name not in loaded:
            importlib.import_module(info.name).register(group)
            loaded.append(info.name)
    return loaded


# The one-shot reads: they use nothing a plug-in installs, so looking them up loads no plug-in.
PLUGIN_FREE_COMMANDS = frozenset({"show", "neighbors", "lookup"})


class LazyCommands(dict):
    """A group's ``commands`` that imports command modules when a name is looked up: the modules of
    ``modules`` in order until one registers it, then the plug-ins (``plugins``, called once) unless
    the name is one of `PLUGIN_FREE_COMMANDS`; everything when the names are listed (iteration,
    ``len``, ``keys``/``values``/``items``). Adding a command does not load."""

    def __init__(self, group: click.Group, modules: list[str], plugins: Callable[[], object] | None = None) -> None:
        super().__init__()
        self._group, self._pending, self._plugins = group, list(modules), plugins

    def _load_until(self, name: str | None) -> None:
        while self._pending and (name is None or not dict.__contains__(self, name)):
            importlib.import_module(self._pending.pop(0)).register(self._group)
        if self._plugins is not None and (name is None or name not in PLUGIN_FREE_COMMANDS):
            load, self._plugins = self._plugins, None
            load()

    def get(self, name: str, default: Any = None) -> Any:
        self._load_until(name)
        return dict.get(self, name, default)

    def __getitem__(self, name: str) -> click.Command:
        self._load_until(name)
        return dict.__getitem__(self, name)

    def __contains__(self, name: object) -> bool:
        self._load_until(str(name))
        return dict.__contains__(self, name)


def _listing(name: str) -> Callable[..., Any]:
    """``dict.<name>`` after every command module and plug-in is loaded (the names are listed)."""
    def method(self: LazyCommands, *args: Any) -> Any:
        self._load_until(None)
        return getattr(dict, name)(self, *args)

    return method


for _method in ("__iter__", "__len__", "keys", "values", "items"):
    setattr(LazyCommands, _method, _listing(_method))


cli.commands = LazyCommands(cli, _COMMAND_MODULES, plugins=lambda: load_plugins(cli))


def main() -> None:
    cli(prog_name="atlas")
