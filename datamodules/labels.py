"""Grounding labels: per character and per LM token, 1 on grounded object words, 0 on hallucinated ones.

``IGNORE`` (-100) marks everything else; it is also the ignore index of the LM loss (:mod:`models.objective`)
and of the collated labels (:mod:`datamodules.collate`). Spans come from :mod:`datamodules.negatives`; LM
tokens are mapped through a Hugging Face tokenizer's ``offset_mapping`` (DESIGN.md section 4).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["IGNORE", "Span", "char_labels", "token_labels"]

IGNORE = -100
Span = tuple[int, int]


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
