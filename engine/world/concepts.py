"""The concept table of ConceptWorld: what the world is about.

Each concept is a topic a document can be about: a short name (the key used everywhere), a
readable label, a one-line description, and member words (real, lower-case English words). No
member word belongs to two concepts and none is a template word of the corpus, so the topic of
any text can be read back by counting member words (`engine.world.corpus.plurality_concept`).

Beyond the hand-written rows (the `medium` world needs 128 concepts), `concept_table` appends
generated concepts whose member words are pronounceable made-up words drawn from a fixed seed
(`_generated_concepts`): distinct from every other member word and every template word, and the
same on every machine. With ``n_shared`` > 0, concept pairs ``(2i, 2i+1)`` for ``i < n_shared``
each get one extra made-up member word that belongs to both of them: a text's topic is then no
longer readable from any single word (the reader counts a shared word for both concepts).

The table is ordered on purpose: a world with ``n`` concepts uses the first ``n`` rows, so the
`tiny` world's concepts are the first rows of the `small` world's, and they are the most
distinct ones (a colour, an animal, the weather, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Concept:
    """One concept of the world: a document topic with its member words."""

    name: str
    label: str
    description: str
    members: tuple[str, ...]


def _c(name: str, label: str, description: str, members: str) -> Concept:
    return Concept(name, label, description, tuple(members.split()))


CONCEPTS: tuple[Concept, ...] = (
    _c("colour", "Colours", "Names of colours and shades.",
       "red blue green yellow purple violet crimson scarlet turquoise magenta indigo maroon"),
    _c("animal", "Wild animals", "Wild mammals of forests and plains.",
       "lion tiger elephant giraffe zebra wolf bear monkey rabbit deer fox leopard"),
    _c("weather", "Weather", "Rain, wind, storms and other weather.",
       "rain snow storm thunder wind cloud fog hail drizzle lightning sunshine breeze"),
    _c("music", "Music", "Musical instruments, songs and performances.",
       "guitar piano violin drum melody song chord rhythm trumpet flute orchestra concert"),
    _c("fruit", "Fruit", "Fruits that people eat.",
       "apple banana cherry grape lemon mango peach pear plum strawberry melon apricot"),
    _c("space", "Outer space", "Planets, stars and space travel.",
       "planet star moon comet galaxy orbit rocket astronaut telescope asteroid nebula satellite"),
    _c("medicine", "Medicine", "Doctors, hospitals, illness and treatment.",
       "doctor nurse hospital fever medicine patient clinic vaccine surgeon bandage pill injury"),
    _c("computing", "Computing", "Computers, software and networks.",
       "computer software keyboard screen program server database laptop algorithm network password browser"),
    _c("ocean", "The sea shore", "Waves, tides, beaches and reefs.",
       "wave tide shore coral reef beach sand seaweed lagoon surf seashell dune"),
    _c("clothing", "Clothing", "Garments and things people wear.",
       "shirt coat jacket hat scarf boot sock dress glove sweater trousers skirt"),
    _c("vegetable", "Vegetables", "Vegetables grown and cooked.",
       "carrot potato onion cabbage lettuce spinach broccoli celery cucumber turnip radish pumpkin"),
    _c("sport", "Team sports", "Football, tennis and other competitive sports.",
       "football tennis goal referee stadium player match team trophy basketball coach tournament"),
    _c("law", "Law and courts", "Judges, trials and the legal system.",
       "judge court lawyer trial verdict jury witness lawsuit attorney evidence prison appeal"),
    _c("garden", "Gardening", "Flowers, soil and work in a garden.",
       "flower rose tulip seed soil weed hedge lawn blossom daisy compost shovel"),
    _c("vehicle", "Cars and roads", "Cars, trucks and driving.",
       "car truck wheel engine tyre brake garage driver highway fuel motor van"),
    _c("furniture", "Furniture", "Chairs, tables and other furniture.",
       "chair table sofa bed desk shelf drawer cabinet stool couch wardrobe bench"),
    _c("emotion", "Emotions", "Feelings such as joy, anger and fear.",
       "joy anger fear sadness grief delight anxiety pride shame envy sorrow hope"),
    _c("metal", "Metals", "Metals and alloys.",
       "iron copper gold silver steel bronze zinc nickel platinum brass titanium cobalt"),
    _c("tree", "Trees and forests", "Kinds of trees and parts of trees.",
       "oak pine maple birch willow cedar elm spruce forest bark branch trunk"),
    _c("bird", "Birds", "Birds of the air and the water.",
       "eagle sparrow owl robin crow parrot hawk pigeon swan duck falcon feather"),
    _c("insect", "Insects", "Insects and other small crawling creatures.",
       "bee ant beetle butterfly moth wasp mosquito spider ladybird caterpillar termite dragonfly"),
    _c("school", "School", "Teachers, pupils, lessons and exams.",
       "teacher student classroom lesson homework exam pupil chalk school grade textbook headmaster"),
    _c("finance", "Money and banking", "Banks, prices, loans and taxes.",
       "bank money loan coin dollar price profit budget tax debt investor salary"),
    _c("mountain", "Mountains", "Peaks, cliffs, valleys and climbing.",
       "mountain peak summit cliff valley ridge glacier slope climber rock canyon boulder"),
    _c("farm", "Farming", "Farm animals, crops and farm work.",
       "farmer tractor barn cow sheep pig hay wheat plough harvest goat pasture"),
    _c("city", "The city", "Streets, towers and city life.",
       "street tower bridge building avenue subway traffic skyscraper apartment sidewalk downtown plaza"),
    _c("theatre", "Theatre and film", "Actors, stages, plays and films.",
       "actor stage audience curtain script film cinema ticket applause rehearsal costume comedy"),
    _c("art", "Painting and art", "Painters, canvases and galleries.",
       "painter canvas brush paint portrait sculpture gallery easel sketch museum palette mural"),
    _c("literature", "Books and poetry", "Books, novels, poems and their authors.",
       "book novel poem author chapter library page poet story reader verse publisher"),
    _c("kitchen", "Kitchen tools", "Pots, pans and tools for cooking.",
       "oven pan stove kettle spoon ladle whisk skillet spatula saucepan fork teapot"),
    _c("aviation", "Aviation", "Aircraft, pilots and airports.",
       "airplane pilot airport runway wing jet cockpit flight helicopter hangar propeller airline"),
    _c("baking", "Baking", "Bread, cakes and what bakers use.",
       "bread cake flour dough pie cookie muffin baker butter sugar loaf crust"),
    _c("chemistry", "Chemistry", "Atoms, molecules and the laboratory.",
       "acid molecule atom element laboratory beaker chemical reaction compound formula oxygen hydrogen"),
    _c("sailing", "Sailing", "Boats, ships and their crews.",
       "boat ship sail anchor captain deck mast sailor harbour voyage crew oar"),
)


MAX_CONCEPTS = 256  # hand-written rows, then generated ones
_MEMBERS_PER_GENERATED = 12  # as many member words as a hand-written concept
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl", "st",
           "tr", "sk")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "k")


def _reserved_words() -> set[str]:
    """Words no generated member may be: every hand-written member (that none is a template word
    of the corpus is checked by tests/world/test_world_medium.py: the stream is fixed)."""
    return {w for c in CONCEPTS for w in c.members}


def _made_up_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new pronounceable words of two or three syllables, none in ``taken`` (which grows)."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.choice((2, 2, 3))))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@functools.lru_cache(maxsize=1)
def _generated_concepts() -> tuple[Concept, ...]:
    """Concepts after the hand-written ones, up to `MAX_CONCEPTS`; a fixed stream, so prefixes agree."""
    rng = random.Random("conceptworld/generated-concepts/v1")
    taken = _reserved_words()
    out = []
    for i in range(len(CONCEPTS), MAX_CONCEPTS):
        members = tuple(_made_up_words(rng, _MEMBERS_PER_GENERATED, taken))
        out.append(Concept(f"topic{i:03d}", f"Topic {i}: {members[0]}",
                           f"Made-up topic {i}: {members[0]}, {members[1]}, {members[2]} and the like.", members))
    return tuple(out)


def _shared_words(n_shared: int) -> list[str]:
    """One made-up word per shared pair, from its own fixed stream (never a member of any concept)."""
    taken = _reserved_words() | {w for c in _generated_concepts() for w in c.members}
    return _made_up_words(random.Random("conceptworld/shared-words/v1"), n_shared, taken)


def concept_table(n: int, n_shared: int = 0) -> list[Concept]:
    """The first ``n`` concepts (a world's concepts): hand-written rows first, then generated ones.

    ``n_shared`` pairs ``(2i, 2i+1)`` each get one extra member word that both of them have. With
    ``n <= len(CONCEPTS)`` and ``n_shared == 0`` this is exactly the hand-written table's prefix.
    """
    if not 2 <= n <= MAX_CONCEPTS:
        raise ValueError(f"n_concepts must be between 2 and {MAX_CONCEPTS}, got {n}")
    if not 0 <= n_shared <= n // 2:
        raise ValueError(f"n_shared_words must be between 0 and n_concepts // 2 = {n // 2}, got {n_shared}")
    table = list(CONCEPTS[:n]) + list(_generated_concepts()[: max(0, n - len(CONCEPTS))])
    for i, w in enumerate(_shared_words(n_shared)):
        for k in (2 * i, 2 * i + 1):
            table[k] = dataclasses.replace(table[k], members=table[k].members + (w,))
    return table


def shared_member_words(concepts: list[Concept]) -> dict[str, tuple[int, ...]]:
    """Member words that belong to more than one of ``concepts``, with the indices of those concepts."""
    return {w: ks for w, ks in member_concepts(concepts).items() if len(ks) > 1}


def member_concepts(concepts: list[Concept]) -> dict[str, tuple[int, ...]]:
    """Map each member word to the indices of every concept in ``concepts`` that has it."""
    out: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(concepts):
        for w in c.members:
            out[w] = out.get(w, ()) + (i,)
    return out


def member_index(concepts: list[Concept]) -> dict[str, int]:
    """Map each member word to the index of its (first) concept in ``concepts``."""
    return {w: ks[0] for w, ks in member_concepts(concepts).items()}
