"""Generating a world into its root (images, COCO files, world.json), reading its config and statistics back."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from datamodules.world.config import COCO_IDS, FORMAT_VERSION, SPLITS, VAL_ID_OFFSET, WorldConfig, supercategory
from datamodules.world.draw import World, build_world, image_rng, place, render, sample_categories
from datamodules.world.text import image_captions, image_questions, question_text
from metrics.io import instance_objects, load_instances, read_json, read_records

@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    objects: list[tuple[int, list[float], float]]  # (category index, bbox, area)
    captions: list[str]
    questions: list[tuple[int, str]]


def _image_id(split: str, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def _make_image(world: World, split: str, index: int) -> _ImageRecord:
    """Sample, render and save one image; return its annotations. Depends only on (config, split, index)."""
    rng = image_rng(world.config, split, index)
    cats = sample_categories(world, rng, split, index)
    boxes = place(world, rng, cats)
    image, areas = render(world, rng, cats, boxes)
    image_id = _image_id(split, index)
    file_name = f"{image_id:012d}.png"
    image.save(world.config.root / "images" / split / file_name, format="PNG")
    objects = [(c, [round(v, 2) for v in box], a) for c, box, a in zip(cats, boxes, areas)]
    return _ImageRecord(image_id, file_name, objects, image_captions(world, rng, cats), image_questions(world, rng, cats))


_WORKER_WORLD: World | None = None


def _init_worker(world: World) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = world


def _worker_task(task: tuple[str, int]) -> _ImageRecord:
    if _WORKER_WORLD is None:
        raise RuntimeError("world worker process used before _init_worker")
    return _make_image(_WORKER_WORLD, *task)


def _records(world: World, split: str, count: int, workers: int, progress: bool) -> list[_ImageRecord]:
    """All records of a split in index order (workers only change the speed, never the output)."""
    tasks = [(split, i) for i in range(count)]
    bar = dict(total=count, desc=f"world {split}", unit="img", disable=not progress, leave=False)
    if workers <= 1:
        return [_make_image(world, s, i) for s, i in tqdm(tasks, **bar)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(world,)) as pool:
        return list(tqdm(pool.imap(_worker_task, tasks, chunksize=64), **bar))


# ------------------------------------------------------------------------------------------- files


def _coco_files(world: World, split: str, records: list[_ImageRecord]) -> tuple[dict, dict, list[dict]]:
    """(instances, captions, questions) of a split in COCO / POPE formats."""
    cfg = world.config
    info = {"description": f"synthetic hallucination world ({split})", "version": str(FORMAT_VERSION), "seed": cfg.seed}
    size = cfg.image_size
    images = [{"id": r.image_id, "file_name": r.file_name, "width": size, "height": size} for r in records]
    categories = [{"id": COCO_IDS[n], "name": n, "supercategory": supercategory(COCO_IDS[n])} for n in cfg.categories]
    annotations, captions, questions = [], [], []
    for r in records:
        for cat, bbox, area in r.objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": r.image_id, "category_id": COCO_IDS[cfg.categories[cat]],
                "bbox": bbox, "area": area, "iscrowd": 0,
            })
        for text in r.captions:
            captions.append({"id": len(captions) + 1, "image_id": r.image_id, "caption": text})
        for cat, label in r.questions:
            name = cfg.categories[cat]
            text = question_text(name)
            questions.append({
                "question_id": len(questions) + 1, "image_id": r.image_id, "image": r.file_name,
                "text": text, "label": label, "object": name,
            })
    instances = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    return instances, {"info": info, "images": images, "annotations": captions}, questions


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _annotation_files(split: str) -> tuple[str, str, str]:
    return f"instances_{split}.json", f"captions_{split}.json", f"questions_{split}.jsonl"


def _owned_paths(root: Path) -> list[Path]:
    """What a world writes under ROOT (besides world.json); the only things overwrite removes."""
    paths = [root / "images" / split for split in SPLITS]
    for split in SPLITS:
        paths += [root / "annotations" / name for name in _annotation_files(split)]
    return paths


MARKER = ".world_incomplete"  # present while a generation runs; lets a rerun clear a crashed attempt


class WorldMismatchError(RuntimeError):
    """ROOT holds a different world (or foreign files) and overwrite was not requested."""


def _world_json(world: World) -> dict[str, Any]:
    cfg = world.config
    looks = [
        {"name": name, "id": COCO_IDS[name], **asdict(look), "nouns": list(nouns)}
        for name, look, nouns in zip(cfg.categories, world.looks, world.nouns)
    ]
    return {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "categories": looks}


def _config_differences(stored: dict[str, Any], config: WorldConfig) -> list[str]:
    if stored.get("format_version") != FORMAT_VERSION:
        return [f"format_version: {stored.get('format_version')!r} != {FORMAT_VERSION}"]
    old, new = stored.get("config", {}), config.to_dict()
    return [f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in new if k != "root" and old.get(k) != new.get(k)]


def _prepare_root(config: WorldConfig, overwrite: bool) -> bool:
    """True if ROOT already holds this world. Otherwise clear what must go and return False."""
    root = config.root
    meta = root / "world.json"
    if meta.exists():
        differences = _config_differences(read_json(meta), config)
        if not differences:
            return True
        if not overwrite:
            raise WorldMismatchError(
                f"{root} holds a different world ({'; '.join(differences)}); use another root or overwrite=True "
                "(--overwrite)"
            )
        meta.unlink()
    elif not (root / MARKER).exists() and not overwrite and any(p.exists() for p in _owned_paths(root)):
        raise WorldMismatchError(
            f"{root} has images/ or annotations/ files but no world.json; use another root or overwrite=True "
            "(--overwrite)"
        )
    for path in _owned_paths(root):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def generate_world(config: WorldConfig, overwrite: bool = False, *, workers: int = 1, progress: bool = True) -> Path:
    """Write the world described by ``config`` under ``config.root`` and return the root.

    Idempotent: returns at once if ``ROOT/world.json`` matches ``config`` (root aside). A different world
    there raises :class:`WorldMismatchError` unless ``overwrite``. ``world.json`` is written last, so a
    crash never leaves one claiming a complete world. ``workers`` > 1 renders in processes (same output).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    root = config.root
    if _prepare_root(config, overwrite):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(config.to_dict()), encoding="utf-8")
    (root / "annotations").mkdir(exist_ok=True)
    world = build_world(config)
    for split, count in (("train", config.num_train), ("val", config.num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        instances, captions, questions = _coco_files(world, split, _records(world, split, count, workers, progress))
        texts = (
            json.dumps(instances, separators=(",", ":")),
            json.dumps(captions, separators=(",", ":")),
            "".join(json.dumps(q) + "\n" for q in questions),
        )
        for name, text in zip(_annotation_files(split), texts):
            _write_atomic(root / "annotations" / name, text)
    _write_atomic(root / "world.json", json.dumps(_world_json(world), indent=2) + "\n")
    (root / MARKER).unlink()
    return root


def load_world_config(root: str | Path) -> WorldConfig:
    """The config of the complete world at ``root`` (root set to where it is now)."""
    meta = Path(root) / "world.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: no complete world at {root} (run generate_world first)")
    stored = read_json(meta)
    if stored.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta}: format_version {stored.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return WorldConfig.from_dict({**stored["config"], "root": Path(root)})


def world_stats(root: str | Path) -> dict[str, Any]:
    """Counts and co-occurrence rates per split, read back from the written files.

    Per split: ``images``, ``objects``, ``captions``, ``questions``, ``yes_ratio`` (of questions),
    ``objects_per_image``, ``images_with`` (category -> images containing it) and, per bias rule,
    ``anchor_images``, ``with_companion``, ``rate`` (= with_companion / anchor_images) and
    ``anchor_without_companion``.
    """
    root = Path(root)
    config = load_world_config(root)
    stats: dict[str, Any] = {"format_version": FORMAT_VERSION, "seed": config.seed}
    for split in SPLITS:
        coco = load_instances(root / "annotations" / f"instances_{split}.json")
        captions = read_json(root / "annotations" / f"captions_{split}.json")
        questions = read_records(root / "annotations" / f"questions_{split}.jsonl")
        present = {image_id: set(names) for image_id, names in instance_objects(coco).items()}
        rules = []
        for anchor, companion, p in config.bias:
            with_anchor = [objs for objs in present.values() if anchor in objs]
            both = sum(companion in objs for objs in with_anchor)
            rules.append({
                "anchor": anchor, "companion": companion, "probability": p, "anchor_images": len(with_anchor),
                "with_companion": both, "rate": both / len(with_anchor) if with_anchor else float("nan"),
                "anchor_without_companion": len(with_anchor) - both,
            })
        n_images, n_objects = len(coco.imgs), len(coco.anns)
        stats[split] = {
            "images": n_images,
            "objects": n_objects,
            "objects_per_image": n_objects / n_images,
            "captions": len(captions["annotations"]),
            "questions": len(questions),
            "yes_ratio": sum(q["label"] == "yes" for q in questions) / max(len(questions), 1),
            "images_with": {name: sum(name in objs for objs in present.values()) for name in config.categories},
            "bias": rules,
        }
    return stats

