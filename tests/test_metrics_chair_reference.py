"""CHAIR in ``reference`` mode reproduces the reference implementation on 12 real OPERA caption logs.

Data: ``tests/data/opera_chair/`` (LLaVA-1.5, InstructBLIP, MiniGPT-4 and Shikra captions on COCO;
``expected.json.gz`` = the reference's output caption by caption; sources in its README).
"""

from __future__ import annotations

import pytest
import torch

from metrics.chair import CHAIR, COUNT_NAMES, _chair_update, chair
from metrics.chair_gt import load_gt_objects
from tests.reference_data import GT_OBJECTS, LOGS, read_log
from tests.reference_data import expected as read_expected


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_expected()


@pytest.fixture(scope="module")
def ground_truth() -> dict:
    return load_gt_objects(GT_OBJECTS)


def _log(name: str) -> list[dict]:
    return read_log(name)


@pytest.mark.parametrize("name", LOGS)
def test_log_matches_reference_caption_by_caption(name: str, expected: dict, ground_truth: dict) -> None:
    ref = expected["logs"][name]
    records = _log(name)
    assert len(records) == len(ref["sentences"]) == 500
    counts, results = _chair_update([r["caption"] for r in records], [r["image_id"] for r in records], ground_truth)

    for result, sentence in zip(results, ref["sentences"]):
        where = f"{name} line {sentence['index']}"
        assert result.image_id == sentence["image_id"], where
        assert result.mentioned_words == sentence["mscoco_words"], where
        assert result.mentioned_objects == sentence["mscoco_generated_words"], where
        assert result.hallucinated_objects == sentence["hallucinated_objects"], where
        assert result.recalled_gt_objects == sentence["recalled_gt_objects"], where

    got_counts = dict(zip(COUNT_NAMES, counts.tolist()))
    assert {k: got_counts[k] for k in ref["counts"]} == ref["counts"]
    metrics = chair([r["caption"] for r in records], [r["image_id"] for r in records], ground_truth)
    for key, value in ref["overall_metrics"].items():
        assert metrics[key].item() == value, key  # exact float equality, as the reference computes it
        assert f"{metrics[key].item() * 100:.1f}" == ref["overall_metrics_as_printed"][key]


def test_metric_class_in_batches_equals_reference(expected: dict, ground_truth: dict) -> None:
    name = "instructblip_greedy"  # contains the empty-gt images: every mention there is hallucinated
    records = _log(name)
    metric = CHAIR(ground_truth)
    for start in range(0, len(records), 64):
        batch = records[start : start + 64]
        metric.update([r["caption"] for r in batch], torch.tensor([r["image_id"] for r in batch]))
    out = metric.compute()
    assert {k: out[k].item() for k in ("CHAIRs", "CHAIRi", "Recall")} == expected["logs"][name]["overall_metrics"]
    assert {k: v for k, v in metric.counts().items() if k in expected["logs"][name]["counts"]} == expected["logs"][name]["counts"]
