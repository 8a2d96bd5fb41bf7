"""Hallucination metrics as torchmetrics: CHAIR, POPE, MME, AMBER.

Each metric has a functional form (``chair``, ``pope``, ``mme``, ``amber``) and a ``Metric`` class whose
states are counts summed across processes, so it can run inside Lightning validation under DDP.
See ``docs/metrics.md`` for definitions, input formats and the reference-parity checks.
"""

from metrics.amber import AMBER, amber, load_amber_annotations
from metrics.chair import CHAIR, chair
from metrics.chair_gt import build_coco_ground_truth, load_ground_truth, load_gt_objects
from metrics.coco_objects import COCO_CATEGORIES, ObjectParser
from metrics.mme import MME, mme
from metrics.pope import POPE, build_pope_questions, parse_answer, pope, read_pope_questions

__all__ = [
    "AMBER",
    "CHAIR",
    "COCO_CATEGORIES",
    "MME",
    "POPE",
    "ObjectParser",
    "amber",
    "build_coco_ground_truth",
    "build_pope_questions",
    "chair",
    "load_amber_annotations",
    "load_ground_truth",
    "load_gt_objects",
    "mme",
    "parse_answer",
    "pope",
    "read_pope_questions",
]
