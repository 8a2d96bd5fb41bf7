"""MME (Fu et al., 2023) yes/no benchmark as a torchmetrics metric.

Scoring follows MME's official ``eval_tool/calculation.py``:

* the prediction is lower-cased; ``yes``/``no`` are taken as they are, otherwise the first 4 characters
  decide: containing ``yes`` -> yes, else containing ``no`` -> no, else "other" (always wrong);
* per subtask: ``acc`` = correct answers / questions; ``acc_plus`` = images whose questions are all
  answered correctly / images (MME asks 2 questions per image); ``score = 100 * (acc + acc_plus)``;
* ``perception`` = sum of the 10 perception subtask scores, ``cognition`` = sum of the 4 cognition ones
  (subtasks absent from the input add nothing).

Input formats (:func:`read_mme_results`): the official results folder, one ``<subtask>.txt`` per subtask
with tab-separated lines ``image<TAB>question<TAB>ground truth<TAB>prediction``; or a JSON Lines / JSON
list file of records with subtask, image, ground-truth and prediction keys (names configurable).
The official script pairs consecutive lines; here questions are grouped by (subtask, image), which is
the same for official files and also works when lines are shuffled or split across processes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.io import read_records, require_key

__all__ = ["MME", "MME_PERCEPTION", "MME_COGNITION", "mme", "parse_mme_answer", "read_mme_results"]

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS: tuple[str, ...] = MME_PERCEPTION + MME_COGNITION
_INDEX = {name: i for i, name in enumerate(MME_SUBTASKS)}


def parse_mme_answer(prediction: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, by the official rule.

    >>> [parse_mme_answer(p) for p in ["Yes", "No, it is not.", "There is no dog.", "Not sure", "nope"]]
    ['yes', 'no', 'other', 'no', 'no']
    """
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _image_key(image: str) -> int:
    """Stable 63-bit id of an image name (for grouping questions in a tensor state)."""
    return int.from_bytes(hashlib.blake2b(image.encode(), digest_size=8).digest(), "little") >> 1


def _subtask_index(subtask: str) -> int:
    if subtask not in _INDEX:
        raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {MME_SUBTASKS}")
    return _INDEX[subtask]


def _mme_update(
    subtasks: Sequence[str], images: Sequence[str], labels: Sequence[str], predictions: Sequence[str]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per question: subtask index, image key, correct (bool)."""
    if not len(subtasks) == len(images) == len(labels) == len(predictions):
        raise ValueError("subtasks, images, labels and predictions must have the same length")
    for label in labels:
        if label.strip().lower() not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {label!r}")
    correct = [parse_mme_answer(p) == g.strip().lower() for p, g in zip(predictions, labels)]
    return (
        torch.tensor([_subtask_index(s) for s in subtasks], dtype=torch.long),
        torch.tensor([_image_key(i) for i in images], dtype=torch.long),
        torch.tensor(correct, dtype=torch.bool),
    )


def _mme_compute(subtask: Tensor, image: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """``<subtask>/acc``, ``<subtask>/acc_plus``, ``<subtask>/score`` (subtasks present), ``perception``,
    ``cognition``, ``total`` (float64; scores on MME's 0-200 scale per subtask)."""
    questions: dict[int, list[bool]] = defaultdict(list)
    per_image: dict[tuple[int, int], bool] = {}
    for s, i, c in zip(subtask.tolist(), image.tolist(), correct.tolist()):
        questions[s].append(c)
        per_image[(s, i)] = per_image.get((s, i), True) and c
    images: dict[int, list[bool]] = defaultdict(list)
    for (s, _), ok in per_image.items():
        images[s].append(ok)
    out: dict[str, Tensor] = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    for s in sorted(questions):
        name = MME_SUBTASKS[s]
        acc = sum(questions[s]) / len(questions[s])
        acc_plus = sum(images[s]) / len(images[s])
        score = 100 * acc + 100 * acc_plus
        out[f"{name}/acc"] = torch.tensor(acc, dtype=torch.float64)
        out[f"{name}/acc_plus"] = torch.tensor(acc_plus, dtype=torch.float64)
        out[f"{name}/score"] = torch.tensor(score, dtype=torch.float64)
        totals["perception" if name in MME_PERCEPTION else "cognition"] += score
    out["perception"] = torch.tensor(totals["perception"], dtype=torch.float64)
    out["cognition"] = torch.tensor(totals["cognition"], dtype=torch.float64)
    out["total"] = out["perception"] + out["cognition"]
    return out


def mme(
    subtasks: Sequence[str], images: Sequence[str], labels: Sequence[str], predictions: Sequence[str]
) -> dict[str, Tensor]:
    """MME scores of ``predictions``.

    >>> out = mme(["existence"] * 4, ["a.jpg", "a.jpg", "b.jpg", "b.jpg"], ["Yes", "No", "Yes", "No"],
    ...           ["Yes", "No", "Yes", "Yes"])
    >>> [round(out[k].item(), 2) for k in ("existence/acc", "existence/acc_plus", "perception")]
    [0.75, 0.5, 125.0]
    """
    return _mme_compute(*_mme_update(subtasks, images, labels, predictions))


class MME(Metric):
    """MME as a torchmetrics ``Metric``: ``update(subtasks, images, labels, predictions)``.

    acc+ needs all questions of an image, which may land in different batches or processes, so the
    states are per-question tensors concatenated across processes (subtask index, image key, correct).

    >>> metric = MME()
    >>> metric.update(["count", "count"], ["x.jpg", "x.jpg"], ["yes", "no"], ["Yes.", "No."])
    >>> metric.update(["OCR", "OCR"], ["y.jpg", "y.jpg"], ["yes", "no"], ["Yes", "Yes"])
    >>> {k: v.item() for k, v in metric.compute().items() if "/" not in k}
    {'perception': 250.0, 'cognition': 0.0, 'total': 250.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("subtask", default=[], dist_reduce_fx="cat")
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(
        self, subtasks: Sequence[str], images: Sequence[str], labels: Sequence[str], predictions: Sequence[str]
    ) -> None:
        s, i, c = _mme_update(subtasks, images, labels, predictions)
        self.subtask.append(s.to(self.device))
        self.image.append(i.to(self.device))
        self.correct.append(c.to(self.device))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        # A process that saw no data still has to take part in the gather: give it empty tensors.
        for name, dtype in (("subtask", torch.long), ("image", torch.long), ("correct", torch.bool)):
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, dtype=dtype, device=self.device))
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        def flat(state: Any, dtype: torch.dtype) -> Tensor:
            if isinstance(state, Tensor):
                return state
            return torch.cat(state) if state else torch.zeros(0, dtype=dtype)

        return _mme_compute(flat(self.subtask, torch.long), flat(self.image, torch.long), flat(self.correct, torch.bool))


def read_mme_results(
    path: str | Path,
    subtask_key: str = "category",
    image_key: str = "image",
    label_key: str = "answer",
    prediction_key: str = "prediction",
) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(subtasks, images, labels, predictions)`` from an official results folder or a records file."""
    path = Path(path)
    subtasks: list[str] = []
    images: list[str] = []
    labels: list[str] = []
    predictions: list[str] = []
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.stem in _INDEX)
        if not files:
            raise FileNotFoundError(f"{path}: no <subtask>.txt files of MME subtasks {MME_SUBTASKS}")
        for file in files:
            for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 4:
                    raise ValueError(f"{file}: line {lineno}: expected 4 tab-separated fields, got {len(fields)}")
                subtasks.append(file.stem)
                images.append(fields[0])
                labels.append(fields[2])
                predictions.append(fields[3])
        return subtasks, images, labels, predictions
    for i, record in enumerate(read_records(path)):
        subtasks.append(str(require_key(record, subtask_key, path, i)))
        images.append(str(require_key(record, image_key, path, i)))
        labels.append(str(require_key(record, label_key, path, i)))
        predictions.append(str(require_key(record, prediction_key, path, i)))
    return subtasks, images, labels, predictions
