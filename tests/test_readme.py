"""The README's CLI reference is generated from --help and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from engine.cli.reference import END, START, render, splice

README = Path(__file__).resolve().parent.parent / "README.md"


def test_cli_reference_matches_help():
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text
    assert splice(text, render()) == text, "README is stale: run `python -m engine.cli.reference --write README.md`"


def test_readme_has_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 && pip install -e ".[dev,semantic]"' in text
    assert "atlas demo" in text and "python -m pytest -q" in text
