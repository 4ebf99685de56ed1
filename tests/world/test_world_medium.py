"""The `medium` world's generator rules, on data only (no training): >= 128 distinct concepts,
member words shared by two concepts, two-topic documents, determinism, and tiny/small untouched."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from engine.world.concepts import CONCEPTS, concept_table, shared_member_words
from engine.world.config import WorldConfig, config_for, fingerprint
from engine.world.corpus import (
    BODY_TEMPLATES,
    NEUTRAL_PROMPTS,
    OPENING_TEMPLATES,
    TwoTopics,
    concept_counts,
    documents_to_text,
    generate_documents,
    make_corpus,
    plurality_concept,
)

MEDIUM = config_for("medium")


@pytest.fixture(scope="module")
def concepts():
    return MEDIUM.concepts()


@pytest.fixture(scope="module")
def docs(concepts):
    return generate_documents(concepts, 1000, seed=5, stream="train", max_tokens=MEDIUM.max_words,
                              mix_prob=MEDIUM.mix_prob, two_topics=MEDIUM.two_topics())


def test_medium_has_at_least_128_distinct_concepts(concepts):
    assert len(concepts) >= 128
    assert len({c.name for c in concepts}) == len(concepts)
    assert len({c.label for c in concepts}) == len(concepts)  # the atlas matches concepts by label
    assert len({frozenset(c.members) for c in concepts}) == len(concepts)
    templates = {w for t in OPENING_TEMPLATES + BODY_TEMPLATES + NEUTRAL_PROMPTS for w in re.findall(r"[a-z]+", t)}
    for c in concepts:
        assert len(c.members) >= 10 and len(set(c.members)) == len(c.members), c.name
        assert all(re.fullmatch(r"[a-z]+", w) for w in c.members), c.name
        assert not templates & set(c.members), c.name
    assert concepts[: len(CONCEPTS)] != list(CONCEPTS)  # the first 64 carry their shared words
    assert [c.name for c in concepts[: len(CONCEPTS)]] == [c.name for c in CONCEPTS]


def test_shared_words_belong_to_exactly_the_stated_pairs(concepts):
    shared = shared_member_words(concepts)
    assert len(shared) == MEDIUM.n_shared_words == 32
    assert sorted(shared.values()) == [(2 * i, 2 * i + 1) for i in range(32)]
    counts = Counter(w for c in concepts for w in c.members)
    assert {w for w, n in counts.items() if n > 1} == set(shared)
    assert max(counts.values()) == 2
    # the reader counts a shared word for both of its concepts
    w = next(w for w, ks in shared.items() if ks == (0, 1))
    c = concept_counts(f"the {w} and the {w}.", concepts)
    assert c[0] == c[1] == 2 and sum(c) == 4
    assert plurality_concept(f"the {w}.", concepts) is None  # a tie
    assert plurality_concept(f"the {w} and the {concepts[1].members[0]}.", concepts) == 1


def test_generator_is_deterministic(concepts):
    assert MEDIUM.concepts() == concepts and concept_table(128, 32) == concepts
    assert concept_table(130)[:128] == concept_table(128)  # a fixed stream: prefixes agree
    a = make_corpus(concepts, 400, 2, seed=3, max_tokens=62, mix_prob=0.1, two_topics=MEDIUM.two_topics())
    b = make_corpus(concepts, 400, 2, seed=3, max_tokens=62, mix_prob=0.1, two_topics=MEDIUM.two_topics())
    c = make_corpus(concepts, 400, 2, seed=4, max_tokens=62, mix_prob=0.1, two_topics=MEDIUM.two_topics())
    assert documents_to_text(a.train + a.heldout).encode() == documents_to_text(b.train + b.heldout).encode()
    assert documents_to_text(a.train) != documents_to_text(c.train)


def _runner_up(text, k, concepts):
    counts = np.asarray(concept_counts(text, concepts))
    counts[k] = -1
    return int(counts.max())


def test_two_topic_documents_have_their_share_and_keep_the_first_topic(docs, concepts):
    one_topic = generate_documents(concepts, 1000, seed=5, stream="train", max_tokens=MEDIUM.max_words,
                                   mix_prob=MEDIUM.mix_prob)
    # A second topic fills a third of the ~7 body slots of 30% of the documents: two or more
    # words of one other concept, which the 10% noise spread over 127 concepts rarely gives.
    mixed = np.asarray([_runner_up(t, k, concepts) for t, k in docs])
    noise = np.asarray([_runner_up(t, k, concepts) for t, k in one_topic])
    assert np.mean(noise >= 2) < 0.08 and np.mean(mixed >= 2) > 0.15
    assert np.mean(mixed >= 3) > 5 * np.mean(noise >= 3)
    # the ground truth (first topic: the opening and most slots) is the plurality concept
    assert np.mean([plurality_concept(t, concepts) == k for t, k in docs]) > 0.9
    assert Counter(k for _, k in docs) == Counter(i % 128 for i in range(1000))  # still balanced


def test_two_topic_options_validate_and_default_to_off():
    with pytest.raises(ValueError, match="two_topic_share"):
        TwoTopics(1.5)
    with pytest.raises(ValueError, match="second_topic_prob"):
        TwoTopics(0.3, 0.5)
    with pytest.raises(ValueError, match="n_shared_words"):
        WorldConfig.from_dict({**config_for("tiny").to_dict(), "n_shared_words": 6})
    for size in ("tiny", "small"):  # the options are left out of the fingerprint's config at their defaults
        d = config_for(size).to_dict()
        assert not {"n_shared_words", "two_topic_share", "second_topic_prob"} & set(d)
    d = MEDIUM.to_dict()
    assert d["two_topic_share"] == 0.3 and d["n_shared_words"] == 32
    assert WorldConfig.from_dict(d) == MEDIUM and fingerprint(WorldConfig.from_dict(d), 0) == fingerprint(MEDIUM, 0)


def test_share_zero_draws_the_one_topic_stream(concepts):
    """With no second topic the generator consumes the same random numbers as before the option existed."""
    tiny = config_for("tiny").concepts()
    a = generate_documents(tiny, 200, seed=1, stream="train", max_tokens=62, mix_prob=0.1)
    b = generate_documents(tiny, 200, seed=1, stream="train", max_tokens=62, mix_prob=0.1, two_topics=TwoTopics(0.0))
    assert a == b
    c = generate_documents(tiny, 200, seed=1, stream="train", max_tokens=62, mix_prob=0.1, two_topics=TwoTopics(0.3))
    assert a != c
