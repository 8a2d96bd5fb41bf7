"""Reading the files the suite scores and trains on: JSON, JSON Lines, COCO instances.

Errors name the file and the line (JSON) or the record, so a broken log from another tool is easy to fix.
COCO ``instances`` files are indexed with pycocotools' ``COCO``; :func:`instance_objects` is the one place
that turns them into the objects of each image (CHAIR ground truth, POPE questions, training data, the
synthetic world's statistics).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

__all__ = ["instance_objects", "load_instances", "normalize_image_id", "read_json", "read_records", "require_key"]


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def read_json(path: str | Path) -> Any:
    """A JSON file, with errors that name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return _load_json(path, text)


def load_instances(instances: Mapping[str, Any] | str | Path) -> COCO:
    """pycocotools' index of a COCO ``instances`` file (or of its already-loaded dict).

    Annotations without an ``id`` (some converted datasets) are numbered in file order; one without an
    ``image_id`` or ``category_id`` is an error naming the file and the annotation.
    """
    source = "instances" if isinstance(instances, Mapping) else str(instances)
    dataset = dict(instances) if isinstance(instances, Mapping) else read_json(instances)
    if not isinstance(dataset, dict):
        raise ValueError(f"{source}: expected a COCO instances object with images, annotations and categories")
    numbered = []
    for index, ann in enumerate(dataset.get("annotations", [])):
        missing = [key for key in ("image_id", "category_id") if key not in ann]
        if missing:
            raise ValueError(f"{source}: annotation {ann.get('id', index)} lacks {missing}")
        numbered.append(ann if "id" in ann else {**ann, "id": index + 1})
    coco = COCO()
    coco.dataset = {**dataset, "annotations": numbered}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def instance_objects(coco: COCO, source: str = "instances") -> dict[Any, list[str]]:
    """Image id -> its distinct category names, in order of first annotation.

    Images follow the ``images`` list (an image without annotations maps to ``[]``), then any image that only
    annotations name. An annotation with an unknown ``category_id`` is an error naming ``source``.
    """
    objects: dict[Any, list[str]] = {image_id: [] for image_id in coco.imgs}
    for image_id, anns in coco.imgToAnns.items():
        names = objects.setdefault(image_id, [])
        for ann in anns:
            category = coco.cats.get(ann["category_id"])
            if category is None:
                raise ValueError(f"{source}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
            if category["name"] not in names:
                names.append(category["name"])
    return objects


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file (one object per line, blank lines skipped) or a JSON list.

    A file whose first non-blank character is ``[`` is read as one JSON list; anything else as JSON Lines.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = _load_json(path, text)
        where = [f"item {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: malformed JSON on line {lineno}: {err.msg} (column {err.colno})") from None
            where.append(f"line {lineno}")
    for record, loc in zip(records, where):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: {loc} is not a JSON object")
    return records


def require_key(record: dict[str, Any], key: str, path: str | Path, index: int) -> Any:
    """``record[key]``, or a ``KeyError`` naming the file, the record and the key."""
    if key not in record:
        raise KeyError(f"{path}: record {index} has no key {key!r} (keys: {sorted(record)})")
    return record[key]


def normalize_image_id(image_id: Any) -> int | str:
    """COCO ids are ints; ids given as digit strings (JSON object keys) become ints, others stay str."""
    if isinstance(image_id, bool):
        raise TypeError(f"image id {image_id!r} is a bool")
    if isinstance(image_id, int):
        return image_id
    if hasattr(image_id, "item"):  # tensor / numpy scalar
        return normalize_image_id(image_id.item())
    if isinstance(image_id, float) and image_id.is_integer():
        return int(image_id)
    text = str(image_id).strip()
    return int(text) if text.isdigit() else text
