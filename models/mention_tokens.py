"""Object mentions of generated captions, aligned to the generated tokens through character offsets.

A caption is the decoded text of the tokens a model generated (``skip_special_tokens``, tokenizer clean-up,
stripped: exactly what validation scores with CHAIR). Each generated token gets the span of caption characters it
produced (:func:`token_spans`: decoding every prefix of the tokens, so multi-token words, byte-level pieces and
SentencePiece spaces are exact); each object mention found in the caption gets the tokens that overlap its
characters (:func:`align_mentions`). Mentions come from either CHAIR mode:

* ``reference``: the reference parser (:class:`metrics.coco_objects.ObjectParser`: Treebank words, Pattern's
  singular, double words), with the character offsets of its words recovered here (:func:`reference_mentions`);
* ``lemma``: :func:`datamodules.mentions.find_object_mentions` (spaCy words, offsets built in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datamodules.mentions import find_object_mentions
from metrics.coco_objects import get_parser
from metrics.text import singularize, word_tokenize

__all__ = ["CHAIR_MODES", "ObjectMention", "align_mentions", "caption_mentions", "reference_mentions", "token_spans"]

CHAIR_MODES = ("reference", "lemma")
_QUOTES = {"``": '"', "''": '"'}  # Treebank writes a double quote as `` or ''


@dataclass(frozen=True)
class ObjectMention:
    """One object mention: ``caption[start:end] == text``; ``tokens`` index the caption's generated tokens."""

    start: int
    end: int
    text: str
    category: str
    tokens: tuple[int, ...] = ()


def _lower(text: str) -> str:
    """Lower-cased text with unchanged character offsets."""
    lower = text.lower()
    return lower if len(lower) == len(text) else "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _word_spans(text: str, words: Sequence[str]) -> list[tuple[int, int] | None]:
    """Where each tokenizer word sits in ``text``, searched left to right (None for a rewritten word)."""
    spans: list[tuple[int, int] | None] = []
    position = 0
    for word in words:
        found = None
        for form in (word, _QUOTES.get(word)):
            if form and (at := text.find(form, position)) >= 0 and (found is None or at < found[0]):
                found = (at, at + len(form))
        spans.append(found)
        if found is not None:
            position = found[1]
    return spans


def reference_mentions(caption: str) -> list[ObjectMention]:
    """Mentions of the reference CHAIR parser, in order with repeats, with their character offsets.

    The same rules as :class:`metrics.coco_objects.ObjectParser` in ``reference`` mode, followed word by word,
    quirks included ("motor bikes" and "bus" are no mentions there; ``lemma`` mode finds them).

    >>> [(m.text, m.category) for m in reference_mentions("Two men ride motor bikes past a bus and wine glasses.")]
    [('men', 'person'), ('wine glasses', 'wine glass')]
    """
    parser = get_parser("reference")
    lower = _lower(caption)
    words = word_tokenize(lower)
    spans = _word_spans(lower, words)
    single = [singularize(w) for w in words]
    merged: list[tuple[int, int, str]] = []  # first word, last word, merged word
    i = 0
    while i < len(single):
        pair = f"{single[i]} {single[i + 1]}" if i + 1 < len(single) else None
        if pair is not None and pair in parser.double_words:
            merged.append((i, i + 1, parser.double_words[pair]))
            i += 2
        else:
            merged.append((i, i, single[i]))
            i += 1
    names = [word for _, _, word in merged]
    drop_seat = "toilet" in names and "seat" in names
    out = []
    for first, last, word in merged:
        if not word or word not in parser.synonyms or (drop_seat and word == "seat"):
            continue
        if spans[first] is None or spans[last] is None:
            raise ValueError(f"cannot locate the word {words[first]!r} in the caption {caption!r}")
        start, end = spans[first][0], spans[last][1]
        out.append(ObjectMention(start, end, caption[start:end], parser.synonyms[word]))
    expected = parser(caption).objects
    if tuple(m.category for m in out) != expected:  # the two readings of the rules must agree
        raise RuntimeError(f"reference mentions {[m.category for m in out]} differ from CHAIR's {list(expected)} "
                           f"in {caption!r}")
    return out


def caption_mentions(caption: str, mode: str) -> list[ObjectMention]:
    """Object mentions of ``caption`` in CHAIR mode ``mode`` (``reference`` or ``lemma``), with offsets."""
    if mode == "reference":
        return reference_mentions(caption)
    if mode == "lemma":
        return [ObjectMention(m.start, m.end, m.text, m.category) for m in find_object_mentions(caption)]
    raise ValueError(f"unknown CHAIR mode {mode!r}; expected one of {CHAIR_MODES}")


def _kept_characters(raw: str, clean: str) -> list[int | None]:
    """For each character of ``raw``, its index in ``clean`` (None where clean-up deleted it).

    Tokenizer clean-up only deletes spaces (" ." -> ".", " n't" -> "n't"), so ``clean`` is a subsequence of ``raw``.
    """
    out: list[int | None] = []
    j = 0
    for ch in raw:
        if j < len(clean) and ch == clean[j]:
            out.append(j)
            j += 1
        else:
            out.append(None)
    if j != len(clean):
        raise ValueError(f"the cleaned caption {clean!r} is not the decoded text {raw!r} with characters deleted")
    return out


def token_spans(tokenizer: Any, tokens: Sequence[int],
                clean_up: bool = True) -> tuple[str, list[tuple[int, int] | None]]:
    """The caption of ``tokens`` (decoded like validation: special tokens skipped, clean-up, stripped) and the
    (start, end) character span each token produced in it (None: it produced none, e.g. a special token).

    A token whose prefix decodes to no prefix of the next (an incomplete UTF-8 byte sequence) shares the span of
    the tokens that complete it.
    """
    tokens = list(tokens)
    prefixes = tokenizer.batch_decode([tokens[: k + 1] for k in range(len(tokens))], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    raw = prefixes[-1] if prefixes else ""
    raw_spans: list[tuple[int, int]] = [(0, 0)] * len(tokens)
    stable, pending = "", []
    for k, text in enumerate(prefixes):
        pending.append(k)
        if text.startswith(stable) and raw.startswith(text) and not text.endswith("\ufffd"):
            for j in pending:
                raw_spans[j] = (len(stable), len(text))
            stable, pending = text, []
    for j in pending:
        raw_spans[j] = (len(stable), len(raw))
    decoded = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up)
    caption = decoded.strip()
    lead = len(decoded) - len(decoded.lstrip())
    kept = _kept_characters(raw, decoded)
    spans: list[tuple[int, int] | None] = []
    for a, b in raw_spans:
        chars = [kept[i] - lead for i in range(a, b) if kept[i] is not None and 0 <= kept[i] - lead < len(caption)]
        spans.append((min(chars), max(chars) + 1) if chars else None)
    return caption, spans


def align_mentions(mentions: Sequence[ObjectMention], spans: Sequence[tuple[int, int] | None]) -> list[ObjectMention]:
    """Each mention with the indices of the tokens whose characters overlap it (empty if none do)."""
    out = []
    for m in mentions:
        hit = tuple(k for k, span in enumerate(spans) if span is not None and span[0] < m.end and span[1] > m.start)
        out.append(ObjectMention(m.start, m.end, m.text, m.category, hit))
    return out
