"""CaptionPairsDataModule: positive/negative caption pairs and yes/no questions, collated for any backbone.

Training rows come from COCO-format ``captions_{split}.json`` + ``instances_{split}.json`` (negatives made by
``datamodules.negatives``), or from the source design's pair JSON (``image_id, image_path, positive_caption,
negative_caption, hallucinated_objects, grounding_labels``), plus optional ``questions_{split}.jsonl``
(POPE format) as yes/no instructions. Prepared rows are cached with Hugging Face ``datasets``.

Validation has two loaders: 0 = one captioning prompt per image (CHAIR), 1 = the split's questions (POPE).
With ``world`` set, the synthetic world is generated into ``coco_dir`` first; with ``demo_backbone`` set, the
tiny demo backbone (tokenizer trained on the world's text) is built into ``processor``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.world import WorldConfig
from metrics.io import read_records
from models.demo_backbone import TinyLlavaConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 3
IGNORE = -100


def read_json(path: Path) -> Any:
    """JSON with errors that name the file and line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def _coco_file(coco_dir: Path, kind: str, split: str) -> Path:
    for folder in (coco_dir / "annotations", coco_dir):
        path = folder / f"{kind}_{split}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{coco_dir}: no {kind}_{split}.json (looked in annotations/ and the folder itself)")


def coco_split(coco_dir: Path, split: str) -> tuple[dict[int, str], dict[int, set[str]], list[dict]]:
    """(image id -> file name, image id -> instance category names, caption annotations) of one split."""
    instances = read_json(_coco_file(coco_dir, "instances", split))
    captions = read_json(_coco_file(coco_dir, "captions", split))
    files = {img["id"]: img["file_name"] for img in instances["images"]}
    names = {cat["id"]: cat["name"] for cat in instances["categories"]}
    present: dict[int, set[str]] = {image_id: set() for image_id in files}
    for ann in instances["annotations"]:
        present.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
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
) -> tuple[list[dict], int]:
    """Training rows from COCO captions: positive, its object spans and one negative (if one applies).

    A share ``negative_fraction`` of the rows (drawn from ``rng``) gets a negative. ``checked`` caches image
    checks by path (shared with the question rows).
    """
    from datamodules.negatives import find_object_mentions, make_negative

    files, present, annotations = coco_split(coco_dir, split)
    vocabulary = sorted(set().union(*present.values()))  # swap in the dataset's own categories
    rows, skipped = [], 0
    for ann in annotations:
        image_id = ann["image_id"]
        if image_id not in files:
            raise ValueError(f"captions_{split}.json: annotation {ann.get('id')} names unknown image {image_id}")
        path = image_dir / files[image_id]
        if str(path) not in checked:
            checked[str(path)] = check_image(path, f"captions_{split}.json annotation {ann.get('id')}", skip_missing)
        if not checked[str(path)]:
            skipped += 1
            continue
        caption = ann["caption"].strip()
        mentions = find_object_mentions(caption)
        seen = present[image_id] | {m.category for m in mentions}  # a caption's own mentions are grounded
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
                **_negative_fields(negative, seen),
            }
        )
    return rows, skipped


def _negative_fields(negative: Any, present: set[str]) -> dict:
    if negative is None:
        return {"neg_text": "", "neg_kind": "", "neg_grounded": [], "neg_hallucinated": []}
    from datamodules.negatives import negative_label_spans

    grounded, hallucinated = negative_label_spans(negative, present)
    return {
        "neg_text": negative.text,
        "neg_kind": negative.kind,
        "neg_grounded": _spans(grounded),
        "neg_hallucinated": _spans(hallucinated),
    }


def pair_rows(path: Path, prompt: str, skip_missing: bool) -> tuple[list[dict], int]:
    """Rows from the source design's pair JSON (a list, or JSON Lines)."""
    from datamodules.negatives import find_object_mentions

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
        if str(image) not in checked:
            checked[str(image)] = check_image(image, f"{path} question {q['question_id']}", skip_missing)
        if not checked[str(image)]:
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


class RowDataset(Dataset):
    """Rows (dicts) with their images loaded lazily."""

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = dict(self.rows[index])
        row["pixels"] = load_image(row["image"], row["reference"])
        return row


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, split across ranks, that can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """Training loader whose position in the epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful train loaders and calls ``load_state_dict`` on resume.
    The position is the number of batches the trainer *processed* this epoch (not the loader's own count,
    which runs ahead by the prefetched batch), so a resumed run sees exactly the batches it had not trained on.
    """

    def __init__(self, *args, trainer: Any = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        # "processed": checkpoints are saved in on_train_batch_end, after the step, before "completed" counts it
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"epoch": int(self.sampler.epoch), "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches"] * self.batch_size


class Collator:
    """Builds model inputs with the backbone's processor.

    ``train``, decoder-only: right-padded ``prompt + target + eos`` with LM labels on the target only and
    object-token labels (1 = grounded object word) on the positions whose input is that word. Encoder-decoder
    (``decoder_start_token_id`` set: BLIP-2 / InstructBLIP with Flan-T5): the prompt is the encoder input, the
    labels are ``target + eos`` and the decoder input is the target shifted right behind the start token, so
    object labels sit on the decoder positions whose input is the word, as in the decoder-only layout. Rows
    with a negative add ``neg_*`` inputs (the negative caption in the same layout; the model inputs the
    negative pass shares with the positive one are taken at ``neg_index``) with 1/0 labels (grounded /
    hallucinated object words). ``generate``: left-padded prompts.
    """

    def __init__(self, processor: Any, mode: str, decoder_start_token_id: int | None = None) -> None:
        self.processor, self.mode, self.decoder_start = processor, mode, decoder_start_token_id
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _prompts(self, rows: Sequence[dict]) -> tuple[list[list[int]], Tensor, dict]:
        self.tokenizer.padding_side = "right"
        enc = self.processor(images=[r["pixels"] for r in rows], text=[r["prompt"] for r in rows], return_tensors=None)
        ids = [list(x) for x in enc["input_ids"]]
        pixel_values = torch.as_tensor(np.stack(enc["pixel_values"]))
        extra = {k: self._extra(k, v) for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        return ids, pixel_values, extra

    def _extra(self, key: str, value: Any) -> Tensor:
        """Further processor outputs; ragged ones (InstructBLIP's Q-Former prompt) right-padded."""
        if not isinstance(value, list) or not value or not isinstance(value[0], (list, tuple)):
            return torch.as_tensor(np.asarray(value))
        if key.endswith("attention_mask"):
            fill = 0
        else:
            qformer = getattr(self.processor, "qformer_tokenizer", None)
            tokenizer = qformer if key.startswith("qformer") and qformer is not None else self.tokenizer
            fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return self._pad([list(v) for v in value], fill)

    def _target(self, text: str, grounded: Sequence, hallucinated: Sequence) -> tuple[list[int], list[int]]:
        from datamodules.negatives import token_labels

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [self.tokenizer.eos_token_id]
        offsets = list(enc["offset_mapping"]) + [(0, 0)]
        labels = token_labels(offsets, [tuple(s) for s in grounded], [tuple(s) for s in hallucinated])
        return ids, labels

    def _pad(self, seqs: list[list[int]], value: int) -> Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def _mask(self, seqs: list[list[int]]) -> Tensor:
        return self._pad([[1] * len(s) for s in seqs], 0)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        return self.train(rows) if self.mode == "train" else self.generate(rows)

    def train(self, rows: Sequence[dict]) -> dict[str, Any]:
        prompts, pixel_values, extra = self._prompts(rows)
        targets, objects, negatives, neg_objects, neg_index = [], [], [], [], []
        for i, row in enumerate(rows):
            target, labels = self._target(row["target"], row.get("pos_spans") or [], [])
            targets.append(target)
            objects.append(labels)
            if row.get("neg_text"):
                neg, labels = self._target(row["neg_text"], row["neg_grounded"], row["neg_hallucinated"])
                negatives.append(neg)
                neg_objects.append(labels)
                neg_index.append(i)
        layout = self._decoder_only if self.decoder_start is None else self._encoder_decoder
        batch = {**layout(prompts, targets, objects), "pixel_values": pixel_values, **extra}
        if negatives:
            inputs = layout([prompts[i] for i in neg_index], negatives, neg_objects)
            batch["neg_object_labels"] = inputs.pop("object_labels")
            inputs.pop("labels")
            if self.decoder_start is not None:  # the encoder input is the positive row's: taken at neg_index
                inputs.pop("input_ids"), inputs.pop("attention_mask")
            batch.update({f"neg_{k}": v for k, v in inputs.items()})
            batch["neg_index"] = torch.tensor(neg_index, dtype=torch.long)
        return batch

    def _decoder_only(self, prompts: list[list[int]], targets: list[list[int]], objects: list[list[int]]) -> dict[str, Tensor]:
        ids = [p + t for p, t in zip(prompts, targets)]
        return {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._mask(ids),
            "labels": self._pad([[IGNORE] * len(p) + t for p, t in zip(prompts, targets)], IGNORE),
            "object_labels": self._pad([[IGNORE] * len(p) + o for p, o in zip(prompts, objects)], IGNORE),
        }

    def _encoder_decoder(self, prompts: list[list[int]], targets: list[list[int]], objects: list[list[int]]) -> dict[str, Tensor]:
        decoder = [[self.decoder_start] + t[:-1] for t in targets]  # decoder input j is target token j - 1
        return {
            "input_ids": self._pad(prompts, self.pad_id),
            "attention_mask": self._mask(prompts),
            "decoder_input_ids": self._pad(decoder, self.pad_id),
            "decoder_attention_mask": self._mask(decoder),
            "labels": self._pad(targets, IGNORE),
            "object_labels": self._pad([[IGNORE] + o[:-1] for o in objects], IGNORE),
        }

    def generate(self, rows: Sequence[dict]) -> dict[str, Any]:
        prompts, pixel_values, extra = self._prompts(rows)
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            **extra,
            "image_ids": [r["image_id"] for r in rows],
            "question_ids": [r.get("question_id", -1) for r in rows],
            "targets": [r["target"] for r in rows],
        }


def decoder_start_token_id(source: str) -> int | None:
    """The decoder start token if ``source`` (a processor's hub id or directory) holds an encoder-decoder
    backbone's config (BLIP-2 / InstructBLIP with Flan-T5); None for decoder-only or where there is no config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None  # a processor-only directory: GroundedVLM rejects the batch if its model is encoder-decoder
    text = config.get_text_config()
    if not getattr(text, "is_encoder_decoder", False):
        return None
    start = text.decoder_start_token_id if text.decoder_start_token_id is not None else text.pad_token_id
    if start is None:
        raise ValueError(f"{source}: encoder-decoder config without decoder_start_token_id or pad_token_id")
    return int(start)


class CaptionPairsDataModule(LightningDataModule):
    """Caption pairs + yes/no questions for training; captioning prompts and questions for validation.

    Args:
        processor: hub id or directory of the backbone's processor (``AutoProcessor.from_pretrained``).
        coco_dir: COCO-format root with ``annotations/{captions,instances}_{split}.json``.
        image_dir: images of a split are ``{image_dir}/{split}/{file_name}`` (default ``{coco_dir}/images``).
        pairs_file: the source design's pair JSON; replaces the COCO captions for training.
        train_split, val_split: split names of the annotation files.
        test_split: split of ``test`` and ``predict`` (default: ``val_split``).
        questions: also train on ``questions_{train_split}.jsonl`` yes/no instructions (POPE format).
        train_questions_per_image: train on at most this many questions per image (half yes, half no).
        world: generate the synthetic world into ``coco_dir`` when it is missing.
        demo_backbone: build the tiny demo backbone into ``processor`` when it is missing.
        caption_prompt: prompt of captioning rows (must contain the processor's image token if it needs one).
        val_caption_prompt: prompt of the evaluation captions (CHAIR); default ``caption_prompt``.
        question_prompt: template of question rows, ``{question}`` is replaced.
        question_suffix: appended to each question.
        negative_kinds: kinds of negatives made from COCO captions.
        negative_fraction: share of caption rows that carry a negative (each one costs a forward/backward pass
            of the grounding terms); the rest train the LM and the positive grounding term only.
        batch_size, val_batch_size: global batch sizes (divided by the world size).
        max_val_images, max_val_questions: cap validation work (first N, deterministic).
        val_image_ids: file of the evaluation split's image ids to caption (one per line, or a JSON list), e.g.
            the 500 COCO val2014 ids of published CHAIR tables; default every image of the split.
        val_question_files: POPE-format JSON Lines files answered in evaluation, each scored on its own
            (named after the file); default ``questions_{split}.jsonl`` beside the annotations, if present.
        skip_missing: skip (and count) rows whose image is missing or corrupt instead of failing.
        cache_dir: where prepared rows are cached (``datasets``); default ``{coco_dir}/.cache``.
        seed: negatives are drawn from this seed.
    """

    def __init__(
        self,
        processor: str,
        coco_dir: str | None = None,
        image_dir: str | None = None,
        pairs_file: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        questions: bool = True,
        train_questions_per_image: int | None = None,
        world: WorldConfig | None = None,
        demo_backbone: TinyLlavaConfig | None = None,
        caption_prompt: str = "<image>\nDescribe the image.",
        val_caption_prompt: str | None = None,
        question_prompt: str = "<image>\n{question}",
        question_suffix: str = " Answer yes or no.",
        negative_kinds: list[str] | None = None,
        negative_fraction: float = 1.0,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 0,
        max_val_images: int | None = None,
        max_val_questions: int | None = None,
        val_image_ids: str | None = None,
        val_question_files: list[str] | None = None,
        skip_missing: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if world is not None:
            world_root = str(Path(world.root))
            if coco_dir not in (None, world_root):
                raise ValueError(f"data.coco_dir ({coco_dir}) and data.world.root ({world_root}) disagree")
            coco_dir = world_root
        if coco_dir is None and pairs_file is None:
            raise ValueError("give data.coco_dir (COCO-format annotations), data.world or data.pairs_file")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.processor_path = processor
        self.coco_dir = Path(coco_dir) if coco_dir else None
        self.image_dir = Path(image_dir) if image_dir else (self.coco_dir / "images" if self.coco_dir else None)
        self.pairs_file = Path(pairs_file) if pairs_file else None
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split or val_split
        if train_questions_per_image is not None and (train_questions_per_image < 2 or train_questions_per_image % 2):
            raise ValueError(f"data.train_questions_per_image must be an even number >= 2, got {train_questions_per_image}")
        self.questions, self.train_questions_per_image = questions, train_questions_per_image
        self.world, self.demo_backbone = world, demo_backbone
        self.caption_prompt, self.question_prompt, self.question_suffix = caption_prompt, question_prompt, question_suffix
        from datamodules.negatives import ALL_KINDS

        self.negative_kinds = list(negative_kinds or ALL_KINDS)
        if not 0.0 <= negative_fraction <= 1.0:
            raise ValueError(f"data.negative_fraction must be in [0, 1], got {negative_fraction}")
        self.negative_fraction = negative_fraction
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.max_val_images, self.max_val_questions = max_val_images, max_val_questions
        self.val_caption_prompt = val_caption_prompt if val_caption_prompt is not None else caption_prompt
        self.val_image_ids = Path(val_image_ids) if val_image_ids else None
        self.val_question_files = [Path(f) for f in val_question_files] if val_question_files else None
        for path in [self.val_image_ids, *(self.val_question_files or [])]:
            if path is not None and not path.is_file():
                key = "val_image_ids" if path == self.val_image_ids else "val_question_files"
                raise FileNotFoundError(f"data.{key}: no such file {path}")
        if self.val_question_files:
            names = [question_set_name(f) for f in self.val_question_files]
            if len(set(names)) != len(names):
                raise ValueError(f"data.val_question_files: names {names} must be unique (they name the POPE metrics)")
        self.skip_missing = skip_missing
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed = seed
        self.processor = None
        self.train_rows: list[dict] = []
        self.val_captions: list[dict] = []
        self.val_questions: dict[str, list[dict]] = {}
        self.test_captions: list[dict] = []
        self.test_questions: dict[str, list[dict]] = {}

    # ----------------------------------------------------------------- preparation (rank 0, once)
    def prepare_data(self) -> None:
        if self.world is not None:
            from datamodules.world import generate_world

            generate_world(self.world)
        if self.demo_backbone is not None and not (Path(self.processor_path) / "demo_backbone.json").is_file():
            from models.demo_backbone import build_demo_backbone

            build_demo_backbone(self._world_texts(), self.processor_path, self.demo_backbone)
        self._train_rows()  # builds the cache

    def _world_texts(self) -> list[str]:
        """Every text the demo tokenizer must cover: prompts, captions, questions, answers."""
        assert self.coco_dir is not None
        texts = [self.caption_prompt, self.question_prompt, self.question_suffix, "yes", "no"]
        for split in (self.train_split, self.val_split):
            texts += [a["caption"] for a in coco_split(self.coco_dir, split)[2]]
            path = self._questions_file(split)
            if path.is_file():
                texts += [q["text"] for q in read_records(path)]
        return texts

    def _questions_file(self, split: str) -> Path:
        assert self.coco_dir is not None
        for folder in (self.coco_dir / "annotations", self.coco_dir):
            if (folder / f"questions_{split}.jsonl").is_file():
                return folder / f"questions_{split}.jsonl"
        return self.coco_dir / "annotations" / f"questions_{split}.jsonl"

    def _cache_key(self, sources: list[Path]) -> str:
        digest = hashlib.sha256(f"pairs v{CACHE_VERSION}".encode())
        settings = [self.caption_prompt, self.question_prompt, self.question_suffix, self.negative_kinds, self.negative_fraction,
                    self.questions, self.train_questions_per_image, self.skip_missing, self.seed, str(self.image_dir)]
        digest.update(json.dumps(settings).encode())
        for path in sources:
            stat = path.stat()
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:20]

    def _train_rows(self) -> list[dict]:
        import datasets

        sources = [self.pairs_file] if self.pairs_file else [
            _coco_file(self.coco_dir, "captions", self.train_split),
            _coco_file(self.coco_dir, "instances", self.train_split),
        ]
        question_file = self._questions_file(self.train_split) if self.coco_dir else None
        use_questions = self.questions and question_file is not None and question_file.is_file()
        if self.questions and self.coco_dir and not use_questions:
            raise FileNotFoundError(f"data.questions is true but {question_file} does not exist")
        if use_questions:
            sources.append(question_file)
        root = self.cache_dir or ((self.coco_dir or self.pairs_file.parent) / ".cache")
        cache = root / f"pairs_{self._cache_key(sources)}"
        if (cache / "dataset_info.json").is_file():
            rows = datasets.load_from_disk(str(cache)).to_list()
            log.info("training rows: %d loaded from cache %s", len(rows), cache)
            return rows
        rng = random.Random(self.seed)
        checked: dict[str, bool] = {}
        if self.pairs_file:
            rows, skipped = pair_rows(self.pairs_file, self.caption_prompt, self.skip_missing)
            if self.negative_fraction < 1.0:
                rows = [r if rng.random() < self.negative_fraction else {**r, **_negative_fields(None, set())} for r in rows]
        else:
            rows, skipped = caption_rows(
                self.coco_dir, self.train_split, self.image_dir / self.train_split, self.caption_prompt, rng,
                self.negative_kinds, self.skip_missing, checked, self.negative_fraction,
            )
        if use_questions:
            q_rows, q_skipped = question_rows(
                question_file, self.image_dir / self.train_split, self.question_suffix, self.question_prompt,
                self.skip_missing, self.train_questions_per_image, rng, checked,
            )
            rows, skipped = rows + q_rows, skipped + q_skipped
        if skipped:
            log.warning("training rows: skipped %d whose image is missing or corrupt (skip_missing=true)", skipped)
        if not rows:
            raise ValueError(f"no training rows from {[str(s) for s in sources]}: nothing to train on")
        normalised = [{**r, "question_id": r.get("question_id", -1), **_empty_negative(r)} for r in rows]
        datasets.Dataset.from_list(normalised).save_to_disk(str(cache))
        log.info("training rows: %d prepared and cached to %s", len(rows), cache)
        return normalised

    # ----------------------------------------------------------------- setup (every rank)
    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.processor_path)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        for name in ("batch_size", "val_batch_size"):
            if getattr(self, name) % world_size:
                raise ValueError(
                    f"data.{name} ({getattr(self, name)}) is the global batch and must be divisible by the "
                    f"number of processes ({world_size})"
                )
        if stage in (None, "fit"):
            self.train_rows = self._train_rows()
        if stage in (None, "fit", "validate"):
            self.val_captions, self.val_questions = self._eval_rows(self.val_split)
        if stage in ("test", "predict"):
            self.test_captions, self.test_questions = self._eval_rows(self.test_split)

    def _eval_rows(self, split: str) -> tuple[list[dict], dict[str, list[dict]]]:
        """One captioning prompt per image (CHAIR) and each question set's rows (POPE), by set name."""
        if self.coco_dir is None:
            raise ValueError("evaluation needs data.coco_dir (COCO-format annotations of the evaluation split)")
        files, _, _ = coco_split(self.coco_dir, split)
        train_files = coco_split(self.coco_dir, self.train_split)[0] if split != self.train_split else {}
        overlap = set(files) & set(train_files)
        if overlap:
            raise ValueError(
                f"{self.coco_dir}: image ids {sorted(overlap)[:5]} occur in both {self.train_split} and "
                f"{split}; CHAIR ground truth needs unique ids"
            )
        image_dir = self.image_dir / split
        ids = sorted(files)
        if self.val_image_ids is not None:
            ids = read_image_ids(self.val_image_ids)
            unknown = [i for i in ids if i not in files]
            if unknown:
                raise ValueError(
                    f"data.val_image_ids ({self.val_image_ids}): {len(unknown)} ids are not images of "
                    f"instances_{split}.json, e.g. {unknown[:5]}"
                )
        captions = []
        for image_id in ids[: self.max_val_images]:
            path = image_dir / files[image_id]
            if check_image(path, f"instances_{split}.json image {image_id}", self.skip_missing):
                captions.append(
                    {"kind": "caption", "image": str(path), "image_id": int(image_id), "prompt": self.val_caption_prompt,
                     "target": "", "reference": f"instances_{split}.json image {image_id}"}
                )
        if not captions:
            raise ValueError(f"no evaluation images in {self.coco_dir} split {split}")
        question_sets = {}
        for path in self.val_question_files or [p for p in [self._questions_file(split)] if p.is_file()]:
            rows, _ = question_rows(path, image_dir, self.question_suffix, self.question_prompt, self.skip_missing)
            question_sets[question_set_name(path)] = rows[: self.max_val_questions]
        return captions, question_sets

    # ----------------------------------------------------------------- loaders
    def _per_device(self, batch_size: int) -> int:
        return batch_size // (self.trainer.world_size if self.trainer is not None else 1)

    def train_dataloader(self) -> DataLoader:
        dataset = RowDataset(self.train_rows)
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(dataset, replicas, rank, self.seed)
        if len(sampler) < self._per_device(self.batch_size):
            raise ValueError(
                f"{len(self.train_rows)} training rows are fewer than one batch per process "
                f"({self._per_device(self.batch_size)} x {replicas}): nothing to train on"
            )
        return ResumableLoader(
            dataset, batch_size=self._per_device(self.batch_size), sampler=sampler, drop_last=True,
            num_workers=self.num_workers, trainer=trainer,
            collate_fn=Collator(self.processor, "train", decoder_start_token_id(self.processor_path)),
        )

    def _generation_loader(self, rows: list[dict]) -> DataLoader:
        return DataLoader(
            RowDataset(rows), batch_size=self._per_device(self.val_batch_size), shuffle=False,
            num_workers=self.num_workers, collate_fn=Collator(self.processor, "generate"),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """0: captioning prompts (CHAIR); 1..k: the question sets in ``question_sets()`` order (POPE)."""
        return [self._generation_loader(rows) for rows in [self.val_captions, *self.val_questions.values()]]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._generation_loader(rows) for rows in [self.test_captions, *self.test_questions.values()]]

    def question_sets(self, stage: str = "val") -> list[str]:
        """Names of the evaluation question sets, in loader order (loader i + 1 = set i)."""
        loaded = self.test_questions if stage == "test" else self.val_questions
        if loaded or self.val_question_files:
            return list(loaded) or [question_set_name(f) for f in self.val_question_files]
        split = self.test_split if stage == "test" else self.val_split
        return ["pope"] if self.coco_dir is not None and self._questions_file(split).is_file() else []

    def predict_dataloader(self) -> DataLoader:
        """Captioning prompts of the test split: ``predict`` writes their captions."""
        return self._generation_loader(self.test_captions)

    # ----------------------------------------------------------------- what validation needs
    def chair_ground_truth(self) -> dict:
        from metrics import build_coco_ground_truth

        return build_coco_ground_truth(self.coco_dir, cache_dir=self.cache_dir or self.coco_dir / ".cache")

    def hallucination_probes(self) -> list[tuple[str, str]]:
        """(anchor, companion) pairs whose companion hallucination the report tracks (the world's bias)."""
        if self.world is None:
            return []
        return [(anchor, companion) for anchor, companion, _ in self.world.bias]


def _empty_negative(row: dict) -> dict:
    return {k: row.get(k, v) for k, v in
            {"neg_text": "", "neg_kind": "", "neg_grounded": [], "neg_hallucinated": [], "pos_spans": []}.items()}
