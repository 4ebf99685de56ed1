"""The README is the front door: its commands are the ones CI and the tests run, its links resolve,
and the docs' CLI reference is generated from --help and must not drift from it.

Where each README command is run:
- the two commands (install + demo, install + tests): `.ci/run`, which reads them from the README
  (`readme_block("two-commands")` below is the reader it calls);
- the CLI tour: `tests/demo/test_demo.py`, verbatim, on the store the demo built;
- "your own model": `tests/models/test_real_models.py` runs the docs page that holds the whole session,
  and the README's lines are checked here to be lines of that session, in its order;
- `atlas serve`: started here as a process, and its page fetched.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.cli.reference import END, PAGE, START, render, splice

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REAL_MODELS_PAGE = ROOT / "docs" / "guide" / "real-models.md"
MAX_README_LINES = 300


def readme_block(name: str, path: Path = README) -> list[str]:
    """The command lines of the fenced block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"{path.name} needs one {start} ... {end}"
    block = text.split(start, 1)[1].split(end, 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]


def command(line: str) -> list[str]:
    """A README line's words as the shell splits them, without its trailing ``# comment``."""
    return shlex.split(line, comments=True)


def test_cli_reference_matches_help():
    text = (ROOT / PAGE).read_text(encoding="utf-8")
    assert START in text and END in text
    assert splice(text, render()) == text, f"{PAGE} is stale: run `python -m engine.cli.reference --write {PAGE}`"


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    order = ["## Two commands", "## A five-minute CLI tour", "## Your own model in five commands",
             "## The web explorer", "## Documentation"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert text.count("](docs/img/") == 1  # the one screenshot


def test_the_two_commands_install_then_run_the_demo_and_the_tests():
    main_job, tests = readme_block("two-commands")
    assert main_job.startswith("pip install torch==2.13.0 && pip install -e . && ")
    assert main_job.endswith("atlas demo --size tiny --out demo-out")
    assert tests == 'pip install -e ".[dev]" && python -m pytest -q -n auto --dist worksteal'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- two-commands:start -->" in ci and "readme_line 1" in ci  # CI runs these lines, read from this file


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links into the docs"
    for link in local:
        assert (ROOT / link).exists(), link


def test_the_own_model_lines_are_the_tested_session():
    """The README's five commands are lines of the docs session `tests/models/test_real_models.py` runs verbatim."""
    five = readme_block("own-model")
    assert len(five) == 5 and all(line.startswith("atlas ") for line in five)
    session = readme_block("real-models", REAL_MODELS_PAGE)
    positions = [session.index(line) for line in five]
    assert positions == sorted(positions)


def test_the_tour_runs_on_the_demo_store():
    """The tour's commands are run by tests/demo/test_demo.py; here: each is a real `atlas` command."""
    from click.testing import CliRunner

    from engine.cli import cli

    tour = readme_block("cli-tour")
    assert len(tour) >= 8
    for line in tour:
        args = command(line)
        assert args[0] == "atlas"
        res = CliRunner().invoke(cli, [*args[1:], "--help"])
        assert res.exit_code == 0, (line, res.output)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_line_serves_the_page(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    (line,) = readme_block("serve")
    args = command(line)
    assert args == ["atlas", "serve"]
    from engine.store.store import Store

    Store.init(tmp_path / "atlas-store")  # `atlas serve` serves ./atlas-store
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args[1:], "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, page = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert "<html" in page.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
