"""The steering evaluation on a tiny random model whose "concepts" are words.

Concept k is a word; a text's concept is the word it contains most often. Native directions are
the words' unembedding rows at the last block (adding them makes the model say the word);
transferred ones are those rows plus noise. No world training: the world-level figures are in
the slow test at the end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ShapeError
from engine.models.loading import load_model
from engine.steering.faithfulness import (
    DirectionSet,
    FaithfulnessRow,
    SteeringGrid,
    Trials,
    choose_site,
    evaluate_steering,
    shortlist,
)
from engine.steering.generate import typical_norm
from tests.steering.test_steering import one_thread, save_tiny_model  # noqa: F401  (one_thread: autouse fixture)

WORDS = ["red", "lion", "rain"]
NEUTRAL = ["the", "it was the", "and then the"]
HELDOUT = ["we", "there was a", "i think the"]


@pytest.fixture(scope="module")
def word_world(tmp_path_factory):
    model, tok = load_model(save_tiny_model("llama", tmp_path_factory.mktemp("llama")))
    ids = [tok.convert_tokens_to_ids(w) for w in WORDS]
    unembed = model.get_output_embeddings().weight.detach().numpy()[ids]  # (K, d)
    norm = typical_norm(model, tok, NEUTRAL + HELDOUT, layer=2)

    def scorer(text: str) -> int | None:
        counts = [text.split().count(w) for w in WORDS]
        best = max(counts)
        return None if best == 0 or counts.count(best) > 1 else counts.index(best)

    rng = np.random.default_rng(0)
    noisy = unembed / np.linalg.norm(unembed, axis=1, keepdims=True) + 0.3 * rng.normal(size=unembed.shape)
    sites = [
        DirectionSet("native", 2, unembed, norm),
        DirectionSet("transferred", 2, noisy, norm, map="good", method="ridge",
                     fit={"heldout_cosine_centred": 0.8, "heldout_r2": 0.7}),
        DirectionSet("transferred", 1, rng.normal(size=unembed.shape), norm, map="poor", method="procrustes",
                     fit={"heldout_cosine_centred": 0.2, "heldout_r2": 0.1}),
        DirectionSet("transferred", 0, rng.normal(size=unembed.shape), norm, map="worst", method="procrustes",
                     fit={"heldout_cosine_centred": 0.1, "heldout_r2": 0.0}),
    ]
    return model, tok, scorer, sites


def test_trials():
    t = Trials.every_concept(["a", "b"], 3)
    assert list(zip(t.prompts, t.targets)) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    o = Trials.towards_others([(f"p{i}", i % 4) for i in range(12)], 4, per_prompt=2)
    own = {f"p{i}": i % 4 for i in range(12)}
    assert len(o.prompts) == 24 and all(own[p] != k for p, k in zip(o.prompts, o.targets))
    assert sorted(np.bincount(o.targets)) == [6, 6, 6, 6]  # every concept a target equally often


def _row(kind, layer, s, f, ppl):
    return FaithfulnessRow(kind, "heldout", layer, s, f, ppl, 10)


def test_choose_site_prefers_faithful_then_weak_within_the_fluency_bound():
    cells = [_row("t", 1, 0.5, 0.6, 3.0), _row("t", 1, 1.0, 0.9, 9.0), _row("t", 2, 0.25, 0.7, 2.5),
             _row("t", 2, 0.75, 0.7, 2.9)]
    assert choose_site(cells, unsteered_ppl=2.0) == cells[2]  # 0.9 is too disfluent; tie → weaker
    assert choose_site(cells[1:2], unsteered_ppl=2.0) == cells[1]  # nothing fluent: the most fluent
    with pytest.raises(ShapeError):
        choose_site([], 1.0)


def test_shortlist_ranks_by_forward_fit(word_world):
    *_, sites = word_world
    assert [s.map for s in shortlist(sites[1:], 2)] == ["good", "poor"]
    assert [s.map for s in shortlist(sites[:0:-1], 3)] == ["good", "poor", "worst"]


def test_evaluate_steering(word_world):
    model, tok, scorer, sites = word_world
    other = [("the red red", 0), ("a lion", 1), ("the rain", 2)]
    rep = evaluate_steering(model, tok, scorer, sites, neutral_prompts=NEUTRAL, heldout_prompts=HELDOUT,
                            other_topic_prompts=other, grid=SteeringGrid((0.5, 2.0, 8.0), max_new_tokens=6),
                            quiet=True)
    neutral = [r for r in rep.rows if r.prompts == "neutral"]
    assert len(neutral) == 1 + len(sites) * 3 and all(r.n in (9,) for r in neutral)
    assert {r.prompts for r in rep.calibration} == {"heldout"}
    # shortlists of two per method: the one ridge map, the two Procrustes maps
    assert {r.map for r in rep.calibration if r.direction == "transferred"} == {"good", "poor", "worst"}
    chosen = {r.direction: r for r in neutral if r.chosen}
    assert set(chosen) == {"transferred", "native"} and sum(r.chosen for r in neutral) == 2
    per_method = [(r.direction, r.method) for r in neutral if r.chosen_for_method]
    assert sorted(per_method, key=str) == sorted([("transferred", "ridge"), ("transferred", "procrustes"),
                                                  ("native", None)], key=str)
    assert set(rep.chosen["by_method"]) == {"ridge", "procrustes"}
    assert rep.chosen["map"] == chosen["transferred"].map and rep.chosen["strength"] == chosen["transferred"].strength
    base = next(r for r in neutral if r.direction == "unsteered")
    best_native = max(r.faithfulness for r in neutral if r.direction == "native")
    assert best_native >= 0.6 > base.faithfulness  # the word directions do steer
    assert [r.direction for r in rep.rows if r.prompts == "other_topic"] == [
        "unsteered", "transferred", "transferred", "native"]
    assert rep.summary and rep.settings["n_concepts"] == 3
    with pytest.raises(ValueError, match="held-out prompts must not be evaluation prompts"):
        evaluate_steering(model, tok, scorer, sites, neutral_prompts=NEUTRAL, heldout_prompts=NEUTRAL[:1])
    with pytest.raises(ShapeError, match="native"):
        evaluate_steering(model, tok, scorer, sites[1:], neutral_prompts=NEUTRAL, heldout_prompts=HELDOUT)


def test_unsteered_cell_is_independent_of_the_sites(word_world):
    model, tok, scorer, sites = word_world
    from engine.steering.faithfulness import run_cell

    trials = Trials.every_concept(NEUTRAL, 3)
    a = run_cell(model, tok, trials, scorer, None, max_new_tokens=5)
    assert a.direction == "unsteered" and a.n == 9 and a.strength == 0.0
    with torch.no_grad():
        b = run_cell(model, tok, trials, scorer, None, max_new_tokens=5)
    assert a == b


def test_cells_of_several_strengths_equal_one_cell_per_strength(word_world):
    """`run_cells` batches every strength's trials together; each row equals `run_cell` at that strength."""
    from engine.steering.faithfulness import run_cell, run_cells

    model, tok, scorer, sites = word_world
    trials = Trials.every_concept(NEUTRAL, 3)
    together = run_cells(model, tok, trials, scorer, sites[0], (0.5, 2.0, 8.0), max_new_tokens=5)
    apart = [run_cell(model, tok, trials, scorer, sites[0], s, max_new_tokens=5) for s in (0.5, 2.0, 8.0)]
    assert [r.strength for r in together] == [0.5, 2.0, 8.0]
    for a, b in zip(together, apart):
        assert (a.faithfulness, a.n, a.layer) == (b.faithfulness, b.n, b.layer)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    assert len({r.perplexity for r in together}) > 1  # the strengths did differ
