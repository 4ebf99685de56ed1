"""The concept table of ConceptWorld: what the world is about.

Each concept is a topic a document can be about: a short name (the key used everywhere), a
readable label, a one-line description, and member words (real, lower-case English words). No
member word belongs to two concepts and none is a template word of the corpus, so the topic of
any text can be read back by counting member words (`engine.world.corpus.plurality_concept`).

The table is ordered on purpose: a world with ``n`` concepts uses the first ``n`` rows, so the
`tiny` world's concepts are the first rows of the `small` world's, and they are the most
distinct ones (a colour, an animal, the weather, ...).
"""

from __future__ import annotations

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


def concept_table(n: int) -> list[Concept]:
    """The first ``n`` concepts of the table (a world's concepts)."""
    if not 2 <= n <= len(CONCEPTS):
        raise ValueError(f"n_concepts must be between 2 and {len(CONCEPTS)}, got {n}")
    return list(CONCEPTS[:n])


def member_index(concepts: list[Concept]) -> dict[str, int]:
    """Map each member word to the index of its concept in ``concepts``."""
    return {w: i for i, c in enumerate(concepts) for w in c.members}
