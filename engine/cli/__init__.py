"""The ``atlas`` command line: a thin layer over the ``engine`` library.

Each area of the engine registers its commands from its own module (listed in ``_COMMAND_MODULES``);
heavy imports (torch, transformers) happen inside commands so ``atlas --help`` stays fast.
Errors the engine raises for user mistakes (`engine.errors.AtlasError`) become one-line messages
with exit code 1, never tracebacks.
"""

from __future__ import annotations

import importlib

import click

import engine.world  # noqa: F401  (installs ConceptWorld's feature source and native directions)
from engine import __version__
from engine.errors import AtlasError


class AtlasGroup(click.Group):
    """A click group that turns `AtlasError` into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            raise click.ClickException(str(e)) from e

    def group(self, *args, **kwargs):
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
    "engine.cli.align_cmds",
    "engine.cli.label_cmds",
    "engine.cli.contexts_cmds",
    "engine.cli.steer_cmds",
    "engine.cli.plugins.demo",
    "engine.cli.plugins.world",
    "engine.cli.plugins.eval",
    "engine.cli.serve_cmds",
]


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main() -> None:
    cli(prog_name="atlas")
