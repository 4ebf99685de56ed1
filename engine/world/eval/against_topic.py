"""Steering against a topic on ConceptWorld: glue between a world and `engine.steering.against`.

Prompts are first sentences of the world's held-out documents (every slot a word of the
document's concept, so each prompt has a topic); each is steered towards other concepts. The
directions are those of `atlas eval steering`: transferred (the world atlas's concept vectors
through the subject's maps, per layer the map with the best held-out forward fit) and native
(the subject's own centred topic means); the scorer is the world's plurality-concept reader.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.steering.against import DEFAULT_GRID, AgainstTopicReport, evaluate_against_topic
from engine.steering.faithfulness import SteeringGrid
from engine.store.store import Store
from engine.world.corpus import other_topic_prompts
from engine.world.eval.steering import world_maps, world_sites
from engine.world.locate import ensure_registered, subject_key

PROMPTS_PER_CONCEPT = 10  # half for validation, half for test: 5 + 5 per concept


def evaluate_world_against_topic(
    store: Store, size: str = "small", seed: int = 0, *, subject: str = "a", grid: SteeringGrid = DEFAULT_GRID,
    layers: Sequence[int] | None = None, prompts_per_concept: int = PROMPTS_PER_CONCEPT, quiet: bool = False,
    device: str = "cpu", dtype: str = "float32",
) -> AgainstTopicReport:
    """The against-topic table of `atlas eval steering --world` (see `engine.steering.against`).

    Maps are found or fitted as by `evaluate_world_steering` (Procrustes and ridge at each of
    ``layers``, default all); edited layer sets are each layer alone and all of ``layers`` at once.
    """
    from engine.models.activations import auto_threads, torch_threads
    from engine.models.loading import load_model

    key = subject_key(subject)
    world = ensure_registered(store, size, seed)
    maps = world_maps(store, world, key, layers, quiet=quiet, device=device, dtype=dtype)
    model, tok = load_model(world.model(key).path, device=device, dtype=dtype)
    prompts = other_topic_prompts(world.heldout_docs, per_concept=prompts_per_concept)
    with torch_threads(auto_threads(model)):
        report = evaluate_against_topic(
            model, tok, world.plurality_concept, world_sites(store, world, key, maps), prompts,
            n_concepts=len(world.concepts), grid=grid, quiet=quiet,
        )
    report.settings.update(world=world.name, subject=world.model(key).name, atlas=world.atlas_name)
    return report
