"""AMBER's generative-task metrics (Wang et al., 2023): CHAIR, Cover, Hal and Cog.

Inputs are AMBER's own files (junyangwang0410/AMBER, ``data/``):

* ``annotations.json``: a list; entry ``id - 1`` describes query ``id``. Generative entries have
  ``"type": "generative"``, ``"truth"`` (objects in the image) and ``"hallu"`` (objects a model is
  likely to hallucinate there);
* ``relation.json``: word association, ``{object: [related words]}``; its keys and values form the
  object vocabulary;
* ``safe_words.txt``: one word per line; these words are never counted as hallucinations;
* responses: a JSON list / JSON Lines of ``{"id": int, "response": str}``.

Per response, AMBER takes the response's nouns that are in the vocabulary (repeats kept). A noun that is
a safe word is not a hallucination; a noun that is a truth object or associated with one covers that
object; a noun that is a ``hallu`` object or associated with one marks that object as "cognitively"
hallucinated; every noun not covered by the truth (or safe) is a hallucination. Then

* ``CHAIR`` = hallucinated nouns / nouns; ``Cover`` = covered truth objects / truth objects;
* ``Hal`` = responses with >= 1 hallucinated noun / responses; ``Cog`` = hit hallu objects / hallu objects.

Differences from AMBER's ``inference.py``, which needs resources that cannot be installed offline:
nouns are found without a POS tagger (every vocabulary word counts, singularised with the ``lemma``
rules of :mod:`metrics.text` instead of WordNet), and the spaCy ``en_core_web_lg`` similarity test
(> 0.8) is replaced by the optional ``similar(word_a, word_b) -> bool`` argument (exact match only when
it is None). Numbers are therefore close to, not identical with, the official script's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.english import singularize_lemma
from metrics.io import read_json, read_records, require_key
from metrics.text import word_tokenize

__all__ = ["AMBER", "AmberAnnotations", "amber", "load_amber_annotations", "read_amber_responses"]

COUNT_NAMES: tuple[str, ...] = (
    "num_nouns", "num_hallucinated_nouns", "num_truth", "num_covered_truth",
    "num_hallu", "num_hit_hallu", "num_responses", "num_hallucinated_responses",
)
Similar = Callable[[str, str], bool]


@dataclass(frozen=True)
class AmberAnnotations:
    """AMBER's generative ground truth: query id -> (truth, hallu), word association, safe words."""

    truth: Mapping[int, tuple[str, ...]]
    hallu: Mapping[int, tuple[str, ...]]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(self.association) | frozenset(w for words in self.association.values() for w in words)


def load_amber_annotations(
    annotations: str | Path, relation: str | Path, safe_words: str | Path
) -> AmberAnnotations:
    """Read AMBER's ``annotations.json``, ``relation.json`` and ``safe_words.txt``."""
    entries = read_json(annotations)
    truth, hallu = {}, {}
    for index, entry in enumerate(entries):
        if entry.get("type") == "generative":
            qid = int(entry.get("id", index + 1))
            truth[qid] = tuple(entry["truth"])
            hallu[qid] = tuple(entry["hallu"])
    association = {k: tuple(v) for k, v in read_json(relation).items()}
    safe = frozenset(line.strip() for line in Path(safe_words).read_text(encoding="utf-8").splitlines() if line.strip())
    return AmberAnnotations(truth, hallu, association, safe)


def _nouns(response: str, vocabulary: frozenset[str]) -> list[str]:
    words = (singularize_lemma(token) for token in word_tokenize(response.lower()))
    return [w for w in words if w in vocabulary]


def _candidates(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> list[tuple[int, str]]:
    """(object index, word) pairs in AMBER's search order: association lists first, then the objects."""
    pairs = [(i, w) for i, obj in enumerate(objects) for w in association.get(obj, ())]
    return pairs + list(enumerate(objects))


def _find(noun: str, candidates: Sequence[tuple[int, str]], match: Callable[[str, str], bool]) -> int | None:
    return next((i for i, word in candidates if match(noun, word)), None)


def _same(a: str, b: str) -> bool:
    return a == b


def _amber_update(
    ids: Sequence[int], responses: Sequence[str], annotations: AmberAnnotations, similar: Similar | None = None
) -> Tensor:
    """Counts in :data:`COUNT_NAMES` order for one batch."""
    if len(ids) != len(responses):
        raise ValueError(f"{len(ids)} ids but {len(responses)} responses")
    vocabulary = annotations.vocabulary
    counts = [0] * len(COUNT_NAMES)
    for qid, response in zip(ids, responses):
        qid = int(qid)
        if qid not in annotations.truth:
            raise KeyError(f"AMBER query id {qid} is not a generative query of the annotations")
        truth, hallu = annotations.truth[qid], annotations.hallu[qid]
        covered, hit, hallucinated = set(), set(), 0
        safe = _candidates(truth, annotations.association)
        risky = _candidates(hallu, annotations.association)
        nouns = _nouns(response, vocabulary)
        for noun in nouns:  # same order of tests as AMBER's inference.py
            if noun in annotations.safe_words:
                continue
            owner = _find(noun, safe, _same)
            if owner is not None:
                covered.add(owner)
                continue
            for match in (_same, similar) if similar is not None else (_same,):
                found = _find(noun, risky, match)
                if found is not None:
                    hit.add(found)
            if similar is not None:
                owner = _find(noun, safe, similar)
                if owner is not None:
                    covered.add(owner)
                    continue
            hallucinated += 1
        for k, v in enumerate(
            (len(nouns), hallucinated, len(truth), len(covered), len(hallu), len(hit), 1, int(hallucinated > 0))
        ):
            counts[k] += v
    return torch.tensor(counts, dtype=torch.long)


def _amber_compute(counts: Tensor) -> dict[str, Tensor]:
    c = dict(zip(COUNT_NAMES, counts.to(torch.float64).unbind(0)))

    def div(a: str, b: str) -> Tensor:
        return c[a] / c[b] if c[b] > 0 else torch.zeros((), dtype=torch.float64)

    return {
        "CHAIR": div("num_hallucinated_nouns", "num_nouns"),
        "Cover": div("num_covered_truth", "num_truth"),
        "Hal": div("num_hallucinated_responses", "num_responses"),
        "Cog": div("num_hit_hallu", "num_hallu"),
    }


def amber(
    ids: Sequence[int], responses: Sequence[str], annotations: AmberAnnotations, similar: Similar | None = None
) -> dict[str, Tensor]:
    """AMBER generative metrics (fractions; AMBER prints them x100).

    >>> ann = AmberAnnotations({1: ("dog", "grass")}, {1: ("cat", "frisbee")},
    ...     {"dog": ("puppy",), "grass": ("lawn",), "cat": ("kitten",), "frisbee": (), "sky": ()}, frozenset())
    >>> out = amber([1], ["A puppy and a kitten on the lawn under the sky."], ann)
    >>> {k: round(v.item(), 4) for k, v in out.items()}
    {'CHAIR': 0.5, 'Cover': 1.0, 'Hal': 1.0, 'Cog': 0.5}
    """
    return _amber_compute(_amber_update(ids, responses, annotations, similar))


class AMBER(Metric):
    """AMBER generative metrics as a torchmetrics ``Metric`` (annotations at construction).

    >>> ann = AmberAnnotations({1: ("dog",), 2: ("car",)}, {1: ("cat",), 2: ("person",)},
    ...     {"dog": (), "cat": ("kitten",), "car": (), "person": ("man",)}, frozenset())
    >>> metric = AMBER(ann)
    >>> metric.update([1], ["A dog and a kitten."])
    >>> metric.update(torch.tensor([2]), ["A car."])
    >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
    {'CHAIR': 0.3333, 'Cover': 1.0, 'Hal': 0.5, 'Cog': 0.5}
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, annotations: AmberAnnotations, similar: Similar | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.annotations = annotations
        self.similar = similar
        for name in COUNT_NAMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ids: Sequence[int] | Tensor, responses: Sequence[str]) -> None:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        counts = _amber_update(ids, responses, self.annotations, self.similar)
        for name, value in zip(COUNT_NAMES, counts):
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> dict[str, Tensor]:
        return _amber_compute(torch.stack([getattr(self, name) for name in COUNT_NAMES]))


def read_amber_responses(path: str | Path, id_key: str = "id", response_key: str = "response") -> tuple[list[int], list[str]]:
    """``(ids, responses)`` from AMBER's inference-data format (JSON list or JSON Lines)."""
    records = read_records(path)
    ids = [int(require_key(r, id_key, path, i)) for i, r in enumerate(records)]
    return ids, [str(require_key(r, response_key, path, i)) for i, r in enumerate(records)]
