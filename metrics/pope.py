"""POPE (Polling-based Object Probing Evaluation) as a torchmetrics metric, plus its question sets.

Scoring follows the official ``evaluate.py`` (AoiDragon/POPE):

* **official parser** (default): keep the text before the first ``.``, drop commas, split on single
  spaces; the answer is "no" iff a token is exactly ``No``, ``no`` or ``not``, otherwise "yes". So
  ``NO``, ``Nope.``, ``isn't`` and an empty answer all count as "yes".
* **robust parser** (documented alternative, never the default): case-insensitive; the first sentence
  (up to ``.``, ``!``, ``?`` or a newline) is split into words; a leading ``yes``/``yeah``/``yep``/
  ``correct``/``true`` means yes, a leading ``no``/``nope``/``nah``/``incorrect``/``false`` means no;
  otherwise any negation (``no``, ``not``, ``none``, ``nothing``, ``never``, ``neither``, ``nor``,
  ``cannot``, or a word ending in ``n't``) means no. An empty answer is "yes", as in the official parser.
* positive class = "yes". accuracy, precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2PR/(P+R), yes-ratio = predicted yes / answers; zero denominators give 0.

Answers are joined to questions by question id (a missing or extra id is an error naming it), not by
line order as the official script does.

Question sets: :func:`build_pope_questions` follows the published construction (``main.py`` and
``utils.py`` of the POPE repository): images with >= 3 ground-truth objects, a seeded sample of them,
for each image 3 positive questions on its first 3 objects interleaved with 3 negative questions
(``random``: uniform over the sampled images' objects; ``popular``: most frequent first; ``adversarial``:
most frequently co-occurring with the positive object first). :func:`read_pope_questions` reads the
official question files (JSON Lines with ``question_id``, ``image``, ``text``, ``label``).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.io import instance_objects, load_instances, read_records, require_key

__all__ = [
    "POPE",
    "PopeQuestion",
    "pope",
    "parse_answer",
    "join_answers",
    "build_pope_questions",
    "coco_objects_per_image",
    "read_pope_questions",
    "write_pope_questions",
]

Parser = Literal["official", "robust"]
Strategy = Literal["random", "popular", "adversarial"]
PARSERS: tuple[str, ...] = ("official", "robust")
STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
COUNT_NAMES: tuple[str, ...] = ("tp", "fp", "tn", "fn")

PopeQuestion = dict[str, Any]

# ---------------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------------

_ROBUST_YES = frozenset({"yes", "yeah", "yep", "correct", "true"})
_ROBUST_NO = frozenset({"no", "nope", "nah", "incorrect", "false"})
_NEGATIONS = frozenset({"no", "not", "none", "nothing", "never", "neither", "nor", "cannot", "nope"})
_ROBUST_WORD = re.compile(r"[a-z]+(?:['’][a-z]+)*")


def _official_is_yes(text: str) -> bool:
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _robust_is_yes(text: str) -> bool:
    first = re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0].lower()
    words = _ROBUST_WORD.findall(first)
    if not words:
        return True
    if words[0] in _ROBUST_YES:
        return True
    if words[0] in _ROBUST_NO:
        return False
    return not any(w in _NEGATIONS or w.endswith(("n't", "n’t")) for w in words)


def parse_answer(text: str, parser: Parser = "official") -> bool:
    """True when ``text`` reads as "yes".

    >>> [parse_answer(a) for a in ["Yes, there is.", "No", "NO", "Nope.", "There is not a dog."]]
    [True, False, True, True, False]
    >>> [parse_answer(a, "robust") for a in ["NO", "Nope.", "The dog isn't there.", "Yes, not far away."]]
    [False, False, False, True]
    """
    if not isinstance(text, str):
        raise TypeError(f"POPE answer must be a string, got {type(text).__name__}")
    if parser == "official":
        return _official_is_yes(text)
    if parser == "robust":
        return _robust_is_yes(text)
    raise ValueError(f"unknown POPE parser {parser!r}; expected one of {PARSERS}")


def _label_is_yes(label: Any) -> bool:
    """Official rule: a label is "no" iff it equals "no"; we also accept booleans / 0-1 and reject typos."""
    if isinstance(label, bool):
        return label
    if isinstance(label, int) and label in (0, 1):
        return bool(label)
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower() == "yes"
    raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")


# ---------------------------------------------------------------------------------------------------
# Functional metric
# ---------------------------------------------------------------------------------------------------


def _pope_update(answers: Sequence[str], labels: Sequence[Any] | Tensor, parser: Parser = "official") -> Tensor:
    """Counts ``[tp, fp, tn, fn]`` for one batch (positive class = "yes")."""
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for answer, label in zip(answers, labels):
        pred, gold = parse_answer(answer, parser), _label_is_yes(label)
        if pred and gold:
            tp += 1
        elif pred:
            fp += 1
        elif not gold:
            tn += 1
        else:
            fn += 1
    return torch.tensor([tp, fp, tn, fn], dtype=torch.long)


def _div(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _pope_compute(counts: Tensor) -> dict[str, Tensor]:
    """accuracy, precision, recall, f1, yes_ratio (float64) and the four counts."""
    tp, fp, tn, fn = counts.unbind(0)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return {
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, tp + fp + tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def pope(answers: Sequence[str], labels: Sequence[Any] | Tensor, parser: Parser = "official") -> dict[str, Tensor]:
    """POPE metrics of free-form ``answers`` against yes/no ``labels``.

    >>> out = pope(["Yes.", "No, there is not.", "Yes", "NO"], ["yes", "no", "no", "no"])
    >>> {k: round(v.item(), 4) for k, v in out.items()}
    {'accuracy': 0.5, 'precision': 0.3333, 'recall': 1.0, 'f1': 0.5, 'yes_ratio': 0.75, 'tp': 1, 'fp': 2, 'tn': 1, 'fn': 0}
    """
    return _pope_compute(_pope_update(answers, labels, parser))


class POPE(Metric):
    """POPE as a torchmetrics ``Metric``: ``update(answers, labels)``; states are the four counts.

    >>> metric = POPE()
    >>> metric.update(["Yes, there is a dog.", "There is no cat."], ["yes", "yes"])
    >>> metric.update(["No."], ["no"])
    >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
    {'accuracy': 0.6667, 'precision': 1.0, 'recall': 0.5, 'f1': 0.6667, 'yes_ratio': 0.3333, 'tp': 1, 'fp': 0, 'tn': 1, 'fn': 1}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, parser: Parser = "official", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if parser not in PARSERS:
            raise ValueError(f"unknown POPE parser {parser!r}; expected one of {PARSERS}")
        self.parser: Parser = parser
        for name in COUNT_NAMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str], labels: Sequence[Any] | Tensor) -> None:
        counts = _pope_update(answers, labels, self.parser)
        for name, value in zip(COUNT_NAMES, counts):
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> dict[str, Tensor]:
        return _pope_compute(torch.stack([getattr(self, name) for name in COUNT_NAMES]))


# ---------------------------------------------------------------------------------------------------
# Joining answer files to question files
# ---------------------------------------------------------------------------------------------------


def join_answers(
    questions: Sequence[Mapping[str, Any]],
    answers: Sequence[Mapping[str, Any]],
    answer_key: str | None = None,
    id_key: str = "question_id",
    source: str = "answers",
) -> tuple[list[str], list[Any]]:
    """Answers and labels in question order, joined by ``id_key``.

    ``answer_key`` None: ``"answer"`` (POPE's format) if the record has it, else ``"text"`` (LLaVA's).
    A question without an answer, an answer to no question, or a duplicated id is a ``ValueError``.
    """
    by_id: dict[Any, str] = {}
    for i, record in enumerate(answers):
        qid = require_key(dict(record), id_key, source, i)
        if qid in by_id:
            raise ValueError(f"{source}: duplicate answer for question id {qid!r}")
        key = answer_key or ("answer" if "answer" in record else "text")
        by_id[qid] = require_key(dict(record), key, source, i)
    question_ids = [q[id_key] for q in questions]
    known = set(question_ids)
    if len(known) != len(question_ids):
        dup = next(qid for qid, n in Counter(question_ids).items() if n > 1)
        raise ValueError(f"questions: duplicate question id {dup!r}")
    missing = [qid for qid in question_ids if qid not in by_id]
    if missing:
        raise ValueError(f"{source}: no answer for question id {missing[0]!r} ({len(missing)} missing)")
    extra = [qid for qid in by_id if qid not in known]
    if extra:
        raise ValueError(f"{source}: answer for unknown question id {extra[0]!r} ({len(extra)} extra)")
    return [by_id[qid] for qid in question_ids], [q["label"] for q in questions]


# ---------------------------------------------------------------------------------------------------
# Question sets
# ---------------------------------------------------------------------------------------------------


def read_pope_questions(path: str | Path) -> list[PopeQuestion]:
    """Read an official POPE question file (JSON Lines, despite its ``.json`` name) or a JSON list.

    Each record needs ``question_id`` and ``label`` (``yes``/``no``); ``object`` is added, parsed from
    ``text`` ("Is there a/an X in the image?", the official "imange" typo included).
    """
    records = read_records(path)
    for i, record in enumerate(records):
        require_key(record, "question_id", path, i)
        _label_is_yes(require_key(record, "label", path, i))
        if "object" not in record and isinstance(record.get("text"), str):
            match = re.match(r"is there an? (.+?) in the ima?n?ge\?", record["text"].strip(), re.IGNORECASE)
            if match:
                record["object"] = match.group(1)
    return records


def write_pope_questions(questions: Iterable[PopeQuestion], path: str | Path) -> None:
    """Write questions as JSON Lines (the official layout)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for question in questions:
            f.write(json.dumps(question) + "\n")


def coco_objects_per_image(instances: Mapping[str, Any] | str | Path) -> list[dict[str, Any]]:
    """``[{"image": file_name, "image_id": id, "objects": [category names]}]`` from a COCO instances file.

    Objects are the image's distinct categories in order of first annotation; images follow the
    ``images`` list; images without annotations are left out.
    """
    coco = load_instances(instances)
    objects = instance_objects(coco, str(instances) if not isinstance(instances, Mapping) else "instances")
    return [
        {"image": image.get("file_name", str(image["id"])), "image_id": image["id"], "objects": objects[image["id"]]}
        for image in coco.dataset["images"]
        if objects[image["id"]]
    ]


def _question(qid: int, image: dict[str, Any], obj: str, label: str, template: str, an_template: str) -> PopeQuestion:
    text = (an_template if obj[:1] in "aeiou" else template).format(obj)
    return {"question_id": qid, "image": image["image"], "text": text, "label": label, "object": obj}


def build_pope_questions(
    images: Sequence[Mapping[str, Any]],
    strategy: Strategy,
    num_images: int = 500,
    num_questions: int = 3,
    seed: int = 0,
    template: str = "Is there a {} in the image?",
    an_template: str | None = None,
) -> list[PopeQuestion]:
    """A POPE question set by the published rules (see the module docstring).

    ``images``: ``[{"image", "objects"}]`` (see :func:`coco_objects_per_image`). ``an_template`` None
    derives it as the official code does, ``template.replace("a", "an")``, which also yields its
    "imange" typo; pass ``"Is there an {} in the image?"`` for correct text. ``num_images`` images with
    at least ``num_questions`` objects are sampled with ``random.Random(seed)``; object statistics
    (popularity, co-occurrence) come from the sampled images, as in the official code.

    >>> imgs = [{"image": f"{i}.jpg", "objects": objs} for i, objs in enumerate([["person", "dog", "car"],
    ...     ["person", "cat", "sofa", "tv"], ["dog", "car", "bus"], ["person", "car", "bus", "truck"]])]
    >>> qs = build_pope_questions(imgs, "popular", num_images=3, seed=1)
    >>> [(q["image"], q["object"], q["label"]) for q in qs[:4]]
    [('1.jpg', 'person', 'yes'), ('1.jpg', 'dog', 'no'), ('1.jpg', 'cat', 'yes'), ('1.jpg', 'car', 'no')]
    >>> qs[1]["text"], len(qs)
    ('Is there a dog in the image?', 18)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {STRATEGIES}")
    an_template = an_template if an_template is not None else template.replace("a", "an")
    eligible = [dict(img) for img in images if len(img["objects"]) >= num_questions]
    if len(eligible) < num_images:
        raise ValueError(f"only {len(eligible)} images have >= {num_questions} objects; {num_images} requested")
    rng = random.Random(seed)
    sampled = rng.sample(eligible, num_images)

    frequency: Counter[str] = Counter(o for img in sampled for o in img["objects"])
    all_objects = list(frequency)  # first-seen order, like the official dict keys
    popular = [o for o, _ in sorted(frequency.items(), key=lambda kv: kv[1], reverse=True)]
    co_occur: dict[str, Counter[str]] = {}
    for img in sampled:
        for o in img["objects"]:
            row = co_occur.setdefault(o, Counter())
            row.update(other for other in img["objects"] if other != o)
    ranked_co = {o: [x for x, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in co_occur.items()}

    questions: list[PopeQuestion] = []
    for img in sampled:
        used: list[str] = []
        for positive in img["objects"][:num_questions]:
            used.append(positive)
            questions.append(_question(len(questions) + 1, img, positive, "yes", template, an_template))
            allowed = [o for o in all_objects if o not in used and o not in img["objects"]]
            if not allowed:
                raise ValueError(f"image {img['image']}: no object left to ask a negative question about")
            ranking = {"random": [], "popular": popular, "adversarial": ranked_co.get(positive, [])}[strategy]
            negative = next((o for o in ranking if o not in used and o not in img["objects"]), None)
            while negative is None:  # random strategy, or the ranking ran out: official rejection sampling
                candidate = rng.choice(all_objects)
                negative = candidate if candidate in allowed else None
            used.append(negative)
            questions.append(_question(len(questions) + 1, img, negative, "no", template, an_template))
    return questions
