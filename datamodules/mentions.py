"""COCO object mentions of a caption, with character offsets: what "object word" means in training labels.

Object mentions follow CHAIR's ``lemma`` mode (:mod:`metrics.coco_objects`): the same synonym table,
double words, ``toilet``/``seat`` rule and singulariser, so "object word" means the same thing in training
labels and in the metric. spaCy tokenises (``spacy.blank("en")``, no model download) with its hyphen and
slash infix rules removed and Treebank's always-split punctuation added, so its word boundaries match the
ones CHAIR uses; each word's lemma is CHAIR's rule-based singular. No POS model is used, even where one is
installed: labels must not depend on what happens to be installed. The negative captions
(:mod:`datamodules.negatives`) and the training rows (:mod:`datamodules.readers`) read mentions from here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex

from metrics.coco_objects import get_parser
from metrics.english import NUMBER_WORDS, PLURAL_NODE_WORDS, singularize_lemma

__all__ = ["ATTRIBUTE_CLASSES", "NUMBERS", "Found", "Mention", "Word", "stated_count", "determiner_index", "find_object_mentions", "scan"]


@dataclass(frozen=True)
class Mention:
    """One COCO object mention: ``text == caption[start:end]``, ``category`` is its COCO node word."""

    start: int
    end: int
    text: str
    category: str
    plural: bool



# ---------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------

# What the Treebank tokenizer (CHAIR's) splits off wherever it occurs; spaCy keeps e.g. "cup(s".
_TREEBANK_SPLIT = r"[;@#$%&?!*\u2012-\u2015\[\](){}<>«“‘„»”’\"`]"
_TREEBANK_INFIX = rf"--|{_TREEBANK_SPLIT}|[:,](?!\d)|(?:'s|n't)(?={_TREEBANK_SPLIT})"


@lru_cache(maxsize=1)
def _nlp() -> Language:
    """Blank English pipeline whose word boundaries match CHAIR's (hyphenated words stay whole)."""
    nlp = spacy.blank("en")
    # spaCy splits "hot-dog", "cats/dogs" and "a…b"; Treebank does not.
    infixes = [rule for rule in nlp.Defaults.infixes if not any(re.search(rule, s) for s in ("a-b", "a/b", "a…b"))]
    nlp.tokenizer.infix_finditer = compile_infix_regex([*infixes, _TREEBANK_INFIX]).finditer
    # Treebank keeps "…", "_", "=" and an opening "'" on the word they touch ("cat…", "dog_", "'men");
    # it splits a closing "'" ("dogs'") and "n't".
    kept = ("…", "……", "_", "=")
    prefixes = [rule for rule in nlp.Defaults.prefixes if rule not in (*kept, "'", "\\'")]
    suffixes = [rule for rule in nlp.Defaults.suffixes if rule not in kept]
    nlp.tokenizer.prefix_search = compile_prefix_regex(["--", *prefixes]).search
    nlp.tokenizer.suffix_search = compile_suffix_regex(["--", "n't", *suffixes]).search
    # Treebank always splits a curly apostrophe ("o’clock" -> "o ’ clock"); spaCy has exceptions for it.
    nlp.tokenizer.rules = {key: value for key, value in nlp.tokenizer.rules.items() if "’" not in key}
    return nlp


def _lower_same_length(text: str) -> str:
    """Lower-cased text with unchanged character offsets (a few characters grow when lower-cased)."""
    lower = text.lower()
    if len(lower) == len(text):
        return lower
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _tokenize(text: str) -> Doc:
    """spaCy tokens of the lower-cased text (offsets = those of ``text``)."""
    return _nlp().tokenizer(_lower_same_length(text))


class Word(NamedTuple):
    start: int
    end: int
    lower: str
    lemma: str


class Found(NamedTuple):
    """A mention with the indices of its first and last word in the word list."""

    mention: Mention
    first: int
    last: int


# Number words read as counts; "a"/"an" count one.
NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS) if i}
_COUNTS = {"a": 1, "an": 1, **NUMBERS}

# Attribute classes: a swap moves a word to another class of the same lexicon. "orange" is left out: it
# is also a COCO category, so CHAIR would read it as a fruit.
_COLOURS: tuple[frozenset[str], ...] = tuple(
    frozenset(c.split())
    for c in ("red", "blue", "green", "yellow", "white", "black", "brown", "pink", "purple", "gray grey")
)
_SIZES: tuple[frozenset[str], ...] = (
    frozenset({"small", "little", "tiny"}),
    frozenset({"large", "big", "huge", "giant", "enormous"}),
)
ATTRIBUTE_CLASSES = {word: (lexicon, cls) for lexicon in (_COLOURS, _SIZES) for cls in lexicon for word in cls}


def _words(text: str) -> list[Word]:
    """Non-space tokens with offsets, lower-cased text and CHAIR's singular."""
    return [Word(t.idx, t.idx + len(t.text), t.text, singularize_lemma(t.text)) for t in _tokenize(text) if not t.is_space]


def stated_count(word: str) -> int | None:
    """The number a determiner states ("a" -> 1, "two" -> 2, "3" -> 3), else None."""
    if word.isdigit():
        return int(word)
    return _COUNTS.get(word)


def determiner_index(words: Sequence[Word], first: int) -> int | None:
    """Index of the word in front of the noun phrase ending at word ``first`` (attribute words skipped)."""
    i = first - 1
    while i >= 0 and words[i].lower in ATTRIBUTE_CLASSES:
        i -= 1
    return i if i >= 0 else None


@lru_cache(maxsize=1 << 16)
def scan(text: str) -> tuple[tuple[Word, ...], tuple[Found, ...]]:
    """Words and COCO object mentions of ``text``, by CHAIR's ``lemma``-mode rules (module docstring).

    Cached (each caption is scanned for its mentions, its negative and both label sets): results are tuples.
    """
    parser = get_parser("lemma")
    words = _words(text)
    merged: list[tuple[int, int, str]] = []  # first word, last word, merged lemma
    i = 0
    while i < len(words):
        pair = f"{words[i].lemma} {words[i + 1].lemma}" if i + 1 < len(words) else ""
        if pair in parser.double_words:
            merged.append((i, i + 1, parser.double_words[pair]))
            i += 2
        else:
            merged.append((i, i, words[i].lemma))
            i += 1
    lemmas = [lemma for _, _, lemma in merged]
    drop_seat = "toilet" in lemmas and "seat" in lemmas  # "the seat of the toilet" is not a chair
    found = []
    for first, last, lemma in merged:
        if not lemma or lemma not in parser.synonyms or (drop_seat and lemma == "seat"):
            continue
        start, end = words[first].start, words[last].end
        plural = words[last].lower != words[last].lemma or words[last].lemma in PLURAL_NODE_WORDS
        det = determiner_index(words, first)
        if det is not None and (stated_count(words[det].lower) or 0) > 1:
            plural = True  # "two sheep"
        found.append(Found(Mention(start, end, text[start:end], parser.synonyms[lemma], plural), first, last))
    return tuple(words), tuple(found)


def find_object_mentions(text: str) -> list[Mention]:
    """COCO object mentions of ``text`` in order, with character offsets (same objects as CHAIR ``lemma``).

    >>> [(m.text, m.category, m.plural) for m in find_object_mentions("Two men ride motor bikes past a hot dog stand.")]
    [('men', 'person', True), ('motor bikes', 'motorcycle', True), ('hot dog', 'hot dog', False)]
    >>> find_object_mentions("A toilet seat.")
    [Mention(start=2, end=13, text='toilet seat', category='toilet', plural=False)]
    """
    return [found.mention for found in scan(text)[1]]
