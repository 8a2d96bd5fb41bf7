"""Readers of the training and evaluation data: COCO captions + instances, the pair format, POPE questions, images.

Each turns files into *rows* (plain dicts, cacheable with ``datasets``) and names the file, record or line
of anything it cannot use: ``caption_rows`` (COCO captions with a negative each, :mod:`datamodules.negatives`),
``pair_rows`` (the source design's ``image_id, image_path, positive_caption, negative_caption,
hallucinated_objects`` records), ``question_rows`` (POPE-format JSON Lines). COCO instances are read with
pycocotools (:func:`metrics.io.load_instances`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

from datamodules.cooccurrence import CooccurrenceNegatives, cooccurrence_negative, likely_absent, mine_cooccurrence
from datamodules.mentions import find_object_mentions
from datamodules.negatives import make_negative, negative_label_spans
from metrics.io import instance_objects, load_instances, read_json, read_records

NO_NEGATIVE = {"neg_text": "", "neg_kind": "", "neg_grounded": [], "neg_hallucinated": []}


def coco_file(coco_dir: Path, kind: str, split: str) -> Path:
    for folder in (coco_dir / "annotations", coco_dir):
        path = folder / f"{kind}_{split}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{coco_dir}: no {kind}_{split}.json (looked in annotations/ and the folder itself)")


def questions_file(coco_dir: Path, split: str) -> Path:
    """``questions_{split}.jsonl`` in ``annotations/`` or the folder itself (the first of them if neither has it)."""
    for folder in (coco_dir / "annotations", coco_dir):
        if (folder / f"questions_{split}.jsonl").is_file():
            return folder / f"questions_{split}.jsonl"
    return coco_dir / "annotations" / f"questions_{split}.jsonl"


def coco_split(coco_dir: Path, split: str) -> tuple[dict[int, str], dict[int, set[str]], list[dict]]:
    """(image id -> file name, image id -> instance category names, caption annotations) of one split."""
    path = coco_file(coco_dir, "instances", split)
    coco = load_instances(path)
    captions = read_json(coco_file(coco_dir, "captions", split))
    files = {image_id: image["file_name"] for image_id, image in coco.imgs.items()}
    present = {image_id: set(names) for image_id, names in instance_objects(coco, str(path)).items()}
    for img in captions.get("images", []):
        files.setdefault(img["id"], img["file_name"])
    return files, present, captions["annotations"]


def read_image_ids(path: Path) -> list[int]:
    """Image ids from a file: one per line (``#`` comments allowed) or a JSON list; errors name file and line."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            return [int(i) for i in json.loads(text)]
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a JSON list of integer image ids ({err})") from None
    ids = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.isdigit():
            raise ValueError(f"{path}:{number}: expected an integer image id, got {line!r}")
        ids.append(int(line))
    if not ids:
        raise ValueError(f"{path}: no image ids")
    return ids


def question_set_name(path: Path) -> str:
    """Metric name of a question file: ``coco_pope_adversarial.json`` -> ``adversarial``, ``questions_val`` -> ``pope``."""
    stem = path.name.split(".")[0]
    for prefix in ("coco_pope_", "aokvqa_pope_", "gqa_pope_", "pope_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return "pope" if stem.startswith("questions_") else stem


def check_image(path: Path, reference: str, skip_missing: bool) -> bool:
    """True if ``path`` opens as an image; else an error naming the file and what references it."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as err:
        if skip_missing:
            return False
        raise FileNotFoundError(f"image {path} (referenced by {reference}) is missing or corrupt: {err}") from None


def image_ok(path: Path, reference: str, skip_missing: bool, checked: dict[str, bool]) -> bool:
    """:func:`check_image`, once per path: ``checked`` keeps the answers across rows and files."""
    if str(path) not in checked:
        checked[str(path)] = check_image(path, reference, skip_missing)
    return checked[str(path)]


def load_image(path: str, reference: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise FileNotFoundError(f"image {path} (referenced by {reference}) is missing or corrupt: {err}") from None


def _spans(items: Sequence) -> list[list[int]]:
    return [[int(s), int(e)] for s, e in items]


def caption_rows(
    coco_dir: Path, split: str, image_dir: Path, prompt: str, rng: random.Random, kinds: Sequence[str],
    skip_missing: bool, checked: dict[str, bool], negative_fraction: float = 1.0,
    cooccurrence: CooccurrenceNegatives | None = None,
) -> tuple[list[dict], int]:
    """Training rows from COCO captions: positive, its object spans and one negative (if one applies).

    With ``cooccurrence``, a row whose image lacks a likely companion of a present anchor gets a co-occurrence
    negative with probability ``cooccurrence.share`` (:mod:`datamodules.cooccurrence`). Otherwise a share
    ``negative_fraction`` of the rows (drawn from ``rng``) gets a random negative. ``checked`` caches image checks
    by path (shared with the question rows).
    """
    files, present, annotations = coco_split(coco_dir, split)
    vocabulary = sorted(set().union(*present.values()))  # swap in the dataset's own categories
    table = mine_cooccurrence(present) if cooccurrence is not None else {}
    rows, skipped = [], 0
    for ann in annotations:
        image_id = ann["image_id"]
        if image_id not in files:
            raise ValueError(f"captions_{split}.json: annotation {ann.get('id')} names unknown image {image_id}")
        path = image_dir / files[image_id]
        if not image_ok(path, f"captions_{split}.json annotation {ann.get('id')}", skip_missing, checked):
            skipped += 1
            continue
        caption = ann["caption"].strip()
        mentions = find_object_mentions(caption)
        seen = present[image_id] | {m.category for m in mentions}  # a caption's own mentions are grounded
        negative = None
        companions = likely_absent(table, seen, cooccurrence.min_probability) if table else []
        if companions and rng.random() < cooccurrence.share:
            negative = cooccurrence_negative(caption, companions, rng)
        if negative is None:
            wanted = negative_fraction >= 1.0 or rng.random() < negative_fraction
            negative = make_negative(caption, seen, rng, kinds=kinds, vocabulary=vocabulary) if wanted else None
        grounded = [(m.start, m.end) for m in mentions]
        rows.append(
            {
                "kind": "caption",
                "image": str(path),
                "image_id": int(image_id),
                "reference": f"captions_{split}.json annotation {ann.get('id')}",
                "prompt": prompt,
                "target": caption,
                "pos_spans": _spans(grounded),
                **negative_fields(negative, seen),
            }
        )
    return rows, skipped


def negative_fields(negative: Any, present: set[str]) -> dict:
    if negative is None:
        return dict(NO_NEGATIVE)
    grounded, hallucinated = negative_label_spans(negative, present)
    return {
        "neg_text": negative.text,
        "neg_kind": negative.kind,
        "neg_grounded": _spans(grounded),
        "neg_hallucinated": _spans(hallucinated),
    }


def pair_rows(path: Path, prompt: str, skip_missing: bool) -> tuple[list[dict], int]:
    """Rows from the source design's pair JSON (a list, or JSON Lines)."""
    records = read_records(path)
    rows, skipped = [], 0
    required = ("image_id", "image_path", "positive_caption", "negative_caption", "hallucinated_objects")
    for index, record in enumerate(records):
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path}: record {index} lacks {missing}")
        image = Path(record["image_path"])
        if not image.is_absolute():
            image = path.parent / image
        if not check_image(image, f"{path} record {index}", skip_missing):
            skipped += 1
            continue
        positive, negative = record["positive_caption"], record["negative_caption"]
        hallucinated = set(record["hallucinated_objects"])
        neg_mentions = find_object_mentions(negative)
        rows.append(
            {
                "kind": "caption",
                "image": str(image),
                "image_id": int(record["image_id"]),
                "reference": f"{path} record {index}",
                "prompt": prompt,
                "target": positive,
                "pos_spans": _spans((m.start, m.end) for m in find_object_mentions(positive)),
                "neg_text": negative,
                "neg_kind": "pair_file",
                "neg_grounded": _spans((m.start, m.end) for m in neg_mentions if m.category not in hallucinated),
                "neg_hallucinated": _spans((m.start, m.end) for m in neg_mentions if m.category in hallucinated),
            }
        )
    return rows, skipped


def balanced_subset(questions: list[dict], per_image: int, rng: random.Random) -> list[dict]:
    """Up to ``per_image`` questions per image, half "yes" and half "no" where the image has them."""
    by_image: dict[str, dict[str, list[dict]]] = {}
    for q in questions:
        by_image.setdefault(q["image"], {}).setdefault(str(q["label"]).strip().lower(), []).append(q)
    keep = set()
    for labels in by_image.values():
        for answer in ("yes", "no"):
            pool = labels.get(answer, [])
            keep.update(q["question_id"] for q in rng.sample(pool, min(len(pool), per_image // 2)))
    return [q for q in questions if q["question_id"] in keep]


def question_rows(
    path: Path, image_dir: Path, suffix: str, prompt_template: str, skip_missing: bool,
    per_image: int | None = None, rng: random.Random | None = None, checked: dict[str, bool] | None = None,
) -> tuple[list[dict], int]:
    """Yes/no rows from a POPE-format JSON Lines file (``question_id, image, text, label``)."""
    rows, skipped = [], 0
    checked = {} if checked is None else checked
    questions = read_records(path)
    if per_image is not None:
        questions = balanced_subset(questions, per_image, rng or random.Random(0))
    for q in questions:
        for key in ("question_id", "image", "text", "label"):
            if key not in q:
                raise ValueError(f"{path}: question {q.get('question_id', '?')} lacks {key!r}")
        image = image_dir / q["image"]
        if not image_ok(image, f"{path} question {q['question_id']}", skip_missing, checked):
            skipped += 1
            continue
        rows.append(
            {
                "kind": "question",
                "image": str(image),
                "image_id": int(q.get("image_id", -1)),
                "question_id": int(q["question_id"]),
                "reference": f"{path} question {q['question_id']}",
                "prompt": prompt_template.format(question=q["text"].strip() + suffix),
                "target": str(q["label"]).strip().lower(),
            }
        )
    return rows, skipped

def complete_row(row: dict) -> dict:
    """A row with every column a cached dataset needs (rows without a negative or a question id get empty ones)."""
    defaults = {"question_id": -1, **NO_NEGATIVE, "pos_spans": []}
    return {**row, **{k: row.get(k, v) for k, v in defaults.items()}}
