"""The CLI over a real store in tmp_path: every command has help; errors are one line, exit 1."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from engine.cli import cli

pytestmark = pytest.mark.backends("sqlite", "postgresql")


def _all_commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


ALL = list(_all_commands(cli))


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_command_has_help(path, cmd):
    assert cmd.help and len(cmd.help.strip()) > 20
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version_and_root_help():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "atlas" in r.output
    assert CliRunner().invoke(cli, ["-h"]).exit_code == 0


@pytest.fixture
def env(tmp_path, monkeypatch, db_url):
    """A CLI runner on the store folder ``tmp_path/st``; on PostgreSQL every command is given the
    database through ``ATLAS_DB_URL`` (what `atlas init` records is tested below)."""
    monkeypatch.setenv("ATLAS_STORE", str(tmp_path / "st"))
    if db_url:
        monkeypatch.setenv("ATLAS_DB_URL", db_url)
    return CliRunner()


def _ok(runner, *args):
    r = runner.invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def test_tour(env, saelens_folder, neuronpedia_export):
    _ok(env, "init")
    _ok(env, "import-sae", str(saelens_folder), "--labels", str(neuronpedia_export), "--name", "g12")
    rows = json.loads(_ok(env, "atlases", "--json"))
    assert rows[0]["name"] == "g12" and rows[0]["n_concepts"] == 200 and rows[0]["n_labelled"] == 5
    assert "gemma-2-2b" in _ok(env, "atlases")  # the table
    hits = json.loads(_ok(env, "lookup", "weather and rain", "-k", "10", "--json", "--no-semantic"))
    assert hits[0]["ref"] == "g12/0" and hits[1]["ref"] == "g12/3"
    nb = json.loads(_ok(env, "neighbors", "g12/0", "-k", "4", "--json"))
    assert len(nb) == 4 and all(h["ref"] != "g12/0" for h in nb)
    shown = json.loads(_ok(env, "show", "g12/0", "--json"))
    assert shown["label"] == "weather and rain" and shown["layer"] == 12 and shown["model"] == "gemma-2-2b"
    assert "ok" in _ok(env, "index", "verify")
    cur = json.loads(_ok(env, "db", "current", "--json"))
    assert cur["up_to_date"] is True
    assert "g12" in _ok(env, "models") or "gemma-2-2b" in _ok(env, "models")


def test_corrupt_index_error_then_rebuild_restores(env, saelens_folder, tmp_path):
    _ok(env, "init")
    _ok(env, "import-sae", str(saelens_folder), "--name", "g12")
    before = _ok(env, "neighbors", "g12/5", "--json")
    idx = next((tmp_path / "st" / "indexes").glob("g12@*.faiss"))
    idx.write_bytes(idx.read_bytes()[:200])
    r = env.invoke(cli, ["neighbors", "g12/5"])
    assert r.exit_code == 1 and "atlas index rebuild g12" in r.output and "Traceback" not in r.output
    r = env.invoke(cli, ["index", "verify"])
    assert r.exit_code == 1 and "PROBLEM" in r.output
    _ok(env, "index", "rebuild", "g12")
    assert _ok(env, "neighbors", "g12/5", "--json") == before


def test_db_downgrade_and_upgrade(env):
    _ok(env, "init")
    _ok(env, "db", "downgrade", "base", "--yes")
    r = env.invoke(cli, ["atlases"])
    assert r.exit_code == 1 and "not an initialised store" in r.output
    _ok(env, "db", "upgrade")
    assert json.loads(_ok(env, "atlases", "--json")) == []


def test_db_downgrade_asks_for_yes_and_gc_after_it_removes_nothing(env, saelens_folder, tmp_path):
    _ok(env, "init")
    _ok(env, "import-sae", str(saelens_folder), "--name", "g12")
    files = sorted(p.name for d in ("vectors", "indexes") for p in (tmp_path / "st" / d).iterdir())
    r = env.invoke(cli, ["db", "downgrade", "base"])
    assert r.exit_code == 1 and "--yes" in r.output and "1 atlas" in r.output and "Traceback" not in r.output
    assert json.loads(_ok(env, "atlases", "--json"))[0]["name"] == "g12"  # nothing was dropped
    _ok(env, "db", "downgrade", "0005", "--yes")
    r = env.invoke(cli, ["gc", "--grace", "0"])
    assert r.exit_code == 1 and "atlas db upgrade" in r.output
    assert sorted(p.name for d in ("vectors", "indexes") for p in (tmp_path / "st" / d).iterdir()) == files
    _ok(env, "db", "upgrade")
    assert "ok" in _ok(env, "index", "verify")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["atlases"], "atlas init"),
        (["show", "nope/1"], "no atlas named 'nope'"),
        (["show", "g12/999"], "ordinals run 0..199"),
        (["show", "g12/x"], "bad concept id"),
        (["import-sae", "{sae}", "--name", "g12"], "exists"),
        (["index", "rebuild", "zzz"], "no atlas named 'zzz'"),
    ],
)
def test_user_errors_are_one_line_with_exit_1(env, saelens_folder, args, message):
    if args != ["atlases"]:
        _ok(env, "init")
        _ok(env, "import-sae", str(saelens_folder), "--name", "g12")
    r = env.invoke(cli, [a.replace("{sae}", str(saelens_folder)) for a in args])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.backends("postgresql")
def test_init_records_the_database_in_the_store_folder(tmp_path, db_url, saelens_folder, neuronpedia_export):
    """`atlas init --db-url` records the URL (never a password) in the folder; later commands find
    the database there; another URL for that folder is refused in one line."""
    from sqlalchemy.engine import make_url

    runner, st = CliRunner(), str(tmp_path / "st")
    with_password = make_url(db_url).set(password="s3cret").render_as_string(hide_password=False)
    _ok(runner, "init", "--store", st, "--db-url", with_password)  # trust auth: the password is not checked
    recorded = json.loads((tmp_path / "st" / "database.json").read_text())
    assert recorded == {"url": db_url} and "s3cret" not in (tmp_path / "st" / "database.json").read_text()
    assert not (tmp_path / "st" / "atlas.db").exists()
    _ok(runner, "import-sae", str(saelens_folder), "--labels", str(neuronpedia_export), "--name", "g12", "--store", st)
    hits = json.loads(_ok(runner, "lookup", "weather and rain", "--json", "--no-semantic", "--store", st))
    assert [h["ref"] for h in hits[:2]] == ["g12/0", "g12/3"]
    assert json.loads(_ok(runner, "db", "current", "--json", "--store", st))["up_to_date"] is True
    _ok(runner, "atlases", "--store", st, "--db-url", db_url)  # the recorded URL itself is fine
    other = make_url(db_url).set(database="another").render_as_string(hide_password=False)
    for args in (["atlases", "--db-url", other], ["atlases", "--db-url", f"sqlite:///{tmp_path / 'x.db'}"]):
        r = runner.invoke(cli, [*args, "--store", st])
        assert r.exit_code == 1 and "keeps its metadata in" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_source_ref_is_recorded_absolute_and_shown_so_from_any_folder(env, saelens_folder, neuronpedia_export,
                                                                        tmp_path, monkeypatch):
    _ok(env, "init")
    monkeypatch.chdir(saelens_folder.parent)
    _ok(env, "import-sae", saelens_folder.name, "--labels", neuronpedia_export.name if
        neuronpedia_export.parent == saelens_folder.parent else str(neuronpedia_export), "--name", "g12")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shown = json.loads(_ok(env, "show", "g12/0", "--json"))
    assert shown["source"] == str(saelens_folder.resolve())
    with __import__("engine.store.store", fromlist=["Store"]).Store.open(tmp_path / "st") as s:
        assert s.atlas("g12").source_ref == str(saelens_folder.resolve())
        assert s.concept("g12/0").source_ref == str(saelens_folder.resolve())
