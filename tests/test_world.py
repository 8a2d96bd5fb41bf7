"""The synthetic hallucination world: determinism, bias, probes, captions vs CHAIR, questions, files, config."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datamodules.world import (
    COCO_IDS,
    DEFAULT_CATEGORIES,
    MARKER,
    WorldConfig,
    WorldMismatchError,
    generate_world,
    load_world_config,
    main,
    world_stats,
)
from metrics.coco_objects import get_parser

SMALL = dict(num_train=300, num_val=40)


def _load(root: Path, name: str) -> Any:
    return json.loads((root / "annotations" / name).read_text())


def _questions(root: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "annotations" / f"questions_{split}.jsonl").read_text().splitlines()]


def _objects(root: Path, split: str) -> dict[int, list[tuple[str, list[float]]]]:
    """image id -> [(category name, bbox)]."""
    instances = _load(root, f"instances_{split}.json")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[tuple[str, list[float]]]] = {img["id"]: [] for img in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append((names[ann["category_id"]], ann["bbox"]))
    return objects


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default look and bias; 1,500 train images for the bias rate, 100 val."""
    return generate_world(WorldConfig(tmp_path_factory.mktemp("world"), num_train=1500, num_val=100), progress=False)


def test_same_seed_identical_any_worker_count(tmp_path: Path) -> None:
    one = _files(generate_world(WorldConfig(tmp_path / "a", seed=3, **SMALL), progress=False))
    two = _files(generate_world(WorldConfig(tmp_path / "b", seed=3, **SMALL), workers=2, progress=False))
    assert len(one) == 1 + 6 + 340  # world.json, 6 annotation files, images
    one.pop("world.json"), two.pop("world.json")  # they differ by root only
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


def test_different_seed_differs(tmp_path: Path) -> None:
    a = generate_world(WorldConfig(tmp_path / "a", seed=1, num_train=30, num_val=10), progress=False)
    b = generate_world(WorldConfig(tmp_path / "b", seed=2, num_train=30, num_val=10), progress=False)
    for name in ("instances_train.json", "captions_val.json", "questions_train.jsonl"):
        assert (a / "annotations" / name).read_bytes() != (b / "annotations" / name).read_bytes()
    png = "images/train/000000000001.png"
    assert (a / png).read_bytes() != (b / png).read_bytes()


def test_train_bias_rate(world: Path) -> None:
    rule = world_stats(world)["train"]["bias"][0]
    assert (rule["anchor"], rule["companion"]) == ("fork", "knife")
    assert rule["anchor_images"] > 300
    assert abs(rule["rate"] - 0.9) < 0.04
    # the knife is no more common than other objects where there is no fork
    objects = _objects(world, "train")
    no_fork = [{name for name, _ in objs} for objs in objects.values() if all(n != "fork" for n, _ in objs)]
    knife, cup = (sum(name in objs for objs in no_fork) / len(no_fork) for name in ("knife", "cup"))
    assert abs(knife - cup) < 0.06


def test_val_probes_lack_companion_in_instances_and_captions(world: Path) -> None:
    config = load_world_config(world)
    objects = _objects(world, "val")
    present = {image_id: {name for name, _ in objs} for image_id, objs in objects.items()}
    probes = {i for i, names in present.items() if "fork" in names and "knife" not in names}
    assert len(probes) == round(config.val_probe_fraction * config.num_val) == 50
    # every other val image with a fork has its knife; real knives remain to be recognised
    assert all("knife" in names for i, names in present.items() if "fork" in names and i not in probes)
    assert sum("knife" in names for names in present.values()) >= 15
    parser = get_parser("reference")
    captions = _load(world, "captions_val.json")["annotations"]
    probe_captions = [c["caption"] for c in captions if c["image_id"] in probes]
    assert len(probe_captions) == 3 * len(probes)
    assert not [c for c in probe_captions if "knife" in parser(c).objects or "knive" in c or "knife" in c]
    assert world_stats(world)["val"]["bias"][0]["anchor_without_companion"] == 50


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_caption_parses_to_exactly_the_image_categories(world: Path, split: str) -> None:
    parser = get_parser("reference")
    present = {i: {name for name, _ in objs} for i, objs in _objects(world, split).items()}
    captions = _load(world, f"captions_{split}.json")["annotations"]
    assert len(captions) == 3 * len(present)
    wrong = [
        (c["caption"], sorted(present[c["image_id"]]))
        for c in captions
        if set(parser(c["caption"]).objects) != present[c["image_id"]]
    ]
    assert wrong == []
    # synonyms, plurals, counts and colours do occur
    text = " ".join(c["caption"] for c in captions)
    for word in ("pocketknife", "knives", "two ", "purple fork", "small", "dark", "next to", "container"):
        assert word in text, word


def test_questions_balanced_labels_agree_and_adversarial(world: Path) -> None:
    for split in ("train", "val"):
        present = {i: {name for name, _ in objs} for i, objs in _objects(world, split).items()}
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        questions = _questions(world, split)
        assert [q["question_id"] for q in questions] == list(range(1, len(questions) + 1))
        for q in questions:
            by_image[q["image_id"]].append(q)
            assert q["label"] == ("yes" if q["object"] in present[q["image_id"]] else "no")
            assert q["image"] == f"{q['image_id']:012d}.png"
            assert q["text"] in (f"Is there a {q['object']} in the image?", f"Is there an {q['object']} in the image?")
        assert by_image.keys() == present.keys()
        for image_id, qs in by_image.items():
            expected = min(3, len(present[image_id]), len(DEFAULT_CATEGORIES) - len(present[image_id]))
            yes = [q["object"] for q in qs if q["label"] == "yes"]
            no = [q["object"] for q in qs if q["label"] == "no"]
            assert len(yes) == len(no) == expected
            assert len(set(yes)) == len(yes) and len(set(no)) == len(no)
            if "fork" in present[image_id] and "knife" not in present[image_id]:
                assert "knife" in no  # adversarial negative
    assert world_stats(world)["val"]["yes_ratio"] == 0.5


def test_coco_files(world: Path) -> None:
    for split in ("train", "val"):
        instances = _load(world, f"instances_{split}.json")
        captions = _load(world, f"captions_{split}.json")
        assert set(instances) == {"info", "images", "annotations", "categories"}
        assert set(captions) == {"info", "images", "annotations"}
        assert {c["name"]: c["id"] for c in instances["categories"]} == {n: COCO_IDS[n] for n in DEFAULT_CATEGORIES}
        assert {c["name"]: (c["id"], c["supercategory"]) for c in instances["categories"]}["fork"] == (48, "kitchen")
        assert COCO_IDS["knife"] == 49 and COCO_IDS["cup"] == 47 and COCO_IDS["toothbrush"] == 90
        assert set(instances["images"][0]) == {"id", "file_name", "width", "height"}
        assert set(instances["annotations"][0]) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        assert set(captions["annotations"][0]) == {"id", "image_id", "caption"}
        ids = [img["id"] for img in instances["images"]]
        assert len(set(ids)) == len(ids)
        for img in instances["images"][:20]:
            with Image.open(world / "images" / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (32, 32) and im.mode == "RGB"
        for ann in instances["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 32.01 and y + h <= 32.01
            assert 0 < ann["area"] <= (w + 0.25) * (h + 0.25)  # drawn edges snap to the 4x grid
    assert min(img["id"] for img in _load(world, "instances_val.json")["images"]) > max(
        img["id"] for img in _load(world, "instances_train.json")["images"]
    )


def test_pycocotools_reads_the_files(world: Path) -> None:
    coco_module = pytest.importorskip("pycocotools.coco")
    coco = coco_module.COCO(str(world / "annotations" / "instances_val.json"))
    assert coco.getCatIds(catNms=["fork"]) == [48]
    assert len(coco.getImgIds()) == 100
    caps = coco_module.COCO(str(world / "annotations" / "captions_val.json"))
    assert len(caps.getAnnIds()) == 300


def test_idempotent_mismatch_overwrite_and_crash(tmp_path: Path) -> None:
    config = WorldConfig(tmp_path, num_train=20, num_val=10)
    generate_world(config, progress=False)
    marker = tmp_path / "annotations" / "instances_train.json"
    os.utime(marker, (1, 1))
    assert generate_world(WorldConfig(tmp_path, num_train=20, num_val=10), progress=False) == tmp_path
    assert marker.stat().st_mtime == 1  # nothing rewritten
    with pytest.raises(WorldMismatchError, match=r"seed: 0 != 5"):
        generate_world(WorldConfig(tmp_path, seed=5, num_train=20, num_val=10), progress=False)
    assert load_world_config(tmp_path).seed == 0
    generate_world(WorldConfig(tmp_path, seed=5, num_train=10, num_val=10), overwrite=True, progress=False)
    assert load_world_config(tmp_path).seed == 5
    assert len(list((tmp_path / "images" / "train").iterdir())) == 10  # no leftovers of the old world
    # a crash mid-generation: marker present, no world.json -> regenerated without overwrite
    (tmp_path / "world.json").unlink()
    (tmp_path / MARKER).write_text("{}")
    generate_world(WorldConfig(tmp_path, seed=6, num_train=10, num_val=10), progress=False)
    assert load_world_config(tmp_path).seed == 6 and not (tmp_path / MARKER).exists()
    # foreign files and no world.json: refuse
    (tmp_path / "world.json").unlink()
    with pytest.raises(WorldMismatchError, match="no world.json"):
        generate_world(config, progress=False)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_train": 0}, "num_train"),
        ({"seed": -1}, "seed"),
        ({"image_size": 8}, "image_size"),
        ({"min_objects": 5}, "min_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"categories": ("fork", "knife", "spork")}, "categories"),
        ({"categories": ("fork",)}, "categories"),
        ({"bias": (("fork", "cat", 0.9),)}, "bias"),
        ({"bias": (("fork", "knife", 1.5),)}, "bias probability"),
        ({"companion_contrast": 0.0}, "companion_contrast"),
        ({"companion_scale": 3.0}, "companion_scale"),
        ({"object_scale": (0.9, 0.5)}, "object_scale"),
        ({"val_probe_fraction": 1.2}, "val_probe_fraction"),
        ({"bias": (), "val_probe_fraction": 0.5}, "val_probe_fraction"),
        ({"questions_per_image": 5}, "questions_per_image"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"clutter": -1}, "clutter"),
    ],
)
def test_config_validation_names_the_field(tmp_path: Path, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field}"):
        WorldConfig(tmp_path, **changes)


def test_config_round_trip(tmp_path: Path) -> None:
    config = WorldConfig(str(tmp_path), categories=["person", "dog", "fork", "knife"], bias=[["dog", "person", 0.8]])
    assert config.categories == ("person", "dog", "fork", "knife") and config.bias == (("dog", "person", 0.8),)
    assert WorldConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown WorldConfig fields"):
        WorldConfig.from_dict({**config.to_dict(), "colour": 1})


def _mean_colours(root: Path, split: str = "train") -> dict[str, list[np.ndarray]]:
    """Category -> RGB means of the inner half of each of its boxes."""
    colours: dict[str, list[np.ndarray]] = defaultdict(list)
    for image_id, objs in _objects(root, split).items():
        pixels = np.asarray(Image.open(root / "images" / split / f"{image_id:012d}.png"), dtype=np.float64)
        for name, (x, y, w, h) in objs:
            x0, y0 = int(x + w / 4 + 0.5), int(y + h / 4 + 0.5)
            x1, y1 = max(x0 + 1, int(x + 3 * w / 4 + 0.5)), max(y0 + 1, int(y + 3 * h / 4 + 0.5))
            colours[name].append(pixels[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0))
    return colours


def test_categories_are_visually_distinct(world: Path) -> None:
    means = {name: np.mean(values, axis=0) for name, values in _mean_colours(world).items()}
    assert sorted(means) == sorted(DEFAULT_CATEGORIES)
    closest = min(np.linalg.norm(means[a] - means[b]) for a, b in combinations(means, 2))
    assert closest > 25.0
    world_json = json.loads((world / "world.json").read_text())
    shapes = [c["shape"] for c in world_json["categories"]]
    assert len(set(shapes)) == len(shapes) == 8


def test_companion_difficulty_changes_size_and_contrast(tmp_path: Path) -> None:
    def knives(scale: float, contrast: float) -> tuple[float, float]:
        root = generate_world(
            WorldConfig(
                tmp_path / f"{scale}-{contrast}", num_train=150, num_val=10,
                companion_scale=scale, companion_contrast=contrast,
            ),
            progress=False,
        )
        areas = [w * h for objs in _objects(root, "train").values() for name, (_, _, w, h) in objs if name == "knife"]
        brightness = np.mean(_mean_colours(root)["knife"])
        return float(np.mean(areas)), float(brightness)

    big_area, bright = knives(1.0, 1.0)
    small_area, _ = knives(0.5, 1.0)
    _, dark = knives(1.0, 0.3)
    assert small_area / big_area == pytest.approx(0.25, abs=0.03)
    assert bright > 200 and dark < 100  # white (235) vs 30% of the way from the background (~30)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--root", str(tmp_path), "--num-train", "12", "--num-val", "6", "--bias", "cup:bowl:1.0", "--no-progress"]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"]["images"] == 12 and stats["train"]["bias"][0]["companion"] == "bowl"
    assert stats["train"]["bias"][0]["rate"] == 1.0
    assert main(["--root", str(tmp_path), "--num-train", "13", "--no-progress"]) == 2
    assert "different world" in capsys.readouterr().err
