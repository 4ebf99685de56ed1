"""The CLI's plug-in hook (`engine.cli.load_plugins`): entry points of ``concept_atlas.cli``, and
the built-in plug-ins (world, eval, demo) whether or not the installed metadata names them."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import click
from click.testing import CliRunner

from engine.cli import PLUGIN_GROUP, load_plugins

BUILTINS = ["engine.cli.plugins.demo", "engine.cli.plugins.eval", "engine.cli.plugins.world"]


def _group() -> click.Group:
    @click.group()
    def g() -> None:
        """A bare group."""

    return g


def test_builtin_plugins_load_without_metadata():
    """Stale distribution metadata (no entry points of the group): the built-ins still register."""
    g = _group()
    assert sorted(load_plugins(g, entry_points=[])) == BUILTINS
    assert {"world", "eval", "demo"} <= set(g.commands)
    assert set(g.commands["world"].commands) == {"build", "corpus"}


def test_declared_entry_points_load_once(tmp_path, monkeypatch):
    (tmp_path / "atlas_plugin_probe.py").write_text(
        "import click\n\n@click.command('probe')\ndef probe():\n    click.echo('probed')\n\n"
        "def register(cli):\n    cli.add_command(probe)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint("world", "engine.cli.plugins.world:register", PLUGIN_GROUP),
           EntryPoint("probe", "atlas_plugin_probe:register", PLUGIN_GROUP)]
    g = _group()
    loaded = load_plugins(g, entry_points=eps)
    assert loaded[:2] == ["engine.cli.plugins.world", "atlas_plugin_probe"]
    assert sorted(loaded) == sorted([*BUILTINS, "atlas_plugin_probe"])  # each module once
    res = CliRunner().invoke(g, ["probe"])
    assert res.exit_code == 0 and res.output == "probed\n"
    sys.modules.pop("atlas_plugin_probe", None)


def test_a_broken_third_party_plugin_is_reported_and_skipped(capsys):
    g = _group()
    loaded = load_plugins(g, entry_points=[EntryPoint("gone", "no_such_atlas_plugin:register", PLUGIN_GROUP)])
    assert sorted(loaded) == BUILTINS
    err = capsys.readouterr().err
    assert "plug-in 'gone' (no_such_atlas_plugin:register) was not loaded" in err and "No module named" in err


def test_the_installed_cli_has_the_plugin_commands():
    from engine.cli import cli

    assert {"world", "eval", "demo", "align", "serve"} <= set(cli.commands)


def test_world_sizes_in_the_options_are_the_worlds():
    from engine.cli.common import WORLD_SIZES
    from engine.world.config import SIZES

    assert tuple(WORLD_SIZES) == tuple(SIZES)
