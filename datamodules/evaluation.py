"""The contract between a datamodule and ``GroundedVLM`` for validation and test: :class:`EvaluationSpec`.

A datamodule that ``GroundedVLM`` evaluates implements :class:`EvaluationSource`: ``evaluation(stage,
chair_mode)`` returns what its evaluation loaders are scored against. The spec also fixes the loader order,
on both sides: loader 0 holds the captioning prompts (CHAIR), loader ``i + 1`` answers question set ``i``
(POPE). The datamodule builds its loaders with :func:`evaluation_loaders` from the same mapping whose keys it
returns as ``question_sets``; the model reads a batch's set with :meth:`EvaluationSpec.question_set`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, runtime_checkable

__all__ = ["ChairMode", "EvaluationSource", "EvaluationSpec", "evaluation_loaders"]

ChairMode = Literal["reference", "lemma"]
T = TypeVar("T")


@dataclass(frozen=True)
class EvaluationSpec:
    """What one stage's evaluation loaders are scored against.

    Args:
        ground_truth: image id -> COCO objects (node words) of the captioned images, parsed in the CHAIR mode
            that was asked for (``metrics.chair_gt``).
        question_sets: names of the yes/no question sets (each one POPE metric), in loader order.
        probes: (anchor, companion) pairs whose companion hallucination the report tracks.
        categories: the dataset's object categories (COCO names): the vocabulary of candidate-word scores.
    """

    ground_truth: Mapping[int | str, frozenset[str]]
    question_sets: tuple[str, ...] = ()
    probes: tuple[tuple[str, str], ...] = ()
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.question_sets)) != len(self.question_sets):
            raise ValueError(f"EvaluationSpec.question_sets must be unique names, got {list(self.question_sets)}")

    def question_set(self, dataloader_idx: int) -> str | None:
        """The question set that loader ``dataloader_idx`` answers; None for the captioning loader (0)."""
        if not 0 <= dataloader_idx <= len(self.question_sets):
            raise IndexError(f"loader {dataloader_idx}: the evaluation has 1 + {len(self.question_sets)} loaders")
        return None if dataloader_idx == 0 else self.question_sets[dataloader_idx - 1]


@runtime_checkable
class EvaluationSource(Protocol):
    """A datamodule ``GroundedVLM`` can validate and test with."""

    def evaluation(self, stage: str, chair_mode: ChairMode = "reference") -> EvaluationSpec:
        """The spec of ``stage`` (``fit``/``validate`` evaluate the validation split, ``test`` the test split)."""
        ...


def evaluation_loaders(captions: T, questions: Mapping[str, T]) -> list[T]:
    """``[captions, *questions.values()]``: loader 0 for CHAIR, loader ``i + 1`` for the ``i``-th question set.

    The datamodule's ``evaluation`` returns ``question_sets=tuple(questions)`` of the same mapping, so
    :meth:`EvaluationSpec.question_set` names each loader's set.

    >>> spec = EvaluationSpec(ground_truth={}, question_sets=("random", "adversarial"))
    >>> evaluation_loaders("captions", {"random": "r", "adversarial": "a"}), spec.question_set(2)
    (['captions', 'r', 'a'], 'adversarial')
    """
    return [captions, *questions.values()]
