"""Steering against a topic on a hand-made model of the tiny ConceptWorld's recipe: the table's structure and rules.

Real model, real generation: the validation and test prompts are disjoint, every choice keeps
the fluency guard, and an edit at several layers at once really edits each of them. Nothing is
trained: the model is subject A's architecture, freshly initialised (`engine.world.train.make_model`),
on the tiny world's corpus and word tokenizer; its directions are that model's native concept
directions (centred topic means over held-out documents). The table's structure and its rules do
not depend on how well the model learnt the topics; the world evaluation with trained models and
transferred directions runs in tests/steering/test_steering_world.py (slow).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.errors import BadValueError, ShapeError
from engine.models.hooks import residual_hooks
from engine.steering.against import (
    GUARDS,
    check_options,
    default_layer_sets,
    evaluate_against_topic,
    guard_perplexity,
    run_layers_cell,
    run_layers_cells,
    split_prompts,
)
from engine.steering.edits import SteeringEdit, steer
from engine.steering.faithfulness import DirectionSet, SteeringGrid, Trials
from engine.steering.generate import typical_norm
from engine.world.config import config_for
from engine.world.corpus import make_corpus, other_topic_prompts, plurality_concept
from engine.world.directions import concept_directions
from engine.world.tokenizers import train_word_tokenizer
from engine.world.train import make_model
from tests.steering.test_steering import one_thread  # noqa: F401  (autouse fixture)


@dataclasses.dataclass
class HandMadeWorld:
    """What these tests read of a world: its concepts, held-out documents and plurality scorer."""

    concepts: list
    heldout_docs: list

    def plurality_concept(self, text: str) -> int | None:
        return plurality_concept(text, self.concepts)


@pytest.fixture(scope="module")
def world():
    """The tiny world's concepts and held-out documents (generated, never trained on)."""
    config = config_for("tiny")
    concepts = config.concepts()
    corpus = make_corpus(concepts, n_train=400, n_heldout_per_concept=8, seed=0, max_tokens=config.max_words,
                         mix_prob=config.mix_prob)
    return HandMadeWorld(concepts, corpus.heldout), corpus


@pytest.fixture(scope="module")
def subject(world):
    world, corpus = world
    config = config_for("tiny")
    tok = train_word_tokenizer([t for t, _ in corpus.train + corpus.heldout], max_length=config.subject_a.max_length)
    model = make_model(config.subject_a, tok, seed=1).eval()
    texts = [t for t, _ in world.heldout_docs[:40]]
    layers = list(range(config.subject_a.n_layers))
    with torch.no_grad():
        directions = concept_directions(model, tok, world.heldout_docs, len(world.concepts), layers)
    sites = []
    for layer in layers:
        dirs = np.asarray(directions[layer])
        norm = typical_norm(model, tok, texts, layer)
        sites.append(DirectionSet("native", layer, dirs, norm))
        # a second kind from the same directions, so both kinds of the table are exercised
        sites.append(DirectionSet("transferred", layer, dirs, norm, map=f"m{layer}", method="ridge"))
    return world, model, tok, sites


def test_split_is_disjoint_and_covers_every_concept(world):
    world, _ = world
    prompts = other_topic_prompts(world.heldout_docs, per_concept=6)
    val, test = split_prompts(prompts + prompts[:5])  # duplicates land on one side only
    assert not {t for t, _ in val} & {t for t, _ in test}
    assert {k for _, k in val} == {k for _, k in test} == set(range(len(world.concepts)))
    assert len(val) + len(test) == len({t for t, _ in prompts})


def test_several_layers_are_each_edited(subject):
    """Clamp at layers 0 and 2 at once: the projection on each layer's direction is the target at
    both edited layers (read after the edit by the same residual hook), not at layer 1."""
    world, model, tok, sites = subject
    u = {v: s.directions[3] / np.linalg.norm(s.directions[3]) for s in sites if s.kind == "native"
         for v in [s.layer]}
    edits = [SteeringEdit(v, u[v], 0.7, 5.0, "clamp") for v in (0, 2)]
    ids = torch.tensor([tok("this is about the lion.")["input_ids"]])
    seen: dict[int, torch.Tensor] = {}

    def read(layer, h):
        seen[layer] = h.detach().clone()

    with steer(model, edits, "all"), residual_hooks(model, {0: read, 1: read, 2: read}, prepend=False):
        model(input_ids=ids)
    steered = dict(seen)
    with residual_hooks(model, {0: read, 1: read, 2: read}):
        model(input_ids=ids)
    for v in (0, 2):
        proj = steered[v][0] @ torch.from_numpy(u[v]).float()  # (T,)
        assert torch.allclose(proj, torch.full_like(proj, 3.5), atol=1e-4)  # 0.7 x norm 5
        assert not torch.allclose(seen[v][0] @ torch.from_numpy(u[v]).float(), proj, atol=1e-2)
    assert not torch.allclose(steered[1][0] @ torch.from_numpy(u[2]).float(), torch.full((ids.shape[1],), 3.5),
                              atol=1e-2)


def test_table_structure_and_rules(subject):
    world, model, tok, sites = subject
    prompts = other_topic_prompts(world.heldout_docs, per_concept=2)
    sets = [(2,), (1, 2)]
    rep = evaluate_against_topic(model, tok, world.plurality_concept, sites, prompts, n_concepts=len(world.concepts),
                                 grid=SteeringGrid((0.25, 1.0), ("add", "clamp"), ("all", "new"), max_new_tokens=6),
                                 layer_sets=sets, per_prompt=1, quiet=True)
    val, test = rep.table("validation"), rep.table("test")
    n_val, n_test = rep.settings["n_validation_prompts"], rep.settings["n_test_prompts"]
    assert n_val + n_test == len({t for t, _ in prompts}) and n_val == n_test == len(world.concepts)
    # the whole grid on validation, and one unsteered row per split
    assert len([r for r in val if r.direction != "unsteered"]) == 2 * 2 * 2 * len(sets) * 2
    assert [r.direction for r in val + test].count("unsteered") == 2
    assert {r.n for r in val} == {n_val} and {r.n for r in test} == {n_test}
    # one chosen test row per (kind, mode, positions, one/several layers, guard), one headline per kind and guard
    chosen = [r for r in test if r.chosen]
    assert len(chosen) == 2 * 2 * 2 * 2 * len(GUARDS) == len(rep.chosen)
    assert {(r.direction, r.mode, r.positions, r.n_layers > 1, r.guard) for r in chosen} == {
        (k, m, p, many, g) for k in ("transferred", "native") for m in ("add", "clamp") for p in ("all", "new")
        for many in (False, True) for g in GUARDS}
    assert sorted((r.direction, r.guard) for r in test if r.headline) == sorted(
        (k, g) for k in ("transferred", "native") for g in GUARDS)
    # the fluency guard: each choice is the most faithful validation cell within 2x the unsteered
    # perplexity under its guard (or the most fluent cell when none is)
    base = next(r for r in val if r.direction == "unsteered")
    for key, c in rep.chosen.items():
        kind, mode, pos, many, guard = key.split("/")
        group = [r for r in val if (r.direction, r.mode, r.positions) == (kind, mode, pos)
                 and (r.n_layers > 1) == (many == "several")]
        ok = [r for r in group if guard_perplexity(r, guard) <= 2 * guard_perplexity(base, guard)]
        pick = next(r for r in group if list(r.layers) == c["layers"] and r.strength == c["strength"])
        if ok:
            assert guard_perplexity(pick, guard) <= 2 * guard_perplexity(base, guard)
            assert pick.faithfulness == max(r.faithfulness for r in ok)
        else:
            assert guard_perplexity(pick, guard) == min(guard_perplexity(r, guard) for r in group)
    # the test rows are measured on the test prompts: the same cell differs from its validation twin
    twin = {(r.direction, r.mode, r.positions, r.layers, r.strength): r for r in val}
    assert any(dataclasses.astuple(twin[(r.direction, r.mode, r.positions, r.layers, r.strength)])[6:8]
               != dataclasses.astuple(r)[6:8] for r in chosen)
    assert len(rep.summary) == len(GUARDS)


def test_bad_options():
    assert default_layer_sets([2, 0, 1]) == [(0,), (1,), (2,), (0, 1, 2)]
    for args in ((["bogus"], ["all"], [1.0]), (["add"], ["some"], [1.0]), (["add"], ["all"], [0.0]),
                 (["add"], ["all"], [float("nan")]), ([], ["all"], [1.0])):
        with pytest.raises(BadValueError):
            check_options(*args)
    with pytest.raises(ShapeError, match="two distinct prompts"):
        evaluate_against_topic(None, None, lambda t: None, [], [("a", 0)], n_concepts=2)


@pytest.mark.parametrize("positions", ["all", "new"])
def test_cells_of_several_strengths_equal_one_cell_per_strength(subject, positions):
    """`run_layers_cells` batches every strength's trials together (per-row strengths at each
    edited layer); each row equals `run_layers_cell` at that strength."""
    world, model, tok, sites = subject
    val, _ = split_prompts(other_topic_prompts(world.heldout_docs, per_concept=2))
    trials = Trials.towards_others(val, len(world.concepts), per_prompt=1)
    at = [s for s in sites if s.kind == "native" and s.layer in (1, 2)]
    together = run_layers_cells(model, tok, trials, world.plurality_concept, at, (0.25, 1.0), mode="clamp",
                                positions=positions, max_new_tokens=5)
    apart = [run_layers_cell(model, tok, trials, world.plurality_concept, at, s, mode="clamp", positions=positions,
                             max_new_tokens=5) for s in (0.25, 1.0)]
    for a, b in zip(together, apart):
        assert (a.strength, a.faithfulness, a.n, a.layers) == (b.strength, b.faithfulness, b.n, b.layers)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
        assert a.perplexity_alone == pytest.approx(b.perplexity_alone, rel=1e-5)
    assert together[0].perplexity != together[1].perplexity
