"""Tokenisation and singularisation behave like nltk ``word_tokenize`` and Pattern 3.6 ``singularize``.

Expected values were checked against nltk 3.9.1 (punkt + Treebank) and Debian's python3-pattern.
"""

from __future__ import annotations

import pytest

from metrics.coco_objects import COCO_CATEGORIES, ObjectParser
from metrics.english import singularize_lemma
from metrics.text import singularize, word_tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a dog. the cat", ["a", "dog", ".", "the", "cat"]),
        ("a dog.the cat", ["a", "dog.the", "cat"]),  # no space: punkt sees no sentence end
        ("crafting process.; furthermore", ["crafting", "process", ".", ";", "furthermore"]),
        ("a dog.)the cat", ["a", "dog", ".", ")", "the", "cat"]),
        ("its paw.)s. there", ["its", "paw.", ")", "s", ".", "there"]),  # only a chunk's last end counts
        ('reads " special. " the bus', ["reads", "``", "special.", "``", "the", "bus"]),
        ('highway 395." the', ["highway", "395", ".", "''", "the"]),
        ("which is 10:21. been the", ["which", "is", "10:21.", "been", "the"]),  # number + lower-case word
        ("mr. smith's dog.", ["mr.", "smith", "'s", "dog", "."]),  # abbreviation keeps its period
        ("there'a a cat", ["there", "'", "a", "a", "cat"]),
        ("'is this", ["'is", "this"]),
        ("i can't, cannot; gonna", ["i", "ca", "n't", ",", "can", "not", ";", "gon", "na"]),
        ("dogs' bowls (2) [cats] a--b a...b", ["dogs", "'", "bowls", "(", "2", ")", "[", "cats", "]", "a", "--", "b", "a", "...", "b"]),
        ("3,000 cats: yes", ["3,000", "cats", ":", "yes"]),
        ("a “smart” tv’s screen", ["a", "“", "smart", "”", "tv", "’", "s", "screen"]),
        ("", []),
    ],
)
def test_word_tokenize(text: str, tokens: list[str]) -> None:
    assert word_tokenize(text) == tokens


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("dogs", "dog"), ("people", "person"), ("women", "woman"), ("policemen", "policeman"),
        ("children", "child"), ("knives", "knife"), ("leaves", "leaf"), ("mice", "mouse"), ("oxen", "ox"),
        ("glasses", "glass"), ("glass", "glas"), ("bus", "bu"), ("buses", "bus"), ("ties", "ty"),
        ("doggies", "doggies"), ("doggie", "doggie"), ("skis", "ski"), ("scissors", "scissors"),
        ("sheep", "sheep"), ("cattle", "cattle"), ("series", "series"), ("s", "s"), ("rice", "rice"),
        ("four", "fmy"), ("taxes", "taxe"), ("analyses", "analysis"), ("bases", "basis"), ("cacti", "cactus"),
        ("boxes", "box"), ("potatoes", "potato"), ("babies", "baby"), ("cookies", "cookies"),
        ("mothers-in-law", "mother-in-law"), ("hot-dogs", "hot-dog"), ("dogs'", "dog's"),
    ],
)
def test_singularize_matches_pattern(word: str, singular: str) -> None:
    assert singularize(word) == singular


@pytest.mark.parametrize(
    ("word", "singular"),
    [("glass", "glass"), ("bus", "bus"), ("buses", "bus"), ("ties", "tie"), ("doggies", "doggie"), ("cookies", "cookie"), ("dogs", "dog")],
)
def test_singularize_lemma_fixes_quirks(word: str, singular: str) -> None:
    assert singularize_lemma(word) == singular


def test_vocabulary_is_the_80_coco_categories() -> None:
    assert len(COCO_CATEGORIES) == len(set(COCO_CATEGORIES)) == 80
    assert {"dining table", "tv", "hair drier", "skis", "wine glass"} <= set(COCO_CATEGORIES)


@pytest.mark.parametrize(
    ("caption", "reference", "lemma"),
    [
        ("A bus and two buses.", ["bus"], ["bus", "bus"]),  # "bus" -> "bu" in reference mode
        ("He wears two ties and a bow tie.", ["tie"], ["tie", "tie"]),  # "ties" -> "ty"
        ("A man on a motor bike with an iPhone.", ["person"], ["person", "motorcycle", "cell phone"]),
        ("A cheesecake next to wine glasses.", ["wine glass"], ["cake", "wine glass"]),
        ("A baby elephant near a passenger train.", ["elephant", "train"], ["elephant", "train"]),
        ("The seat of the toilet and a chair.", ["toilet", "chair"], ["toilet", "chair"]),
        ("A toilet seat.", ["toilet"], ["toilet"]),
        ("Hot dogs, teddy bears and a train track.", ["hot dog", "teddy bear"], ["hot dog", "teddy bear"]),
        ("", [], []),
    ],
)
def test_object_parser_modes(caption: str, reference: list[str], lemma: list[str]) -> None:
    assert list(ObjectParser("reference")(caption).objects) == reference
    assert list(ObjectParser("lemma")(caption).objects) == lemma


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown CHAIR mode"):
        ObjectParser("wordnet")  # type: ignore[arg-type]
