"""Hallucinated negative captions with exact change spans, and their grounding label spans.

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
change, so a swapped-in word never merges into a double word ("hot" + "dog") by accident. Mentions come
from :mod:`datamodules.mentions` (CHAIR's ``lemma`` rules), word forms from :mod:`metrics.english`, and
token labels from the spans made here with :mod:`datamodules.labels`.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from datamodules.labels import Span
from datamodules.mentions import (
    ATTRIBUTE_CLASSES, NUMBERS, Found, Mention, Word, determiner_index, find_object_mentions, scan, stated_count,
)
from metrics.coco_objects import COCO_CATEGORIES
from metrics.english import indefinite_article, match_case, pluralize, singular_noun

__all__ = [
    "ALL_KINDS",
    "Kind",
    "Negative",
    "make_negative",
    "negative_label_spans",
    "positive_label_spans",
]

Kind = Literal["object_swap", "object_insertion", "attribute_swap", "count_change", "cooccurrence"]
ALL_KINDS: tuple[Kind, ...] = ("object_swap", "object_insertion", "attribute_swap", "count_change")
# "cooccurrence" (datamodules.cooccurrence) is an insertion of a mined companion: labelled like the object kinds
OBJECT_KINDS: tuple[Kind, ...] = ("object_swap", "object_insertion", "cooccurrence")


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


# ---------------------------------------------------------------------------------------------------
# Phrase heuristics (no POS model: see datamodules.mentions)
# ---------------------------------------------------------------------------------------------------

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
    {"a", "an", "the", "some", "several", "many", "his", "her", "their", "its", "my", "our", *NUMBERS}
)
_DEFINITE = frozenset({"the", "these", "those", "his", "her", "their", "its", "my", "our", "your", "all"})


def _starts_inner_phrase(source: str, words: Sequence[Word], det: int) -> bool:
    """Whether "<object> and " can go in front of the determiner at ``det``: a lower-case determiner
    (not the capital that starts a sentence) that does not itself follow one ("the two dogs")."""
    after_determiner = det > 0 and words[det - 1].lower in _DETERMINERS | _DEFINITE
    return words[det].lower in _DETERMINERS and source[words[det].start].islower() and not after_determiner


def _is_punctuation(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def _ends_phrase(words: Sequence[Word], last: int, extra: Collection[str] = ()) -> bool:
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


def _categories(found: Sequence[Found]) -> list[str]:
    return [f.mention.category for f in found]


def _check(negative: Negative, expected: Sequence[str], new_index: int | None = None) -> bool:
    """Re-parse: the negative's mentions must be ``expected``; the one at ``new_index`` inside a changed span."""
    found = scan(negative.text)[1]
    if _categories(found) != list(expected):
        return False
    if new_index is None:
        return True
    mention = found[new_index].mention
    return any(s <= mention.start and mention.end <= e for s, e in negative.spans)


def _set_article(words: Sequence[Word], index: int | None, next_word: str, source: str) -> list[Edit]:
    """Edit that makes an indefinite article at ``index`` (if there is one) agree with ``next_word``."""
    if index is None or words[index].lower not in ("a", "an"):
        return []
    word = words[index]
    return [(word.start, word.end, match_case(source[word.start : word.end], indefinite_article(next_word)))]


def _object_swap(
    source: str, words: list[Word], found: list[Found], absent: list[str], rng: random.Random
) -> Negative | None:
    categories = _categories(found)
    for k in rng.sample(range(len(found)), len(found)):
        mention = found[k].mention
        choices = [c for c in absent if _category_form(c, mention.plural) is not None]
        if not choices:
            continue
        for new in rng.sample(choices, len(choices)):  # the first draw nearly always passes the check
            word = match_case(mention.text, _category_form(new, mention.plural) or "")
            det = found[k].first - 1 if found[k].first > 0 else None
            edits = [*_set_article(words, det, word, source), (mention.start, mention.end, word)]
            negative = _negative(source, "object_swap", edits, (new,))
            if _check(negative, [*categories[:k], new, *categories[k + 1 :]], k):
                return negative
    return None


def _object_insertion(
    source: str, words: list[Word], found: list[Found], absent: list[str], rng: random.Random,
    kind: Kind = "object_insertion",
) -> Negative | None:
    categories = _categories(found)
    choices = [c for c in absent if _category_form(c, False) is not None]
    places: list[tuple[int, int, bool]] = []  # (character position, index of the new mention, after?)
    for k, f in enumerate(found):
        followed_by_is = f.last + 1 < len(words) and words[f.last + 1].lower in _SINGULAR_VERBS
        if _ends_phrase(words, f.last) and not followed_by_is:
            places.append((f.mention.end, k + 1, True))  # "a man and a cat riding"
        det = determiner_index(words, f.first)
        if det is not None and _starts_inner_phrase(source, words, det):
            places.append((words[det].start, k, False))  # "riding a cat and a motorcycle"
    if not choices:
        return None
    for at, index, after in rng.sample(places, len(places)):
        for new in rng.sample(choices, len(choices)):
            noun = _category_form(new, False) or ""
            phrase = f"{indefinite_article(noun)} {noun}"
            inserted = f" and {phrase}" if after else f"{phrase} and "
            negative = _negative(source, kind, [(at, at, inserted)], (new,))
            if _check(negative, [*categories[:index], new, *categories[index:]], index):
                return negative
    return None


def _attribute_swap(source: str, words: list[Word], found: list[Found], rng: random.Random) -> Negative | None:
    firsts = {f.first for f in found}
    candidates = []
    for j, word in enumerate(words):
        if word.lower not in ATTRIBUTE_CLASSES:
            continue
        nxt = j + 1
        while nxt < len(words) and words[nxt].lower in ATTRIBUTE_CLASSES:
            nxt += 1
        if nxt in firsts:  # the attribute modifies an object word
            candidates.append(j)
    for j in rng.sample(candidates, len(candidates)):
        word = words[j]
        lexicon, own = ATTRIBUTE_CLASSES[word.lower]
        new = rng.choice(sorted(w for cls in lexicon if cls is not own for w in cls))
        new = match_case(source[word.start : word.end], new)
        edits = [*_set_article(words, j - 1 if j > 0 else None, new, source), (word.start, word.end, new)]
        negative = _negative(source, "attribute_swap", edits, ())
        if _check(negative, _categories(found)):
            return negative
    return None


def _count_change(source: str, words: list[Word], found: list[Found], rng: random.Random) -> Negative | None:
    candidates = []
    for k, f in enumerate(found):
        det = determiner_index(words, f.first)
        count = stated_count(words[det].lower) if det is not None else None
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
            inflected = pluralize(noun_text.lower()) if new_count > 1 else singular_noun(noun_text.lower())
            new_noun = match_case(noun_text, inflected)
        after_det = words[det + 1].lower if det + 1 < f.first else new_noun
        if det_word.lower.isdigit():
            new_det = str(new_count)
        elif new_count > 1:
            new_det = list(NUMBERS)[new_count - 1]
        elif det > 0 and words[det - 1].lower in _DEFINITE:
            new_det = "one"  # "the two dogs" -> "the one dog"
        else:
            new_det = indefinite_article(after_det)
        edits = [
            (det_word.start, det_word.end, match_case(det_text, new_det)),
            (f.mention.start, f.mention.end, new_noun),
        ]
        table = _SINGULAR_VERBS if new_count > 1 else _PLURAL_VERBS
        verbs = [f.last + 1] if f.last + 1 < len(words) else []  # "a cup is" -> "two cups are"
        if det >= 2 and words[det - 2].lower == "there":
            verbs.append(det - 1)  # "there is a cup" -> "there are two cups"
        for verb in (words[v] for v in verbs):
            if verb.lower in table:
                edits.append((verb.start, verb.end, match_case(source[verb.start : verb.end], table[verb.lower])))
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

    words, found = scan(caption)
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

