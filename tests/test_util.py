"""The shared write helpers of engine.util: a folder built aside and renamed into place whole."""

from __future__ import annotations

import pytest

from engine.util import build_then_rename


def _fill(text: str):
    def build(tmp):
        (tmp / "data.txt").write_text(text)
        (tmp / "DONE").write_text("")

    return build


def test_a_built_folder_appears_whole_and_its_temporary_folder_goes(tmp_path):
    final, tmp = tmp_path / "world", tmp_path / ".world.tmp1"
    tmp.mkdir()
    (tmp / "stale").write_text("left by a killed build")  # emptied first
    build_then_rename(tmp, final, _fill("mine"), "DONE")
    assert sorted(p.name for p in final.iterdir()) == ["DONE", "data.txt"] and not tmp.exists()


def test_a_racer_that_finished_first_wins(tmp_path):
    final = tmp_path / "world"
    build_then_rename(tmp_path / ".a", final, _fill("theirs"), "DONE")
    (final / "extra").write_text("")  # a non-empty folder: the second rename fails
    build_then_rename(tmp_path / ".b", final, _fill("mine"), "DONE")
    assert (final / "data.txt").read_text() == "theirs" and not (tmp_path / ".b").exists()


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(tmp):
        (tmp / "half").write_text("")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        build_then_rename(tmp_path / ".w", tmp_path / "world", broken, "DONE")
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_folder_in_the_way_is_an_error(tmp_path):
    final = tmp_path / "world"
    final.mkdir()
    (final / "junk").write_text("")  # no marker: not a racer's finished copy
    with pytest.raises(OSError):
        build_then_rename(tmp_path / ".w", final, _fill("mine"), "DONE")
    assert not (tmp_path / ".w").exists()


def test_a_subfolder_is_published(tmp_path):
    def train(tmp):
        (tmp / "m" / "layer.1").mkdir(parents=True)
        (tmp / "m" / "layer.1" / "site.json").write_text("{}")

    build_then_rename(tmp_path / ".t", tmp_path / "site", train, "site.json", part="m/layer.1")
    assert (tmp_path / "site" / "site.json").exists() and not (tmp_path / ".t").exists()
