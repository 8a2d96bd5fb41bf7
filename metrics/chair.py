"""CHAIR (Caption Hallucination Assessment with Image Relevance) as a torchmetrics metric.

Definitions, as in the reference (LisaAnne/Hallucination, Maxlinn/CHAIR-metric-standalone):

* ``CHAIRs`` = captions with >= 1 hallucinated object mention / captions;
* ``CHAIRi`` = hallucinated mentions / mentions (repeated mentions counted);
* ``Recall`` = sum over captions of |mentioned objects ∩ gt| / sum over captions of |gt|;
* ``Len``    = mean number of words per caption after tokenisation and double-word merging
  (OPERA prints ``100 * Len``-scaled values; ours is the plain mean).

A mention is hallucinated when its node word is not among the image's ground-truth objects
(:mod:`metrics.chair_gt`). Mentions are found by :class:`metrics.coco_objects.ObjectParser`, in
``reference`` mode (default, reproduces the reference exactly) or ``lemma`` mode (quirks fixed).
An empty caption is a caption with no mentions. Zero denominators give 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.chair_gt import GroundTruth, normalize_ground_truth
from metrics.coco_objects import COCO_CATEGORIES, Mode, ObjectParser, get_parser
from metrics.io import normalize_image_id

__all__ = ["CHAIR", "CaptionResult", "chair", "chair_captions", "COUNT_NAMES"]

# Integer counts from which every CHAIR number is computed (also the DDP-reduced states).
COUNT_NAMES: tuple[str, ...] = (
    "num_captions",
    "num_hallucinated_captions",
    "num_object_mentions",
    "num_hallucinated_mentions",
    "sum_gt_objects",
    "sum_recalled_gt_objects",
    "num_words",
    "num_skipped_unknown",
)
_CATEGORY_INDEX = {name: i for i, name in enumerate(COCO_CATEGORIES)}
_DETAIL_STATES = (
    ("detail_image_ids", torch.long),
    ("detail_num_mentions", torch.long),
    ("detail_objects", torch.long),
    ("detail_hallucinated", torch.bool),
)


@dataclass
class CaptionResult:
    """What CHAIR found in one caption."""

    image_id: int | str
    caption: str
    mentioned_words: list[str]  # surface words, e.g. "woman"
    mentioned_objects: list[str]  # node words in mention order, with repeats
    hallucinated_objects: list[str]  # node words of the hallucinated mentions, in order, with repeats
    gt_objects: list[str]  # sorted
    recalled_gt_objects: list[str] = field(default_factory=list)  # sorted, unique
    num_words: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mentioned_objects": self.mentioned_objects,
            "hallucinated_objects": self.hallucinated_objects,
            "gt_objects": self.gt_objects,
        }


def _as_ground_truth(ground_truth: Mapping[Any, Any], mode: Mode) -> GroundTruth:
    """Ids normalised (digit strings -> int) and names mapped to node words (cheap: a dict lookup each)."""
    return normalize_ground_truth(ground_truth, mode)


def _score_caption(caption: str, image_id: int | str, gt: frozenset[str], parser: ObjectParser) -> CaptionResult:
    if not isinstance(caption, str):
        raise TypeError(f"caption for image {image_id!r} must be a string, got {type(caption).__name__}")
    parsed = parser(caption)
    hallucinated = [obj for obj in parsed.objects if obj not in gt]
    recalled = sorted({obj for obj in parsed.objects if obj in gt})
    return CaptionResult(
        image_id=image_id,
        caption=caption,
        mentioned_words=list(parsed.words),
        mentioned_objects=list(parsed.objects),
        hallucinated_objects=hallucinated,
        gt_objects=sorted(gt),
        recalled_gt_objects=recalled,
        num_words=parsed.num_words,
    )


def chair_captions(
    captions: Sequence[str],
    image_ids: Sequence[Any] | Tensor,
    ground_truth: GroundTruth,
    parser: ObjectParser,
    skip_unknown: bool = False,
) -> tuple[list[CaptionResult], int]:
    """Per-caption results (input order) and the number of captions skipped for an unknown image id."""
    if isinstance(image_ids, Tensor):
        image_ids = image_ids.tolist()
    if len(captions) != len(image_ids):
        raise ValueError(f"{len(captions)} captions but {len(image_ids)} image ids")
    results, skipped = [], 0
    for caption, raw_id in zip(captions, image_ids):
        image_id = normalize_image_id(raw_id)
        gt = ground_truth.get(image_id)
        if gt is None:
            if skip_unknown:
                skipped += 1
                continue
            raise KeyError(f"image id {raw_id!r} is not in the CHAIR ground truth (use skip_unknown to skip it)")
        results.append(_score_caption(caption, image_id, gt, parser))
    return results, skipped


def _counts(results: Sequence[CaptionResult], skipped: int) -> Tensor:
    values = (
        len(results),
        sum(1 for r in results if r.hallucinated_objects),
        sum(len(r.mentioned_objects) for r in results),
        sum(len(r.hallucinated_objects) for r in results),
        sum(len(r.gt_objects) for r in results),
        sum(len(r.recalled_gt_objects) for r in results),
        sum(r.num_words for r in results),
        skipped,
    )
    return torch.tensor(values, dtype=torch.long)


def _chair_update(
    captions: Sequence[str],
    image_ids: Sequence[Any] | Tensor,
    ground_truth: GroundTruth,
    mode: Mode = "reference",
    skip_unknown: bool = False,
) -> tuple[Tensor, list[CaptionResult]]:
    """Counts (in :data:`COUNT_NAMES` order) and per-caption results for one batch."""
    results, skipped = chair_captions(captions, image_ids, ground_truth, get_parser(mode), skip_unknown)
    return _counts(results, skipped), results


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _chair_compute(counts: Tensor) -> dict[str, Tensor]:
    """CHAIRs, CHAIRi, Recall, Len (float64) from counts in :data:`COUNT_NAMES` order."""
    c = dict(zip(COUNT_NAMES, counts.unbind(0)))
    return {
        "CHAIRs": _safe_div(c["num_hallucinated_captions"], c["num_captions"]),
        "CHAIRi": _safe_div(c["num_hallucinated_mentions"], c["num_object_mentions"]),
        "Recall": _safe_div(c["sum_recalled_gt_objects"], c["sum_gt_objects"]),
        "Len": _safe_div(c["num_words"], c["num_captions"]),
    }


def chair(
    captions: Sequence[str],
    image_ids: Sequence[Any] | Tensor,
    ground_truth: Mapping[Any, Any],
    mode: Mode = "reference",
    skip_unknown: bool = False,
) -> dict[str, Tensor]:
    """CHAIR of ``captions`` against ``ground_truth`` (image id -> object names).

    >>> gt = {1: ["dog", "person"], 2: ["cat"]}
    >>> caps = ["A man walks two dogs past a bench.", "A kitten sleeps on a sofa."]
    >>> {k: round(v.item(), 4) for k, v in chair(caps, [1, 2], gt).items()}
    {'CHAIRs': 1.0, 'CHAIRi': 0.4, 'Recall': 1.0, 'Len': 8.0}
    """
    counts, _ = _chair_update(captions, image_ids, _as_ground_truth(ground_truth, mode), mode, skip_unknown)
    return _chair_compute(counts)


class CHAIR(Metric):
    """CHAIR as a torchmetrics ``Metric``: ground truth at construction, captions + image ids per update.

    States are integer counts reduced with ``sum`` across processes. With ``return_details=True`` the
    per-caption mentions are also kept (as category indices, concatenated across processes) and
    :meth:`details` decodes them; image ids must then be integers.

    >>> metric = CHAIR({1: ["dog", "person"], 2: ["cat"]})
    >>> metric.update(["A man walks two dogs past a bench."], [1])
    >>> metric.update(["A kitten sleeps on a sofa."], [2])
    >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
    {'CHAIRs': 1.0, 'CHAIRi': 0.4, 'Recall': 1.0, 'Len': 8.0}
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        ground_truth: Mapping[Any, Any],
        mode: Mode = "reference",
        skip_unknown: bool = False,
        return_details: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mode: Mode = get_parser(mode).mode
        self.ground_truth = _as_ground_truth(ground_truth, mode)
        self.skip_unknown = skip_unknown
        self.return_details = return_details
        for name in COUNT_NAMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if return_details:
            for name, _ in _DETAIL_STATES:
                self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, captions: Sequence[str] | str, image_ids: Sequence[Any] | Tensor | int | str) -> None:
        if isinstance(captions, str):
            captions = [captions]
        if isinstance(image_ids, (int, str)) or (isinstance(image_ids, Tensor) and image_ids.ndim == 0):
            image_ids = [image_ids]
        counts, results = _chair_update(captions, image_ids, self.ground_truth, self.mode, self.skip_unknown)
        for name, value in zip(COUNT_NAMES, counts):
            setattr(self, name, getattr(self, name) + value.to(self.device))
        if self.return_details:
            self._store_details(results)

    def _store_details(self, results: Sequence[CaptionResult]) -> None:
        ids = [r.image_id for r in results]
        if not all(isinstance(i, int) for i in ids):
            raise TypeError("CHAIR(return_details=True) needs integer image ids")
        mentions = [o for r in results for o in r.mentioned_objects]
        flags = [o not in set(r.gt_objects) for r in results for o in r.mentioned_objects]
        device = self.device
        self.detail_image_ids.append(torch.tensor(ids, dtype=torch.long, device=device))
        self.detail_num_mentions.append(
            torch.tensor([len(r.mentioned_objects) for r in results], dtype=torch.long, device=device)
        )
        self.detail_objects.append(torch.tensor([_CATEGORY_INDEX[o] for o in mentions], dtype=torch.long, device=device))
        self.detail_hallucinated.append(torch.tensor(flags, dtype=torch.bool, device=device))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        # A process that saw no captions still has to take part in the gather: give it empty tensors.
        if self.return_details:
            for name, dtype in _DETAIL_STATES:
                state = getattr(self, name)
                if isinstance(state, list) and not state:
                    state.append(torch.zeros(0, dtype=dtype, device=self.device))
        super().sync(*args, **kwargs)

    def counts(self) -> dict[str, int]:
        """The (synced) integer counts."""
        return {name: int(getattr(self, name)) for name in COUNT_NAMES}

    def compute(self) -> dict[str, Tensor]:
        return _chair_compute(torch.stack([getattr(self, name) for name in COUNT_NAMES]))

    def details(self) -> list[dict[str, Any]]:
        """Per caption: ``image_id``, ``mentioned_objects``, ``hallucinated_objects`` (update order per
        process; after DDP sync, rank 0's captions first)."""
        if not self.return_details:
            raise RuntimeError("construct CHAIR(return_details=True) to keep per-caption details")

        def flat(state: Any, dtype: torch.dtype) -> Tensor:
            if isinstance(state, Tensor):
                return state
            return torch.cat(state) if state else torch.zeros(0, dtype=dtype)

        was_synced = self._is_synced
        if not was_synced:
            self.sync(should_sync=self._to_sync, dist_sync_fn=self.dist_sync_fn)
        try:
            ids = flat(self.detail_image_ids, torch.long).tolist()
            sizes = flat(self.detail_num_mentions, torch.long).tolist()
            objects = flat(self.detail_objects, torch.long).tolist()
            flags = flat(self.detail_hallucinated, torch.bool).tolist()
        finally:
            if not was_synced and self._is_synced:
                self.unsync()
        out, start = [], 0
        for image_id, size in zip(ids, sizes):
            names = [COCO_CATEGORIES[i] for i in objects[start : start + size]]
            halluc = [n for n, f in zip(names, flags[start : start + size]) if f]
            out.append({"image_id": image_id, "mentioned_objects": names, "hallucinated_objects": halluc})
            start += size
        return out
