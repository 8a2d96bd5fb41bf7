"""CHAIR metric: ground truth from COCO files (with cache), errors, Metric vs functional, details."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from metrics.chair import CHAIR, chair
from metrics.chair_gt import build_coco_ground_truth, load_ground_truth, load_gt_objects


def write_coco(folder: Path) -> Path:
    """Two splits. Image 1: instances dog+person, captions add 'frisbee'. Image 2: instances cat; its
    caption mentions a 'sofa' (couch). Image 3 (val): no instances, caption mentions 'bus' -> 'bu' in
    reference mode (no object) but 'bus' in lemma mode. Image 4: listed, no annotations at all."""
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"},
                  {"id": 6, "name": "bus"}]
    train_inst = {"images": [{"id": 1}, {"id": 2}], "categories": categories, "annotations": [
        {"id": 10, "image_id": 1, "category_id": 18}, {"id": 11, "image_id": 1, "category_id": 1},
        {"id": 12, "image_id": 2, "category_id": 17}]}
    val_inst = {"images": [{"id": 3}, {"id": 4}], "categories": categories, "annotations": []}
    train_caps = {"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "A man throws a frisbee to his dog."},
        {"id": 2, "image_id": 2, "caption": "A kitten on a sofa."}]}
    val_caps = {"images": [{"id": 3}, {"id": 4}], "annotations": [
        {"id": 3, "image_id": 3, "caption": "A bus on a street."}]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in [("instances_train2014.json", train_inst), ("instances_val2014.json", val_inst),
                       ("captions_train2014.json", train_caps), ("captions_val2014.json", val_caps)]:
        (folder / name).write_text(json.dumps(data))
    return folder


def test_coco_ground_truth_is_instances_union_caption_objects(tmp_path: Path) -> None:
    coco = write_coco(tmp_path / "coco")
    gt = build_coco_ground_truth(coco, cache_dir=tmp_path / "cache")
    assert gt == {1: {"dog", "person", "frisbee"}, 2: {"cat", "couch"}, 3: set(), 4: set()}
    gt_lemma = build_coco_ground_truth(coco, mode="lemma", cache_dir=tmp_path / "cache")
    assert gt_lemma[3] == {"bus"}


def test_coco_ground_truth_cache_is_keyed_by_files_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coco = write_coco(tmp_path / "coco")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="metrics.chair_gt"):
        first = build_coco_ground_truth(coco, cache_dir=cache)
    assert "built 4 images" in caplog.text and "cached to" in caplog.text
    assert len(list(cache.glob("coco_gt_*.json"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metrics.chair_gt"):
        assert build_coco_ground_truth(coco, cache_dir=cache) == first
    assert "loaded 4 images from cache" in caplog.text

    # Changing an input file gives a new key: the cache is rebuilt, not reused.
    caps = json.loads((coco / "captions_val2014.json").read_text())
    caps["annotations"].append({"id": 4, "image_id": 4, "caption": "A clock tower."})
    (coco / "captions_val2014.json").write_text(json.dumps(caps))
    os.utime(coco / "captions_val2014.json", ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metrics.chair_gt"):
        rebuilt = build_coco_ground_truth(coco, cache_dir=cache)
    assert "built" in caplog.text and rebuilt[4] == {"clock"}
    assert len(list(cache.glob("coco_gt_*.json"))) == 2


def test_gt_objects_json_maps_synonyms_and_rejects_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"5": ["dog", "sofa", "dining table"], "6": []}))
    assert load_gt_objects(path) == {5: {"dog", "couch", "dining table"}, 6: set()}
    path.write_text(json.dumps({"5": ["dog", "unicorn"]}))
    with pytest.raises(ValueError, match="unicorn"):
        load_gt_objects(path)
    with pytest.raises(ValueError, match="exactly one"):
        load_ground_truth()


GT = {1: ["dog", "person", "frisbee"], 2: ["cat", "couch"], 3: []}
CAPS = [
    "A man and a woman play frisbee with their dogs on the grass near a bench.",  # bench hallucinated
    "A kitten sleeps on a sofa.",
    "",  # empty: a caption with no mentions
    "A bus drives past two cars.",  # image 3 has no objects: every mention hallucinated ("bus" -> "bu")
]
IDS = [1, 2, 1, 3]


def test_functional_values_from_explicit_counts() -> None:
    out = chair(CAPS, IDS, GT)
    # mentions: person person frisbee dog bench | cat couch | - | car   ("bus" -> "bu" in reference mode)
    assert out["CHAIRs"].item() == pytest.approx(2 / 4)
    assert out["CHAIRi"].item() == pytest.approx(2 / 8)
    assert out["Recall"].item() == pytest.approx((3 + 2 + 0 + 0) / (3 + 2 + 3 + 0))
    lemma = chair(CAPS, IDS, GT, mode="lemma")
    assert lemma["CHAIRi"].item() == pytest.approx(3 / 9)  # + "bus" on image 3


def test_unknown_image_id_is_an_error_naming_it_unless_skipped() -> None:
    with pytest.raises(KeyError, match="424242"):
        chair(["A dog."], [424242], GT)
    metric = CHAIR(GT, skip_unknown=True)
    metric.update(["A dog.", "A cat."], [424242, 2])
    assert metric.counts()["num_skipped_unknown"] == 1 and metric.counts()["num_captions"] == 1
    assert metric.compute()["CHAIRs"].item() == 0.0


def test_metric_equals_functional_and_forward_equals_update_compute() -> None:
    expected = chair(CAPS, IDS, GT)
    metric = CHAIR(GT)
    batch_values = [metric(CAPS[:2], IDS[:2]), metric(CAPS[2:], torch.tensor(IDS[2:]))]
    assert batch_values[0]["CHAIRi"].item() == pytest.approx(chair(CAPS[:2], IDS[:2], GT)["CHAIRi"].item())
    assert batch_values[1]["CHAIRs"].item() == pytest.approx(chair(CAPS[2:], IDS[2:], GT)["CHAIRs"].item())
    accumulated = metric.compute()
    other = CHAIR(GT)
    other.update(CAPS[:2], IDS[:2])
    other.update(CAPS[2:], IDS[2:])
    for key, value in expected.items():
        assert accumulated[key].item() == value.item() == other.compute()[key].item()
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["CHAIRs"].item() == 0.0  # zero denominators give 0


def test_details_decode_mentions_in_order() -> None:
    metric = CHAIR(GT, return_details=True)
    metric.update(CAPS, IDS)
    details = metric.details()
    assert [d["image_id"] for d in details] == IDS
    assert details[0]["mentioned_objects"] == ["person", "person", "frisbee", "dog", "bench"]
    assert details[0]["hallucinated_objects"] == ["bench"]
    assert details[2] == {"image_id": 1, "mentioned_objects": [], "hallucinated_objects": []}
    assert details[3]["hallucinated_objects"] == ["car"]
    with pytest.raises(RuntimeError, match="return_details"):
        CHAIR(GT).details()


def test_non_string_caption_is_an_error() -> None:
    with pytest.raises(TypeError, match="image 1"):
        chair([None], [1], GT)  # type: ignore[list-item]
