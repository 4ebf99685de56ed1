"""Configurations of the ConceptWorld sizes, and their fingerprint.

A world is a pure function of its `WorldConfig` and seed: the fingerprint hashes both, with the
concept table, the templates and `WORLD_FORMAT`, and names the folder the world is built in, so
any change to what would be built builds a new world instead of reusing a stale one. Bump
`WORLD_FORMAT` when the generator or the training loop changes what comes out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

from engine.world.concepts import Concept, concept_table
from engine.world.corpus import BODY_TEMPLATES, NEUTRAL_PROMPTS, OPENING_TEMPLATES, TwoTopics
from engine.world.train import ModelSpec

WORLD_FORMAT = 2
Size = Literal["tiny", "small", "medium"]
SIZES: tuple[str, ...] = ("tiny", "small", "medium")
MODEL_KEYS: tuple[str, ...] = ("foundation", "subject_a", "subject_b")

# File names inside a world folder.
MANIFEST = "manifest.json"
TRAIN_DOCS = "corpus/train.tsv"
HELDOUT_DOCS = "corpus/heldout.tsv"
DIRECTIONS_DIR = "directions"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides what a world contains (with the seed)."""

    size: Size
    n_concepts: int
    n_train_docs: int
    n_heldout_per_concept: int  # held-out documents: gates and ground-truth directions
    n_probe_per_concept: int  # training documents the linear probe is fitted on
    max_words: int  # word-level tokens per document: with <bos> and <eos> it fits 64 positions
    mix_prob: float  # chance that a slot holds a word of another concept
    bpe_vocab_size: int  # second tokenizer: below the word count, so member words split
    foundation: ModelSpec
    subject_a: ModelSpec
    subject_b: ModelSpec
    min_persistence: float  # the gate this size must pass
    # The harder world's options (`medium`); at their defaults a world is built exactly as before
    # they existed, and `to_dict` leaves them out, so tiny and small keep their fingerprints.
    n_shared_words: int = 0  # concept pairs (2i, 2i+1) that share one extra member word
    two_topic_share: float = 0.0  # share of documents with a second topic (engine.world.corpus.TwoTopics)
    second_topic_prob: float = 1 / 3  # chance that a body slot of a two-topic document holds the second topic

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        concept_table(self.n_concepts, self.n_shared_words)  # validates n_concepts and n_shared_words
        self.two_topics()  # validates the two-topic options
        if not 0 <= self.mix_prob < 0.5:
            raise ValueError(f"mix_prob must be in [0, 0.5) so the dominant concept dominates, got {self.mix_prob}")
        if self.max_words + 2 > self.foundation.max_length:
            raise ValueError(f"max_words={self.max_words} + <bos>/<eos> exceeds the foundation's "
                             f"max_length={self.foundation.max_length}")

    def spec(self, key: str) -> ModelSpec:
        if key not in MODEL_KEYS:
            raise ValueError(f"model key must be one of {MODEL_KEYS}, got {key!r}")
        return getattr(self, key)

    def concepts(self) -> list[Concept]:
        """The world's concept table (with its shared member words)."""
        return concept_table(self.n_concepts, self.n_shared_words)

    def two_topics(self) -> TwoTopics:
        return TwoTopics(self.two_topic_share, self.second_topic_prob)

    def to_dict(self) -> dict:
        """Every field, except the harder world's options where they are at their defaults."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _OPTIONAL_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        d = dict(d)
        for key in MODEL_KEYS:
            d[key] = ModelSpec.from_dict(d[key])
        return cls(**d)


def tiny_config() -> WorldConfig:
    """`tiny`: 10 concepts, three models trained in well under two minutes on 2 cores (tests)."""
    return WorldConfig(
        size="tiny",
        n_concepts=10,  # fewer concepts learn in fewer steps (the issue allows 8-12)
        n_train_docs=4000,  # generation is instant; more documents than the 800x16 the models see
        n_heldout_per_concept=30,  # 300 held-out documents: gate figures to within a few points
        n_probe_per_concept=40,
        max_words=62,
        mix_prob=0.1,
        bpe_vocab_size=500,  # ~half of the 120 member words split into several pieces
        # 2x64 GPT-2 at lr 5e-3 learns the topic in ~600 steps (docs/design.md §7); 800 gives a margin.
        foundation=ModelSpec("gpt2", d_model=64, n_layers=2, n_heads=4, seed=0, steps=800, batch_size=16,
                             lr=5e-3, max_length=64),
        # Deeper and narrower than the foundation: at lr 5e-3 a 3x48 Llama still has not found the
        # topic at 600 steps (persistence 0.0); at 1e-2 it has (1.0).
        subject_a=ModelSpec("llama", d_model=48, n_layers=3, n_heads=4, seed=1, steps=800, batch_size=16,
                            lr=1e-2, max_length=64),
        # BPE documents are ~1.2x longer in tokens: 128 positions hold the longest.
        subject_b=ModelSpec("gpt_neox", d_model=64, n_layers=2, n_heads=4, seed=2, steps=800, batch_size=16,
                            lr=5e-3, max_length=128),
        min_persistence=0.6,
    )


def small_config() -> WorldConfig:
    """`small`: 32 concepts, three wider models trained in under ten minutes (demo, benchmarks).

    Step counts come from learning curves on held-out documents (32 concepts, batch 16): the
    3x96 GPT-2 kept the topic in 99.7% of continuations after 500 steps; a 2x128 Llama in 99.5%
    after 500 (a 3x64 Llama at lr 1e-2 still had 3% after 1,000); the 2x80 GPT-NeoX on BPE
    tokens 83% after 500, 95% after 1,000 and 97.5% after 1,500.
    """
    return WorldConfig(
        size="small",
        n_concepts=32,  # the default K of docs/design.md §7
        n_train_docs=20000,  # 2,000 steps x 16 see each document ~1.6 times
        n_heldout_per_concept=25,  # 800 held-out documents
        n_probe_per_concept=40,
        max_words=62,
        mix_prob=0.1,
        bpe_vocab_size=800,  # ~56% of the 384 member words split into pieces
        foundation=ModelSpec("gpt2", d_model=96, n_layers=3, n_heads=4, seed=0, steps=2000, batch_size=16,
                             lr=5e-3, max_length=64),
        # Shallower and wider than the foundation: Llamas of width 64 sit on a plateau for
        # 1,000+ steps before they find the topic; width 128 finds it within 500.
        subject_a=ModelSpec("llama", d_model=128, n_layers=2, n_heads=4, seed=1, steps=2000, batch_size=16,
                            lr=5e-3, max_length=64),
        subject_b=ModelSpec("gpt_neox", d_model=80, n_layers=2, n_heads=4, seed=2, steps=2000, batch_size=16,
                            lr=5e-3, max_length=128),
        min_persistence=0.8,
    )


_OPTIONAL_FIELDS = ("n_shared_words", "two_topic_share", "second_topic_prob")


def medium_config() -> WorldConfig:
    """`medium`: 128 concepts, two-topic documents and shared member words (a harder benchmark).

    32 hand-written concepts would leave the evaluations saturated (MRR 1.000 at `small`); here
    the 34 hand-written concepts are followed by 94 generated ones (made-up member words), 32
    concept pairs share a member word, and 30% of documents carry a second topic in a third of
    their body slots. Not built in CI (about half an hour on 2 cores; README).

    Model widths are the `small` ones; steps are scaled from `small`'s learning curves by
    documents seen per concept: the slowest `small` model (GPT-NeoX on BPE) kept the topic in 95%
    of continuations after ~500 documents per concept (1,000 steps x 16 / 32 concepts), so 4,000
    steps x 16 / 128 concepts gives each concept the same 500.
    """
    return WorldConfig(
        size="medium",
        n_concepts=128,  # the issue's >= 128: 34 hand-written, 94 generated
        n_train_docs=40000,  # 4,000 steps x 16 see each document ~1.6 times, as in `small`
        n_heldout_per_concept=12,  # 1,536 held-out documents: directions from 12 documents per concept
        n_probe_per_concept=20,
        max_words=62,
        mix_prob=0.1,
        bpe_vocab_size=1200,  # below the ~1,600 member words, so many split into pieces
        foundation=ModelSpec("gpt2", d_model=96, n_layers=3, n_heads=4, seed=0, steps=4000, batch_size=16,
                             lr=5e-3, max_length=64),
        subject_a=ModelSpec("llama", d_model=128, n_layers=2, n_heads=4, seed=1, steps=4000, batch_size=16,
                            lr=5e-3, max_length=64),
        subject_b=ModelSpec("gpt_neox", d_model=80, n_layers=2, n_heads=4, seed=2, steps=4000, batch_size=16,
                            lr=5e-3, max_length=128),
        min_persistence=0.6,  # a third of a two-topic document's slots are another topic's
        n_shared_words=32,  # half the concepts share one member word with a neighbour
        two_topic_share=0.3,
        second_topic_prob=1 / 3,
    )


def config_for(size: str) -> WorldConfig:
    """The default configuration of a world size."""
    if size == "tiny":
        return tiny_config()
    if size == "small":
        return small_config()
    if size == "medium":
        return medium_config()
    raise ValueError(f"unknown world size {size!r}; choose one of {SIZES}")


def fingerprint(config: WorldConfig, seed: int) -> str:
    """12 hex digits that change whenever anything that decides the world's content changes."""
    concepts = [[c.name, c.label, c.description, list(c.members)] for c in config.concepts()]
    payload = {
        "format": WORLD_FORMAT,
        "seed": seed,
        "config": config.to_dict(),
        "concepts": concepts,
        "templates": [OPENING_TEMPLATES, BODY_TEMPLATES, NEUTRAL_PROMPTS],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
