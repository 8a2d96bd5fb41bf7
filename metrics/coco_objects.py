"""The COCO object vocabulary of CHAIR and the parser that finds object mentions in a caption.

One table line per COCO category: the category name (the *node word*) followed by the surface words
that count as mentions of it. Parsing a caption (reference rules, DESIGN.md section 6):

1. word-tokenise the lower-cased caption (:func:`metrics.text.word_tokenize`) and singularise each word;
2. merge pairs left to right, greedily: COCO double words (``hot dog``, ``teddy bear``, ...) stay as one
   word, ``baby|adult <animal>`` -> ``<animal>``, ``passenger jet|train`` -> ``jet|train``,
   ``bow tie`` -> ``tie``, ``toilet seat`` -> ``toilet``, ``wine glas`` -> ``wine glass``;
3. drop ``seat`` when ``toilet`` occurs;
4. keep the words that are in the table, mapped to their node word.

``reference`` mode reproduces LisaAnne/Hallucination (and its Maxlinn port) including its quirks: the
table is split on ``", "`` so the entries written with two spaces (``" motor bike"``, ``" cheesecake"``)
never match, ``iPhone`` is never matched after lower-casing, and Pattern's ``singularize`` turns ``bus``
into ``bu`` and ``ties`` into ``ty``. ``lemma`` mode strips and lower-cases every entry and uses
:func:`metrics.english.singularize_lemma`. Other modules (negative captions, grounding labels) reuse this
table so that "object word" means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

from metrics.english import singularize_lemma
from metrics.text import singularize, word_tokenize

__all__ = ["COCO_CATEGORIES", "Mode", "ObjectParser", "ParsedCaption", "get_parser"]

Mode = Literal["reference", "lemma"]
MODES: tuple[str, ...] = ("reference", "lemma")

# Written as in the reference (spacing quirks, duplicates and the "televison" typo kept on purpose).
_SYNONYM_TABLE = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield 
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""

# The 80 node words, in table order (= COCO category names).
COCO_CATEGORIES: tuple[str, ...] = tuple(line.split(",")[0].strip() for line in _SYNONYM_TABLE.splitlines())

# Pairs of words treated as one word (all map to themselves), then the qualifier rules.
_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


def _double_word_map() -> dict[str, str]:
    pairs = {word: word for word in _DOUBLE_WORDS}
    for animal in _ANIMALS:  # "baby bird" is a bird, not a person
        pairs[f"baby {animal}"] = animal
        pairs[f"adult {animal}"] = animal
    for vehicle in ("jet", "train"):  # "passenger jet" is a jet, not a person
        pairs[f"passenger {vehicle}"] = vehicle
    pairs["bow tie"] = "tie"
    pairs["toilet seat"] = "toilet"
    pairs["wine glas"] = "wine glass"  # "glass" singularises to "glas" in reference mode
    return pairs


def _synonym_map(mode: Mode) -> dict[str, str]:
    """Surface word -> node word. A word listed on two lines maps to the later line (as in the reference)."""
    table: dict[str, str] = {}
    for line in _SYNONYM_TABLE.splitlines():
        if mode == "reference":
            entries = line.strip().split(", ")
        else:
            entries = [entry.strip().lower() for entry in line.split(",")]
        for entry in entries:
            table[entry] = entries[0]
    return table


@dataclass(frozen=True)
class ParsedCaption:
    """Object mentions of one caption, in order with repeats."""

    words: tuple[str, ...]  # matched surface words, e.g. "woman"
    objects: tuple[str, ...]  # their node words (COCO category names), e.g. "person"
    num_words: int  # words after tokenisation and double-word merging (OPERA's ``Len``)


class ObjectParser:
    """Finds COCO object mentions in captions (see the module docstring for the rules).

    >>> parser = ObjectParser("reference")
    >>> parser("Two men ride motor bikes past a passenger train and a hot dog stand.").objects
    ('person', 'train', 'hot dog')
    >>> parser("A bus next to wine glasses and a glass.").objects, ObjectParser("lemma")("A bus.").objects
    (('wine glass',), ('bus',))
    """

    def __init__(self, mode: Mode = "reference") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown CHAIR mode {mode!r}; expected one of {MODES}")
        self.mode: Mode = mode
        self.synonyms = _synonym_map(mode)
        self.double_words = _double_word_map()
        self._singularize: Callable[[str], str] = singularize if mode == "reference" else singularize_lemma

    def words(self, caption: str) -> list[str]:
        """The caption's words after tokenisation, singularisation and double-word merging."""
        single = [self._singularize(token) for token in word_tokenize(caption.lower())]
        merged: list[str] = []
        i, n = 0, len(single)
        while i < n:
            pair = f"{single[i]} {single[i + 1]}" if i + 1 < n else None
            if pair is not None and pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(single[i])
                i += 1
        return merged

    def __call__(self, caption: str) -> ParsedCaption:
        merged = self.words(caption)
        candidates = merged
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is not a chair
            candidates = [word for word in merged if word != "seat"]
        words = tuple(word for word in candidates if word in self.synonyms and word)
        return ParsedCaption(words, tuple(self.synonyms[w] for w in words), len(merged))

    def node_word(self, name: str) -> str:
        """Node word of a category name or synonym; ``ValueError`` naming it if it is neither."""
        key = name.strip().lower() if self.mode == "lemma" else name
        if key in self.synonyms and key:
            return self.synonyms[key]
        raise ValueError(f"{name!r} is not a COCO object name or synonym")


@lru_cache(maxsize=None)
def get_parser(mode: Mode = "reference") -> ObjectParser:
    """Shared parser per mode (building one is cheap, but its caches are per instance)."""
    return ObjectParser(mode)
