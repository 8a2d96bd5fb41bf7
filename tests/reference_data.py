"""The CHAIR reference data in ``tests/data/opera_chair`` (real OPERA caption logs; provenance in its README)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data" / "opera_chair"
GT_OBJECTS = REFERENCE / "gt_objects.json"
LOGS = [f"{m}_{d}" for m in ("llava-1.5", "instructblip", "minigpt4", "shikra") for d in ("greedy", "beam5", "ours")]


def read_log(name: str) -> list[dict]:
    """The 500 ``{"image_id", "caption"}`` records of log ``name`` (e.g. ``llava-1.5_greedy``)."""
    with gzip.open(REFERENCE / f"{name}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def expected() -> dict:
    """The reference CHAIR's results per log (``expected.json.gz``)."""
    with gzip.open(REFERENCE / "expected.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)
