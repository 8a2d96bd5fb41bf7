"""CHAIR ground truth: the COCO objects of each image.

Two sources:

* a COCO annotation folder: every ``instances_*.json`` and ``captions_*.json`` in it (all splits merged,
  e.g. train2014 + val2014 as the reference does). An image's objects are the node words of its instance
  categories UNION the objects parsed from its human captions with the same rules as generated captions.
  Building this from full COCO 2014 takes minutes, so the result is cached on disk, keyed by the input
  files (path, size, mtime) and the parsing mode; the log says whether the cache was used.
* a JSON mapping ``image id -> [object names]`` (e.g. the reference's ``gt_objects.json``); names may be
  node words or synonyms and are mapped to node words.

Both return ``dict[image_id, frozenset[node word]]``; an image listed with no objects maps to an empty set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from metrics.coco_objects import Mode, get_parser
from metrics.io import instance_objects, load_instances, normalize_image_id, read_json

__all__ = ["GroundTruth", "build_coco_ground_truth", "load_ground_truth", "load_gt_objects", "default_cache_dir"]

log = logging.getLogger(__name__)

GroundTruth = dict[int | str, frozenset[str]]
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$GROUNDED_ATTENTION_CACHE/chair`` or ``~/.cache/grounded_attention/chair``."""
    root = os.environ.get("GROUNDED_ATTENTION_CACHE") or Path.home() / ".cache" / "grounded_attention"
    return Path(root) / "chair"


def load_gt_objects(path: str | Path, mode: Mode = "reference") -> GroundTruth:
    """Ground truth from a JSON object ``{image_id: [object names]}``."""
    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image id -> list of object names")
    return normalize_ground_truth(mapping, mode, source=str(path))


def normalize_ground_truth(
    mapping: Mapping[object, Iterable[str]], mode: Mode = "reference", source: str = "ground truth"
) -> GroundTruth:
    """Normalise ids (digit strings -> int) and map every object name to its node word."""
    parser = get_parser(mode)
    out: GroundTruth = {}
    for image_id, names in mapping.items():
        if isinstance(names, str):
            raise ValueError(f"{source}: image {image_id!r}: objects must be a list, got a string")
        try:
            out[normalize_image_id(image_id)] = frozenset(parser.node_word(name) for name in names)
        except ValueError as err:
            raise ValueError(f"{source}: image {image_id!r}: {err}") from None
    return out


def _annotation_files(coco_dir: Path) -> tuple[list[Path], list[Path]]:
    for folder in (coco_dir, coco_dir / "annotations"):
        instances = sorted(folder.glob("instances_*.json"))
        captions = sorted(folder.glob("captions_*.json"))
        if instances or captions:
            return instances, captions
    raise FileNotFoundError(f"{coco_dir}: no instances_*.json or captions_*.json (also looked in annotations/)")


def _cache_key(files: list[Path], mode: Mode) -> str:
    digest = hashlib.sha256(f"chair-gt v{_CACHE_VERSION} mode={mode}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _build(instances: list[Path], captions: list[Path], mode: Mode) -> dict[int | str, set[str]]:
    parser = get_parser(mode)
    objects: dict[int | str, set[str]] = {}
    for path in instances:
        for image_id, names in instance_objects(load_instances(path), str(path)).items():
            objects.setdefault(normalize_image_id(image_id), set()).update(parser.node_word(n) for n in names)
    for path in captions:
        data = read_json(path)
        for image in data.get("images", []):
            objects.setdefault(normalize_image_id(image["id"]), set())
        for ann in data.get("annotations", []):
            found = parser(ann["caption"]).objects
            objects.setdefault(normalize_image_id(ann["image_id"]), set()).update(found)
    return objects


def build_coco_ground_truth(
    coco_dir: str | Path, mode: Mode = "reference", cache_dir: str | Path | None = None, use_cache: bool = True
) -> GroundTruth:
    """Ground truth from COCO ``instances_*.json`` + ``captions_*.json`` in ``coco_dir`` (cached on disk)."""
    instances, captions = _annotation_files(Path(coco_dir))
    files = instances + captions
    cache_file = Path(cache_dir or default_cache_dir()) / f"coco_gt_{_cache_key(files, mode)}.json"
    if use_cache and cache_file.is_file():
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        log.info("CHAIR ground truth: loaded %d images from cache %s", len(cached["images"]), cache_file)
        return {normalize_image_id(k): frozenset(v) for k, v in cached["images"].items()}
    start = time.perf_counter()
    objects = _build(instances, captions, mode)
    log.info(
        "CHAIR ground truth: built %d images from %s in %.1f s",
        len(objects), ", ".join(f.name for f in files), time.perf_counter() - start,
    )
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": _CACHE_VERSION,
            "mode": mode,
            "files": [str(f.resolve()) for f in files],
            "images": {str(k): sorted(v) for k, v in objects.items()},
        }
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(cache_file)  # atomic: concurrent ranks never read a half-written cache
        log.info("CHAIR ground truth: cached to %s", cache_file)
    return {k: frozenset(v) for k, v in objects.items()}


def load_ground_truth(
    coco_dir: str | Path | None = None,
    gt_objects: str | Path | None = None,
    mode: Mode = "reference",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> GroundTruth:
    """Exactly one of ``coco_dir`` (COCO annotation folder) or ``gt_objects`` (JSON mapping)."""
    if (coco_dir is None) == (gt_objects is None):
        raise ValueError("give exactly one of coco_dir or gt_objects")
    if coco_dir is not None:
        return build_coco_ground_truth(coco_dir, mode, cache_dir, use_cache)
    return load_gt_objects(gt_objects, mode)  # type: ignore[arg-type]
