"""Hallucinated negative captions with exact change spans, and token-level grounding labels.

A *negative* is a positive caption with one small hallucination written into it:

* ``object_swap``: a mentioned object becomes a COCO category absent from the image, with number and
  article kept right ("a knife" -> "an apple", "two knives" -> "two apples");
* ``object_insertion``: an absent object is coordinated with a mentioned one ("a man and a cat riding",
  "riding a cat and a motorcycle");
* ``attribute_swap``: a colour or size word in front of an object changes class ("a red cup" ->
  "a blue cup", "a small cup" -> "an enormous cup");
* ``count_change``: the count in front of an object changes, the noun (and a directly following
  ``is``/``are``, ``was``/``were``, ``has``/``have``) follows ("two cups" -> "three cups",
  "a cup is" -> "two cups are").

Every negative records the character spans it changed (in its own text) and the source text each span
replaced, so the change can be undone exactly (:meth:`Negative.undo`). Each candidate is re-parsed before
it is returned: the mentions of the negative must be those of the positive with exactly the intended
change, so a swapped-in word never merges into a double word ("hot" + "dog") by accident.

Object mentions follow CHAIR's ``lemma`` mode (:mod:`metrics.coco_objects`): the same synonym table,
double words, ``toilet``/``seat`` rule and singulariser, so "object word" means the same thing in training
labels and in the metric. spaCy tokenises (``spacy.blank("en")``, no model download) with its hyphen and
slash infix rules removed and Treebank's always-split punctuation added, so its word boundaries match the
ones CHAIR uses; each word's lemma is CHAIR's rule-based singular. No POS model is used,
even where one is installed: labels must not depend on what happens to be installed.

Token labels (DESIGN.md section 4): 1 on grounded object words, 0 on hallucinated ones, -100 elsewhere,
mapped to LM tokens through a Hugging Face tokenizer's ``offset_mapping``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple

import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex

from metrics.coco_objects import COCO_CATEGORIES, get_parser
from metrics.text import singularize_lemma

__all__ = [
    "ALL_KINDS",
    "COCO_CATEGORIES",
    "Kind",
    "Mention",
    "Negative",
    "char_labels",
    "find_object_mentions",
    "make_negative",
    "negative_label_spans",
    "pluralize",
    "positive_label_spans",
    "token_labels",
]

Kind = Literal["object_swap", "object_insertion", "attribute_swap", "count_change"]
ALL_KINDS: tuple[Kind, ...] = ("object_swap", "object_insertion", "attribute_swap", "count_change")
OBJECT_KINDS: tuple[Kind, ...] = ("object_swap", "object_insertion")
IGNORE = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class Mention:
    """One COCO object mention: ``text == caption[start:end]``, ``category`` is its COCO node word."""

    start: int
    end: int
    text: str
    category: str
    plural: bool


@dataclass(frozen=True)
class Negative:
    """A hallucinated caption: ``text[s:e]`` for ``(s, e)`` in ``spans`` is changed text (sorted, disjoint),
    ``replaced[i]`` is the source text that ``spans[i]`` replaced ("" for an insertion)."""

    text: str
    kind: Kind
    spans: tuple[Span, ...]
    hallucinated_objects: tuple[str, ...]  # COCO categories introduced; empty for attribute/count changes
    source: str  # the positive caption
    replaced: tuple[str, ...]

    def undo(self) -> str:
        """The caption with every change reverted (equals ``source`` for a well-formed negative)."""
        text = self.text
        for (start, end), original in sorted(zip(self.spans, self.replaced), reverse=True):
            text = text[:start] + original + text[end:]
        return text


# ---------------------------------------------------------------------------------------------------
# Tokenisation and object mentions
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


class _Word(NamedTuple):
    start: int
    end: int
    lower: str
    lemma: str


class _Found(NamedTuple):
    """A mention with the indices of its first and last word in the word list."""

    mention: Mention
    first: int
    last: int


# Number words read as counts; "a"/"an" count one.
_NUMBERS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), start=1)}
_COUNTS = {"a": 1, "an": 1, **_NUMBERS}
_PLURAL_NODE_WORDS = frozenset({"skis", "scissors"})  # plural nouns that CHAIR's singulariser keeps


def _words(text: str) -> list[_Word]:
    """Non-space tokens with offsets, lower-cased text and CHAIR's singular."""
    return [_Word(t.idx, t.idx + len(t.text), t.text, singularize_lemma(t.text)) for t in _tokenize(text) if not t.is_space]


def _count(word: str) -> int | None:
    """The number a determiner states ("a" -> 1, "two" -> 2, "3" -> 3), else None."""
    if word.isdigit():
        return int(word)
    return _COUNTS.get(word)


@lru_cache(maxsize=1 << 16)
def _scan(text: str) -> tuple[tuple[_Word, ...], tuple[_Found, ...]]:
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
        plural = words[last].lower != words[last].lemma or words[last].lemma in _PLURAL_NODE_WORDS
        det = _determiner_index(words, first)
        if det is not None and (_count(words[det].lower) or 0) > 1:
            plural = True  # "two sheep"
        found.append(_Found(Mention(start, end, text[start:end], parser.synonyms[lemma], plural), first, last))
    return tuple(words), tuple(found)


def find_object_mentions(text: str) -> list[Mention]:
    """COCO object mentions of ``text`` in order, with character offsets (same objects as CHAIR ``lemma``).

    >>> [(m.text, m.category, m.plural) for m in find_object_mentions("Two men ride motor bikes past a hot dog stand.")]
    [('men', 'person', True), ('motor bikes', 'motorcycle', True), ('hot dog', 'hot dog', False)]
    >>> find_object_mentions("A toilet seat.")
    [Mention(start=2, end=13, text='toilet seat', category='toilet', plural=False)]
    """
    return [found.mention for found in _scan(text)[1]]


# ---------------------------------------------------------------------------------------------------
# Word forms: plurals, articles, case
# ---------------------------------------------------------------------------------------------------

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

    >>> [pluralize(w) for w in ["knife", "man", "bus", "wine glass", "person", "sheep", "hot dog", "pony"]]
    ['knives', 'men', 'buses', 'wine glasses', 'people', 'sheep', 'hot dogs', 'ponies']
    """
    head, _, last = noun.rpartition(" ")
    return f"{head} {_pluralize_word(last)}" if head else _pluralize_word(last)


def _singularize(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    single = last if last in _PLURAL_NODE_WORDS else singularize_lemma(last)
    return f"{head} {single}" if head else single


# How a swapped-in or inserted category is written: (singular, plural); singular None = no singular use.
_FORMS: dict[str, tuple[str | None, str]] = {
    "sports ball": ("ball", "balls"),
    "dining table": ("table", "tables"),
    "skis": ("ski", "skis"),
    "scissors": (None, "scissors"),
}


def _category_form(category: str, plural: bool) -> str | None:
    singular, many = _FORMS.get(category, (category, pluralize(category)))
    return many if plural else singular


_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "eu", "one", "once", "ur")  # vowel letter, consonant sound
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def _article(next_word: str) -> str:
    """'a' or 'an' before ``next_word``.

    >>> [_article(w) for w in ["apple", "orange", "knife", "umbrella", "unicycle", "hour", "tv"]]
    ['an', 'an', 'a', 'an', 'a', 'an', 'a']
    """
    word = next_word.lower()
    if word.startswith(_SILENT_H):
        return "an"
    return "an" if word[:1] in "aeiou" and not word.startswith(_AN_EXCEPTIONS) else "a"


def _match_case(template: str, word: str) -> str:
    """``word`` capitalised like ``template`` (first letter only, or all capitals)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if template[:1].isupper() else word


# ---------------------------------------------------------------------------------------------------
# Lexicons and phrase heuristics (no POS model: see the module docstring)
# ---------------------------------------------------------------------------------------------------

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
_ATTRIBUTE_CLASSES = {word: (lexicon, cls) for lexicon in (_COLOURS, _SIZES) for cls in lexicon for word in cls}

# Words that may follow the end of a noun phrase; insertion after the object / count change need one,
# so that "dog bowl" or "hot dog stand" (object word as a modifier) are left alone.
_PHRASE_FOLLOWERS = frozenset(
    "and or with on in at near next by under over behind beside besides across along through into onto "
    "from for to down up around against between inside outside while that which who where as are were "
    "have sit sits stand stands".split()
)
_SINGULAR_VERBS = {"is": "are", "was": "were", "has": "have"}
_PLURAL_VERBS = {v: k for k, v in _SINGULAR_VERBS.items()}
_DETERMINERS = frozenset(
    {"a", "an", "the", "some", "several", "many", "his", "her", "their", "its", "my", "our", *_NUMBERS}
)
_DEFINITE = frozenset({"the", "these", "those", "his", "her", "their", "its", "my", "our", "your", "all"})


def _determiner_index(words: Sequence[_Word], first: int) -> int | None:
    """Index of the word in front of the noun phrase ending at word ``first`` (attribute words skipped)."""
    i = first - 1
    while i >= 0 and words[i].lower in _ATTRIBUTE_CLASSES:
        i -= 1
    return i if i >= 0 else None


def _starts_inner_phrase(source: str, words: Sequence[_Word], det: int) -> bool:
    """Whether "<object> and " can go in front of the determiner at ``det``: a lower-case determiner
    (not the capital that starts a sentence) that does not itself follow one ("the two dogs")."""
    after_determiner = det > 0 and words[det - 1].lower in _DETERMINERS | _DEFINITE
    return words[det].lower in _DETERMINERS and source[words[det].start].islower() and not after_determiner


def _is_punctuation(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def _ends_phrase(words: Sequence[_Word], last: int, extra: Collection[str] = ()) -> bool:
    """Whether the noun phrase can end at word ``last`` (end, punctuation, preposition, -ing verb, ...)."""
    if last + 1 >= len(words):
        return True
    nxt = words[last + 1].lower
    return _is_punctuation(nxt) or nxt in _PHRASE_FOLLOWERS or nxt in extra or (nxt.endswith("ing") and len(nxt) > 4)


# ---------------------------------------------------------------------------------------------------
# Building and checking a negative
# ---------------------------------------------------------------------------------------------------

Edit = tuple[int, int, str]  # replace source[start:end] by the text


def _apply(source: str, edits: Sequence[Edit]) -> tuple[str, tuple[Span, ...], tuple[str, ...]]:
    """Apply disjoint edits; returns the new text, the changed spans in it and the replaced source text."""
    pieces, spans, replaced = [], [], []
    cursor = length = 0
    for start, end, new in sorted(edits):
        if start < cursor:
            raise ValueError(f"overlapping edits at {start}")
        pieces.append(source[cursor:start])
        length += start - cursor
        spans.append((length, length + len(new)))
        replaced.append(source[start:end])
        pieces.append(new)
        length += len(new)
        cursor = end
    pieces.append(source[cursor:])
    return "".join(pieces), tuple(spans), tuple(replaced)


def _negative(source: str, kind: Kind, edits: Sequence[Edit], objects: tuple[str, ...]) -> Negative:
    text, spans, replaced = _apply(source, [e for e in edits if source[e[0] : e[1]] != e[2]])
    return Negative(text, kind, spans, objects, source, replaced)


def _categories(found: Sequence[_Found]) -> list[str]:
    return [f.mention.category for f in found]


def _check(negative: Negative, expected: Sequence[str], new_index: int | None = None) -> bool:
    """Re-parse: the negative's mentions must be ``expected``; the one at ``new_index`` inside a changed span."""
    found = _scan(negative.text)[1]
    if _categories(found) != list(expected):
        return False
    if new_index is None:
        return True
    mention = found[new_index].mention
    return any(s <= mention.start and mention.end <= e for s, e in negative.spans)


def _set_article(words: Sequence[_Word], index: int | None, next_word: str, source: str) -> list[Edit]:
    """Edit that makes an indefinite article at ``index`` (if there is one) agree with ``next_word``."""
    if index is None or words[index].lower not in ("a", "an"):
        return []
    word = words[index]
    return [(word.start, word.end, _match_case(source[word.start : word.end], _article(next_word)))]


def _object_swap(
    source: str, words: list[_Word], found: list[_Found], absent: list[str], rng: random.Random
) -> Negative | None:
    categories = _categories(found)
    for k in rng.sample(range(len(found)), len(found)):
        mention = found[k].mention
        choices = [c for c in absent if _category_form(c, mention.plural) is not None]
        if not choices:
            continue
        for new in rng.sample(choices, len(choices)):  # the first draw nearly always passes the check
            word = _match_case(mention.text, _category_form(new, mention.plural) or "")
            det = found[k].first - 1 if found[k].first > 0 else None
            edits = [*_set_article(words, det, word, source), (mention.start, mention.end, word)]
            negative = _negative(source, "object_swap", edits, (new,))
            if _check(negative, [*categories[:k], new, *categories[k + 1 :]], k):
                return negative
    return None


def _object_insertion(
    source: str, words: list[_Word], found: list[_Found], absent: list[str], rng: random.Random
) -> Negative | None:
    categories = _categories(found)
    choices = [c for c in absent if _category_form(c, False) is not None]
    places: list[tuple[int, int, bool]] = []  # (character position, index of the new mention, after?)
    for k, f in enumerate(found):
        followed_by_is = f.last + 1 < len(words) and words[f.last + 1].lower in _SINGULAR_VERBS
        if _ends_phrase(words, f.last) and not followed_by_is:
            places.append((f.mention.end, k + 1, True))  # "a man and a cat riding"
        det = _determiner_index(words, f.first)
        if det is not None and _starts_inner_phrase(source, words, det):
            places.append((words[det].start, k, False))  # "riding a cat and a motorcycle"
    if not choices:
        return None
    for at, index, after in rng.sample(places, len(places)):
        for new in rng.sample(choices, len(choices)):
            noun = _category_form(new, False) or ""
            phrase = f"{_article(noun)} {noun}"
            inserted = f" and {phrase}" if after else f"{phrase} and "
            negative = _negative(source, "object_insertion", [(at, at, inserted)], (new,))
            if _check(negative, [*categories[:index], new, *categories[index:]], index):
                return negative
    return None


def _attribute_swap(source: str, words: list[_Word], found: list[_Found], rng: random.Random) -> Negative | None:
    firsts = {f.first for f in found}
    candidates = []
    for j, word in enumerate(words):
        if word.lower not in _ATTRIBUTE_CLASSES:
            continue
        nxt = j + 1
        while nxt < len(words) and words[nxt].lower in _ATTRIBUTE_CLASSES:
            nxt += 1
        if nxt in firsts:  # the attribute modifies an object word
            candidates.append(j)
    for j in rng.sample(candidates, len(candidates)):
        word = words[j]
        lexicon, own = _ATTRIBUTE_CLASSES[word.lower]
        new = rng.choice(sorted(w for cls in lexicon if cls is not own for w in cls))
        new = _match_case(source[word.start : word.end], new)
        edits = [*_set_article(words, j - 1 if j > 0 else None, new, source), (word.start, word.end, new)]
        negative = _negative(source, "attribute_swap", edits, ())
        if _check(negative, _categories(found)):
            return negative
    return None


def _count_change(source: str, words: list[_Word], found: list[_Found], rng: random.Random) -> Negative | None:
    candidates = []
    for k, f in enumerate(found):
        det = _determiner_index(words, f.first)
        count = _count(words[det].lower) if det is not None else None
        last_word = words[f.last].lower
        if count is None or last_word == "scissors" or not _ends_phrase(words, f.last, ("of", *_SINGULAR_VERBS)):
            continue
        if (count > 1) != f.mention.plural:  # "a sheep"/"two sheep" fine; "a people" is not a count
            continue
        candidates.append((k, det, count))
    for k, det, count in rng.sample(candidates, len(candidates)):
        f = found[k]
        new_count = rng.choice([n for n in range(1, 6) if n != count])
        det_word = words[det]
        det_text = source[det_word.start : det_word.end]
        noun_text = source[f.mention.start : f.mention.end]
        new_noun = noun_text
        if (new_count > 1) != (count > 1):
            inflected = pluralize(noun_text.lower()) if new_count > 1 else _singularize(noun_text.lower())
            new_noun = _match_case(noun_text, inflected)
        after_det = words[det + 1].lower if det + 1 < f.first else new_noun
        if det_word.lower.isdigit():
            new_det = str(new_count)
        elif new_count > 1:
            new_det = list(_NUMBERS)[new_count - 1]
        elif det > 0 and words[det - 1].lower in _DEFINITE:
            new_det = "one"  # "the two dogs" -> "the one dog"
        else:
            new_det = _article(after_det)
        edits = [
            (det_word.start, det_word.end, _match_case(det_text, new_det)),
            (f.mention.start, f.mention.end, new_noun),
        ]
        table = _SINGULAR_VERBS if new_count > 1 else _PLURAL_VERBS
        verbs = [f.last + 1] if f.last + 1 < len(words) else []  # "a cup is" -> "two cups are"
        if det >= 2 and words[det - 2].lower == "there":
            verbs.append(det - 1)  # "there is a cup" -> "there are two cups"
        for verb in (words[v] for v in verbs):
            if verb.lower in table:
                edits.append((verb.start, verb.end, _match_case(source[verb.start : verb.end], table[verb.lower])))
        negative = _negative(source, "count_change", edits, ())
        if _check(negative, _categories(found)):
            return negative
    return None


def _category_set(names: Collection[str], argument: str) -> set[str]:
    known = set(COCO_CATEGORIES)
    unknown = sorted(str(n) for n in names if n not in known)
    if unknown:
        raise ValueError(f"{argument} holds names that are not COCO categories: {unknown[:5]}")
    return set(names)


def make_negative(
    caption: str,
    present: Collection[str],
    rng: random.Random,
    kinds: Sequence[str] = ALL_KINDS,
    vocabulary: Sequence[str] = COCO_CATEGORIES,
) -> Negative | None:
    """One negative of ``caption``, or None when none of ``kinds`` applies to it.

    ``present``: COCO categories in the image. Kinds are tried in an order drawn from ``rng``, and within a
    kind the places to change; everything random comes from ``rng``, so a seeded ``rng`` gives the same
    negative. Objects are drawn from ``vocabulary`` minus ``present`` minus the categories the caption
    already mentions; ``scissors`` (no singular) only replaces plural mentions and is never inserted.

    >>> make_negative("A red cup.", {"cup"}, random.Random(0), kinds=["attribute_swap"]).text
    'A black cup.'
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty sequence of {ALL_KINDS}, got {kinds!r}")
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise ValueError(f"kinds holds unknown kinds {bad}; expected some of {ALL_KINDS}")
    if isinstance(vocabulary, str) or not vocabulary:
        raise ValueError("vocabulary must be a non-empty sequence of COCO category names")
    vocab = list(dict.fromkeys(vocabulary))
    _category_set(vocab, "vocabulary")
    present_set = _category_set(present, "present")

    words, found = _scan(caption)
    mentioned = set(_categories(found))
    absent = [c for c in vocab if c not in present_set and c not in mentioned]
    unique_kinds: list[Kind] = list(dict.fromkeys(kinds))  # type: ignore[arg-type]
    for kind in rng.sample(unique_kinds, len(unique_kinds)):
        if kind == "object_swap":
            negative = _object_swap(caption, words, found, absent, rng)
        elif kind == "object_insertion":
            negative = _object_insertion(caption, words, found, absent, rng)
        elif kind == "attribute_swap":
            negative = _attribute_swap(caption, words, found, rng)
        else:
            negative = _count_change(caption, words, found, rng)
        if negative is not None:
            return negative
    return None


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------


def positive_label_spans(caption: str, present: Collection[str]) -> tuple[list[Span], list[Span]]:
    """(grounded, hallucinated) spans of a positive caption: its mentions of present objects, and none.

    Mentions of categories missing from ``present`` are left unlabelled (annotations are incomplete).
    """
    present_set = _category_set(present, "present")
    return [(m.start, m.end) for m in find_object_mentions(caption) if m.category in present_set], []


def negative_label_spans(negative: Negative, present: Collection[str]) -> tuple[list[Span], list[Span]]:
    """(grounded, hallucinated) spans of a negative.

    Hallucinated: for object kinds the introduced object words; for attribute and count changes the
    changed words. Grounded: mentions of present objects that overlap no changed span.

    >>> neg = make_negative("A red cup.", {"cup"}, random.Random(0), kinds=["attribute_swap"])
    >>> negative_label_spans(neg, {"cup"})
    ([(8, 11)], [(2, 7)])
    """
    present_set = _category_set(present, "present")
    mentions = find_object_mentions(negative.text)

    def inside_change(m: Mention) -> bool:
        return any(s < m.end and m.start < e for s, e in negative.spans)

    if negative.kind in OBJECT_KINDS:
        introduced = set(negative.hallucinated_objects)
        hallucinated = [(m.start, m.end) for m in mentions if inside_change(m) and m.category in introduced]
    else:
        hallucinated = [_strip_span(negative.text, span) for span in negative.spans]
    grounded = [(m.start, m.end) for m in mentions if m.category in present_set and not inside_change(m)]
    return grounded, hallucinated


def _strip_span(text: str, span: Span) -> Span:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _check_spans(spans: Sequence[Span], length: int | None, argument: str) -> list[Span]:
    out = []
    for span in spans:
        start, end = int(span[0]), int(span[1])
        if start < 0 or end < start or (length is not None and end > length):
            raise ValueError(f"{argument} holds an invalid span {span!r} (text length {length})")
        out.append((start, end))
    return out


def _fill(length: int, grounded: Sequence[Span], hallucinated: Sequence[Span]) -> list[int]:
    labels = [IGNORE] * length
    for start, end in grounded:
        labels[start:end] = [1] * (end - start)
    for start, end in hallucinated:
        if any(label == 1 for label in labels[start:end]):
            raise ValueError(f"hallucinated span {(start, end)} overlaps a grounded span")
        labels[start:end] = [0] * (end - start)
    return labels


def char_labels(text: str, grounded: Sequence[Span], hallucinated: Sequence[Span]) -> list[int]:
    """Per character of ``text``: 1 in a grounded span, 0 in a hallucinated one, -100 elsewhere.

    >>> char_labels("a cat", [(2, 5)], [])
    [-100, -100, 1, 1, 1]
    """
    length = len(text)
    return _fill(length, _check_spans(grounded, length, "grounded"), _check_spans(hallucinated, length, "hallucinated"))


def token_labels(
    offsets: Sequence[Sequence[int]], grounded_spans: Sequence[Span], hallucinated_spans: Sequence[Span]
) -> list[int]:
    """Per LM token: 1 if it covers part of a grounded object word, 0 of a hallucinated one, else -100.

    ``offsets`` is a tokenizer's ``offset_mapping`` over the same string the spans refer to; empty
    offsets (special tokens: ``(0, 0)``) get -100, and so does a token that covers both kinds of span.

    >>> token_labels([(0, 0), (0, 1), (2, 4), (4, 5), (0, 0)], [(2, 5)], [])
    [-100, -100, 1, 1, -100]
    """
    grounded = _check_spans(grounded_spans, None, "grounded_spans")
    hallucinated = _check_spans(hallucinated_spans, None, "hallucinated_spans")
    pairs = _check_spans([tuple(o) for o in offsets], None, "offsets")  # type: ignore[misc]
    length = max([e for _, e in (*pairs, *grounded, *hallucinated)], default=0)
    chars = _fill(length, grounded, hallucinated)
    labels = []
    for start, end in pairs:
        seen = {label for label in chars[start:end] if label != IGNORE}
        labels.append(seen.pop() if len(seen) == 1 else IGNORE)
    return labels
