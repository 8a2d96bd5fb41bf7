"""Reading the record files the metrics score: JSON Lines or one JSON list of objects.

Errors name the file and, for JSON Lines, the line, so a broken log from another tool is easy to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_records", "normalize_image_id", "require_key"]


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


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
