"""The seeded document generator of ConceptWorld, and the topic-of-text scorer.

A document is about one dominant concept. It opens with a sentence whose slot words all belong to
that concept, and goes on with sentences drawn from topic-neutral templates whose slots are
filled with the concept's member words, except that each slot is, with a small probability, a
word of another concept. Templates carry no topic of their own, so the only way for a model to
predict the next content word is to remember the document's topic: the topic is a latent that
persists over the whole document, which is what makes a concept direction meaningful (docs/design.md §7).

Two-topic documents (the `medium` world; off when ``two_topic_share`` is 0): a share of the
documents also draws each body slot, with probability ``second_topic_prob``, from a second
concept. The opening sentence and most slots stay with the first concept, which is the
document's concept (its ground truth) in every evaluation; the second topic is noise a model
must learn to hold apart, as real documents mix subjects.

Everything is a pure function of the seed (Python's ``random.Random`` seeded with a string,
which is hashed with SHA-512 and so does not depend on ``PYTHONHASHSEED``): the same seed gives
the same bytes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.world.concepts import Concept, member_concepts

# (text, index of the document's concept in the world's concept list)
Document = tuple[str, int]

# Word-level tokens as the shared tokenizer sees them (the `Whitespace` pre-tokenizer's regex).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")
_WORD_RE = re.compile(r"[a-z]+")

OPENING_TEMPLATES: tuple[str, ...] = (
    "this is about the {0}.",
    "let me tell you about the {0}.",
    "today we talk about the {0} and the {1}.",
    "everyone has an opinion on the {0}.",
    "i want to write about the {0} and the {1}.",
    "the {0} is what this is all about.",
    "we are thinking about the {0} and the {1}.",
    "my favourite thing is the {0}.",
    "here are some notes on the {0}.",
    "it all started with a {0} and a {1}.",
)

BODY_TEMPLATES: tuple[str, ...] = (
    "the {0} was next to the {1}.",
    "i saw a {0} and a {1} yesterday.",
    "there is a {0} near the {1}.",
    "she likes the {0} more than the {1}.",
    "my friend bought a {0}.",
    "everyone remembers the old {0}.",
    "it was a {0}, not a {1}.",
    "he wrote a note about the {0}.",
    "we looked at the {0} for a long time.",
    "then the {0} came back.",
    "nobody could forget the {0}.",
    "later that day we found a {0}.",
    "the {0} and the {1} were both there.",
    "after that, the {0} seemed different.",
    "they asked me about the {0} again.",
    "a {0} is better than a {1}.",
    "i think the {0} is important.",
    "her brother always talks about the {0}.",
    "in the morning the {0} was quiet.",
    "we could see the {0} from the window.",
    "the small {0} was beside the big {1}.",
    "without the {0}, nothing would be the same.",
    "he pointed at the {0} and smiled.",
    "so we went back to the {0}.",
    "once again there was a {0}.",
    "the {0} made everyone happy.",
    "people came from far away to see the {0}.",
    "and then there was the {0} with the {1}.",
    "but the {0} was not like the {1}.",
    "of all things, the {0} is the one i know best.",
)

# Prompts made of function words only: they carry no topic (steering starts from them).
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "the",
    "a",
    "and the",
    "it was the",
    "there was a",
    "and then the",
    "but the",
    "so the",
    "then there was a",
    "it is a",
    "in the",
    "with the",
    "of all the",
    "and a",
    "we",
    "i think the",
)


def count_word_tokens(text: str) -> int:
    """Number of word-level tokens (words and punctuation runs) in ``text``."""
    return len(_TOKEN_RE.findall(text))


def _other(rng: random.Random, concept: int, n_concepts: int) -> int:
    """A uniformly drawn concept other than ``concept``."""
    k = rng.randrange(n_concepts - 1)
    return k if k < concept else k + 1


def _fill(template: str, rng: random.Random, concept: int, n_concepts: int,
          concepts: Sequence[Concept], mix_prob: float, second: int | None = None,
          second_prob: float = 0.0) -> str:
    words = []
    for _ in range(template.count("{")):
        k = concept
        if second is not None and rng.random() < second_prob:
            k = second
        elif mix_prob > 0 and rng.random() < mix_prob:
            k = rng.randrange(n_concepts - 1)
            k = k if k < concept else k + 1  # any concept but the dominant one
        words.append(rng.choice(concepts[k].members))
    return template.format(*words)


def generate_document(rng: random.Random, concept: int, concepts: Sequence[Concept],
                      max_tokens: int, mix_prob: float, second: int | None = None,
                      second_prob: float = 0.0) -> str:
    """One document about ``concepts[concept]``, at most ``max_tokens`` word-level tokens long.

    The target length is drawn between half and all of ``max_tokens``; sentences are added while
    they fit. With ``second``, each body slot holds a word of ``concepts[second]`` with
    probability ``second_prob`` (a two-topic document; the opening stays with ``concept``).
    """
    n = len(concepts)
    sentences = [_fill(rng.choice(OPENING_TEMPLATES), rng, concept, n, concepts, 0.0)]
    length = count_word_tokens(sentences[0])
    target = rng.randint(max_tokens // 2, max_tokens)
    while True:
        s = _fill(rng.choice(BODY_TEMPLATES), rng, concept, n, concepts, mix_prob, second, second_prob)
        t = count_word_tokens(s)
        if length + t > target:
            break
        sentences.append(s)
        length += t
    return " ".join(sentences)


@dataclass(frozen=True)
class TwoTopics:
    """How documents mix two topics (`medium`); the default mixes none and draws nothing."""

    share: float = 0.0  # share of documents with a second topic
    second_prob: float = 1 / 3  # chance that a body slot of such a document holds the second topic's word

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"two_topic_share must be in [0, 1], got {self.share}")
        if not 0 <= self.second_prob < 0.5:
            raise ValueError(f"second_topic_prob must be in [0, 0.5) so the first topic dominates, got {self.second_prob}")


def generate_documents(concepts: Sequence[Concept], n_docs: int, seed: int, stream: str,
                       max_tokens: int, mix_prob: float,
                       wrap: Callable[[Iterable[int]], Iterable[int]] | None = None,
                       two_topics: TwoTopics = TwoTopics()) -> list[Document]:
    """``n_docs`` documents, concepts balanced (round robin, then shuffled), from one seeded stream.

    ``stream`` names an independent random stream of the same seed ("train", "heldout", ...).
    ``wrap`` wraps the loop over documents (a progress bar); it does not change the output.
    ``two_topics.share`` of the documents get a second topic (drawn uniformly among the others);
    with share 0 no extra random number is drawn, so the stream is the one-topic stream.
    """
    rng = random.Random(f"conceptworld/{seed}/{stream}")
    order = [i % len(concepts) for i in range(n_docs)]
    rng.shuffle(order)
    loop = wrap(order) if wrap is not None else order
    out = []
    for k in loop:
        second = None
        if two_topics.share > 0 and rng.random() < two_topics.share:
            second = _other(rng, k, len(concepts))
        out.append((generate_document(rng, k, concepts, max_tokens, mix_prob, second, two_topics.second_prob), k))
    return out


@dataclass(frozen=True)
class Corpus:
    """The world's documents: a training split and a held-out split that shares no document."""

    train: list[Document]
    heldout: list[Document]


def make_corpus(concepts: Sequence[Concept], n_train: int, n_heldout_per_concept: int, seed: int,
                max_tokens: int, mix_prob: float,
                wrap: Callable[[Iterable[int], str], Iterable[int]] | None = None,
                two_topics: TwoTopics = TwoTopics()) -> Corpus:
    """Training and held-out documents; the held-out split is balanced and shares no text with training.

    ``wrap(iterable, stream_name)`` wraps each generation loop (a progress bar).
    """
    def w(stream: str):
        return None if wrap is None else (lambda it: wrap(it, stream))

    train = generate_documents(concepts, n_train, seed, "train", max_tokens, mix_prob, w("train"), two_topics)
    seen = {t for t, _ in train}
    candidates = generate_documents(concepts, 2 * n_heldout_per_concept * len(concepts), seed, "heldout",
                                    max_tokens, mix_prob, w("heldout"), two_topics)
    taken = [0] * len(concepts)
    heldout = []
    for text, k in candidates:
        if text not in seen and taken[k] < n_heldout_per_concept:
            heldout.append((text, k))
            taken[k] += 1
    return Corpus(train=train, heldout=heldout)


def documents_to_text(docs: Sequence[Document]) -> str:
    """Serialise documents as ``<concept index>\\t<text>`` lines (the bytes the determinism test compares)."""
    return "".join(f"{k}\t{t}\n" for t, k in docs)


def documents_from_text(text: str) -> list[Document]:
    """Inverse of `documents_to_text`."""
    out = []
    for line in text.splitlines():
        k, t = line.split("\t", 1)
        out.append((t, int(k)))
    return out


def first_sentence(text: str) -> str:
    """The document's first sentence, with its full stop."""
    end = text.find(".")
    return text if end < 0 else text[: end + 1]


def concept_counts(text: str, concepts: Sequence[Concept]) -> list[int]:
    """How many member words of each concept ``text`` contains (a shared word counts for each of its concepts)."""
    index = member_concepts(list(concepts))
    counts = [0] * len(concepts)
    for w in _WORD_RE.findall(text.lower()):
        for k in index.get(w, ()):
            counts[k] += 1
    return counts


def plurality_concept(text: str, concepts: Sequence[Concept]) -> int | None:
    """The concept with strictly the most member words in ``text`` (None on a tie or no member word)."""
    counts = concept_counts(text, concepts)
    best = max(counts)
    if best == 0 or counts.count(best) > 1:
        return None
    return counts.index(best)


def other_topic_prompts(heldout: Sequence[Document], per_concept: int) -> list[Document]:
    """First sentences of held-out documents, ``per_concept`` per concept: prompts that already have a topic."""
    taken: dict[int, int] = {}
    out = []
    for text, k in heldout:
        if taken.get(k, 0) < per_concept:
            out.append((first_sentence(text), k))
            taken[k] = taken.get(k, 0) + 1
    return out
