"""English word forms, written once: noun plurals and singulars, the indefinite article, number words, case.

Used by the synthetic world's captions and questions (:mod:`datamodules.world`), the negative captions
(:mod:`datamodules.negatives`) and CHAIR's ``lemma`` mode and AMBER (:mod:`metrics.coco_objects`,
:mod:`metrics.amber`). CHAIR's ``reference`` mode keeps Pattern's own quirky singular
(:func:`metrics.text.singularize`); :func:`singularize_lemma` here is that rule set with the quirks fixed.
"""

from __future__ import annotations

from functools import lru_cache

from metrics.text import IE_WORDS, singularize

__all__ = [
    "NUMBER_WORDS",
    "PLURAL_NODE_WORDS",
    "indefinite_article",
    "match_case",
    "pluralize",
    "singular_noun",
    "singularize_lemma",
]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLURAL_NODE_WORDS = frozenset({"skis", "scissors"})  # plural COCO nouns that keep their "s" when singularised

# ----------------------------------------------------------------------------------------------- plural

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "policeman": "policemen",
    "gentleman": "gentlemen", "serviceman": "servicemen",
}
_INVARIANT = frozenset({"sheep", "deer", "fish", "bison", "cattle", "broccoli", "scissors", "skis", "people"})
_F_TO_VES = frozenset({"knife", "wife", "life", "leaf", "loaf", "shelf", "wolf", "calf", "half", "pocketknife"})
_O_TO_OES = frozenset({"potato", "tomato", "hero", "echo"})


def _pluralize_word(word: str) -> str:
    if word in _INVARIANT:
        return word
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _F_TO_VES:
        return word[:-2] + "ves" if word.endswith("fe") else word[:-1] + "ves"
    if word in _O_TO_OES or word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def pluralize(noun: str) -> str:
    """Plural of a (lower-case) singular noun or compound; the last word is inflected.

    >>> [pluralize(w) for w in ["knife", "pocketknife", "man", "bus", "wine glass", "person", "sheep", "pony"]]
    ['knives', 'pocketknives', 'men', 'buses', 'wine glasses', 'people', 'sheep', 'ponies']
    >>> [pluralize(w) for w in ["hot dog", "toothbrush", "broccoli", "doberman"]]
    ['hot dogs', 'toothbrushes', 'broccoli', 'dobermans']
    """
    head, _, last = noun.rpartition(" ")
    return f"{head} {_pluralize_word(last)}" if head else _pluralize_word(last)


# --------------------------------------------------------------------------------------------- singular

_LEMMA_KEEP_ENDINGS = ("ss", "us", "is", "ous")  # singular words whose final "s" is not a plural's


@lru_cache(maxsize=1 << 16)
def singularize_lemma(word: str) -> str:
    """Pattern's ``singularize`` with the CHAIR reference's known mistakes fixed (CHAIR ``lemma`` mode).

    Singular words ending in ``-ss``/``-us``/``-is`` keep their ``s`` (``glass``, ``bus``); ``-ie``
    nouns such as ``tie``/``doggie`` lose only the ``s`` of their plural; ``buses`` -> ``bus``.

    >>> [singularize_lemma(w) for w in ["glass", "glasses", "bus", "buses", "ties", "doggies", "dogs"]]
    ['glass', 'glass', 'bus', 'bus', 'tie', 'doggie', 'dog']
    """
    if word.endswith(_LEMMA_KEEP_ENDINGS):
        return word
    if word.endswith("ses") and word[:-2].endswith(("ss", "us")):
        return word[:-2]
    if word.endswith("ies") and (word[:-1] in IE_WORDS or word[:-1] in ("tie", "pie", "movie")):
        return word[:-1]
    return singularize(word)


def singular_noun(noun: str) -> str:
    """Singular of a (lower-case) noun or compound: the last word, except the plural COCO nouns.

    >>> [singular_noun(w) for w in ["knives", "wine glasses", "skis", "hot dogs"]]
    ['knife', 'wine glass', 'skis', 'hot dog']
    """
    head, _, last = noun.rpartition(" ")
    single = last if last in PLURAL_NODE_WORDS else singularize_lemma(last)
    return f"{head} {single}" if head else single


# ------------------------------------------------------------------------------------- article and case

_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "eu", "one", "once", "ur")  # vowel letter, consonant sound
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def indefinite_article(next_word: str) -> str:
    """'a' or 'an' before ``next_word``.

    >>> [indefinite_article(w) for w in ["apple", "orange", "knife", "umbrella", "unicycle", "hour", "tv"]]
    ['an', 'an', 'a', 'an', 'a', 'an', 'a']
    """
    word = next_word.lower()
    if word.startswith(_SILENT_H):
        return "an"
    return "an" if word[:1] in "aeiou" and not word.startswith(_AN_EXCEPTIONS) else "a"


def match_case(template: str, word: str) -> str:
    """``word`` capitalised like ``template`` (first letter only, or all capitals).

    >>> match_case("Knife", "apple"), match_case("TV", "cup"), match_case("cup", "bowl")
    ('Apple', 'CUP', 'bowl')
    """
    if template.isupper() and len(template) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if template[:1].isupper() else word
