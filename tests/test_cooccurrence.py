"""Co-occurrence hard negatives and object-presence labels on a hand-built COCO-format annotation file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from datamodules import CaptionPairsDataModule
from datamodules.collate import Collator
from datamodules.cooccurrence import CooccurrenceNegatives, likely_absent, mine_cooccurrence
from datamodules.readers import caption_rows, coco_split

CATEGORIES = [{"id": 47, "name": "cup"}, {"id": 48, "name": "fork"}, {"id": 49, "name": "knife"}]
# image id -> (categories shown, caption)
IMAGES = {
    1: (["fork", "knife"], "a fork next to a knife."),
    2: (["fork", "knife", "cup"], "a fork, a knife and a cup."),
    3: (["fork", "knife"], "a purple fork and a small knife."),
    4: (["fork", "cup"], "a purple fork next to a red cup."),
    5: (["knife"], "a knife."),
    6: (["cup"], "a red cup."),
}


def _coco(root: Path) -> Path:
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    (root / "images" / "train").mkdir(parents=True)
    images, annotations, captions = [], [], []
    for image_id, (names, caption) in IMAGES.items():
        name = f"{image_id:012d}.png"
        Image.new("RGB", (8, 8)).save(root / "images" / "train" / name)
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        for name_ in names:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name_],
                                "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0})
        captions.append({"id": image_id, "image_id": image_id, "caption": caption})
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    (root / "annotations" / "captions_train.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def test_mined_probabilities_are_the_counts(tmp_path: Path) -> None:
    _, present, _ = coco_split(_coco(tmp_path), "train")
    table = mine_cooccurrence(present)
    # fork: images 1-4 (knife in 1-3, cup in 2 and 4); knife: 1, 2, 3, 5; cup: 2, 4, 6
    assert table[("fork", "knife")] == 3 / 4
    assert table[("fork", "cup")] == 2 / 4
    assert table[("knife", "fork")] == 3 / 4
    assert table[("cup", "fork")] == 2 / 3
    assert table[("knife", "cup")] == 1 / 4
    assert ("cup", "cup") not in table
    assert likely_absent(table, {"fork", "cup"}, 0.7) == ["knife"]
    assert likely_absent(table, {"fork", "cup"}, 0.8) == []


def test_cooccurrence_negatives_insert_the_absent_companion(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    rows, _ = caption_rows(root, "train", root / "images" / "train", "<image>", random.Random(0), ["count_change"],
                           False, {}, negative_fraction=0.0, cooccurrence=CooccurrenceNegatives(1.0, 0.7))
    by_image = {r["image_id"]: r for r in rows}
    four = by_image[4]  # fork + cup, no knife: P(knife | fork) = 0.75
    assert four["neg_kind"] == "cooccurrence"
    assert [four["neg_text"][s:e] for s, e in four["neg_hallucinated"]] == ["knife"]
    assert {four["neg_text"][s:e] for s, e in four["neg_grounded"]} == {"fork", "cup"}
    assert four["neg_text"] in ("a purple fork and a knife next to a red cup.",
                                "a purple fork next to a knife and a red cup.",
                                "a purple fork next to a red cup and a knife.",
                                "a knife and a purple fork next to a red cup.")
    five = by_image[5]  # knife alone: P(fork | knife) = 0.75
    assert five["neg_kind"] == "cooccurrence" and [five["neg_text"][s:e] for s, e in five["neg_hallucinated"]] == ["fork"]
    assert all(by_image[i]["neg_kind"] == "" for i in (1, 2, 3, 6))  # nothing likely is absent; no random ones
    none, _ = caption_rows(root, "train", root / "images" / "train", "<image>", random.Random(0), ["count_change"],
                           False, {}, negative_fraction=0.0, cooccurrence=CooccurrenceNegatives(0.0, 0.7))
    assert all(r["neg_kind"] == "" for r in none)


def test_object_presence_labels_follow_the_instances(tmp_path: Path) -> None:
    from models.demo_backbone import TinyLlavaConfig, build_demo_backbone

    root = _coco(tmp_path / "coco")
    build_demo_backbone([c for _, c in IMAGES.values()] + ["<image>"], tmp_path / "backbone", TinyLlavaConfig())
    dm = CaptionPairsDataModule(processor=str(tmp_path / "backbone"), coco_dir=str(root), questions=False, batch_size=2,
                                val_split="train")
    categories, presence = dm.object_presence()
    assert categories == ("cup", "fork", "knife")
    dm.setup("fit")
    collate = Collator(dm.processor, "train", None, categories, presence)
    rows = [dict(r, pixels=Image.open(r["image"]).convert("RGB")) for r in dm.train_rows]
    rows.append(dict(rows[0], image_id=-1))  # a row whose image has no annotations
    batch = collate(rows)
    for i, row in enumerate(rows[:-1]):
        assert batch["object_presence"][i].tolist() == [c in IMAGES[row["image_id"]][0] for c in categories]
    assert batch["object_presence_known"].tolist() == [True] * (len(rows) - 1) + [False]


def test_cooccurrence_needs_instance_annotations(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    with pytest.raises(ValueError, match="data.cooccurrence"):
        CaptionPairsDataModule(processor=str(tmp_path), pairs_file=str(pairs), cooccurrence=CooccurrenceNegatives())
    with pytest.raises(ValueError, match=r"data.cooccurrence.share"):
        CooccurrenceNegatives(share=1.5)
