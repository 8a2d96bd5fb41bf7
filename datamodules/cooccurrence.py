"""Co-occurrence hard negatives: the likely companion of a present anchor, written into a caption of an image
that does not show it.

Mined from instance annotations (any COCO-format data)::

    P(c | a) = #images showing a and c / #images showing a

For a training caption whose image shows an anchor ``a`` but not ``c`` with ``P(c | a) >= min_probability``, the
negative coordinates ``c`` with a mentioned object ("a fork and a knife"), kind ``cooccurrence``, labelled like an
object insertion (the inserted word is hallucinated). These are the negatives that contrast "companion here" with
"companion not here" under the same prior; random negatives rarely do.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from datamodules.mentions import scan
from datamodules.negatives import Negative, _object_insertion

__all__ = ["CooccurrenceNegatives", "cooccurrence_negative", "likely_absent", "mine_cooccurrence"]


@dataclass
class CooccurrenceNegatives:
    """Settings of co-occurrence negatives (``data.cooccurrence``).

    Args:
        share: probability that a caption row whose image lacks a likely companion gets a co-occurrence negative
            (instead of a random one of ``negative_kinds``, which the remaining rows keep).
        min_probability: a companion ``c`` of a present anchor ``a`` is likely when ``P(c | a) >= min_probability``.
    """

    share: float = 1.0
    min_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("share", "min_probability"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"data.cooccurrence.{name} must be in [0, 1], got {value!r}")


def mine_cooccurrence(present: Mapping[int, Collection[str]]) -> dict[tuple[str, str], float]:
    """(anchor, companion) -> P(companion | anchor) over the images of ``present`` (image id -> categories).

    >>> mine_cooccurrence({1: {"fork", "knife"}, 2: {"fork"}, 3: {"knife", "cup"}})[("fork", "knife")]
    0.5
    """
    anchors: Counter = Counter()
    pairs: Counter = Counter()
    for names in present.values():
        names = set(names)
        for a in names:
            anchors[a] += 1
            for c in names - {a}:
                pairs[a, c] += 1
    return {(a, c): n / anchors[a] for (a, c), n in sorted(pairs.items())}


def likely_absent(table: Mapping[tuple[str, str], float], present: Collection[str], min_probability: float) -> list[str]:
    """Absent categories that some present anchor predicts with ``P >= min_probability``, most likely first.

    >>> likely_absent({("fork", "knife"): 0.9, ("fork", "cup"): 0.3}, {"fork"}, 0.5)
    ['knife']
    """
    best: dict[str, float] = {}
    for (a, c), p in table.items():
        if a in present and c not in present and p >= min_probability:
            best[c] = max(best.get(c, 0.0), p)
    return sorted(best, key=lambda c: (-best[c], c))


def cooccurrence_negative(caption: str, companions: list[str], rng: random.Random) -> Negative | None:
    """``caption`` with the first insertable companion coordinated with one of its mentions, or None.

    >>> cooccurrence_negative("a purple fork next to a red cup.", ["knife"], random.Random(0)).text
    'a purple fork next to a knife and a red cup.'
    """
    words, found = scan(caption)
    for companion in companions:
        negative = _object_insertion(caption, list(words), list(found), [companion], rng, kind="cooccurrence")
        if negative is not None:
            return negative
    return None
