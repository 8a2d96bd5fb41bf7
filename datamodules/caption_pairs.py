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
from dataclasses import asdict
from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.collate import Collator, decoder_start_token_id
from datamodules.cooccurrence import CooccurrenceNegatives
from datamodules.evaluation import ChairMode, EvaluationSpec, evaluation_loaders
from datamodules.loaders import ResumableLoader, ResumableSampler, RowDataset
from datamodules.negatives import ALL_KINDS
from datamodules.readers import (
    caption_rows,
    check_image,
    coco_file,
    coco_split,
    complete_row,
    negative_fields,
    pair_rows,
    question_rows,
    question_set_name,
    questions_file,
    read_image_ids,
)
from datamodules.world import WorldConfig
from metrics.io import read_records
from models.demo_backbone import TinyLlavaConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 3


def save_atomically(dataset, cache: Path) -> None:
    """``save_to_disk`` into a temporary sibling, then rename: a concurrent run never reads a half-written cache."""
    import os
    import shutil
    import tempfile

    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    dataset.save_to_disk(str(staging))
    try:
        os.replace(staging, cache)
    except OSError:  # another process finished the same cache first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)


class CaptionPairsDataModule(LightningDataModule):
    """Caption pairs + yes/no questions for training; captioning prompts and questions for validation.

    Args:
        processor: hub id or directory of the backbone's processor (``AutoProcessor.from_pretrained``); the CLI
            sets it to ``model.backbone``.
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
        cooccurrence: co-occurrence hard negatives (``datamodules.cooccurrence.CooccurrenceNegatives``): the
            likely companion of a present anchor written into captions of images without it. Needs instance
            annotations (not ``pairs_file``).
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
        processor: str | None = None,
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
        cooccurrence: CooccurrenceNegatives | None = None,
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
        if not processor:
            raise ValueError("data.processor is required: the backbone's hub id or directory (the CLI sets it to "
                             "model.backbone)")
        if world is not None:
            world_root = str(Path(world.root))
            if coco_dir not in (None, world_root):
                raise ValueError(f"data.coco_dir ({coco_dir}) and data.world.root ({world_root}) disagree")
            coco_dir = world_root
        if coco_dir is None and pairs_file is None:
            raise ValueError("give data.coco_dir (COCO-format annotations), data.world or data.pairs_file")
        if demo_backbone is not None and coco_dir is None:
            raise ValueError("data.demo_backbone trains its tokenizer on COCO-format captions: give data.world or "
                             "data.coco_dir too")
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
        self.negative_kinds = list(negative_kinds or ALL_KINDS)
        if not 0.0 <= negative_fraction <= 1.0:
            raise ValueError(f"data.negative_fraction must be in [0, 1], got {negative_fraction}")
        self.negative_fraction = negative_fraction
        if cooccurrence is not None and pairs_file is not None:
            raise ValueError("data.cooccurrence mines companions from instance annotations, which data.pairs_file "
                             "does not have: use data.coco_dir (or data.world), or set data.cooccurrence null")
        self.cooccurrence = cooccurrence
        self._presence: tuple[tuple[str, ...], dict[int, frozenset[str]]] | None = None
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
        texts = [self.caption_prompt, self.question_prompt, self.question_suffix, "yes", "no"]
        for split in (self.train_split, self.val_split):
            texts += [a["caption"] for a in coco_split(self.coco_dir, split)[2]]
            path = questions_file(self.coco_dir, split)
            if path.is_file():
                texts += [q["text"] for q in read_records(path)]
        return texts

    def _cache_key(self, sources: list[Path]) -> str:
        digest = hashlib.sha256(f"pairs v{CACHE_VERSION}".encode())
        settings = [self.caption_prompt, self.question_prompt, self.question_suffix, self.negative_kinds, self.negative_fraction,
                    self.questions, self.train_questions_per_image, self.skip_missing, self.seed, str(self.image_dir)]
        if self.cooccurrence is not None:  # (absent: the key of earlier caches stays valid)
            settings.append(asdict(self.cooccurrence))
        digest.update(json.dumps(settings).encode())
        for path in sources:
            stat = path.stat()
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:20]

    def _train_rows(self) -> list[dict]:
        import datasets

        sources = [self.pairs_file] if self.pairs_file else [
            coco_file(self.coco_dir, "captions", self.train_split),
            coco_file(self.coco_dir, "instances", self.train_split),
        ]
        question_file = questions_file(self.coco_dir, self.train_split) if self.coco_dir else None
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
                rows = [r if rng.random() < self.negative_fraction else {**r, **negative_fields(None, set())} for r in rows]
        else:
            rows, skipped = caption_rows(
                self.coco_dir, self.train_split, self.image_dir / self.train_split, self.caption_prompt, rng,
                self.negative_kinds, self.skip_missing, checked, self.negative_fraction, self.cooccurrence,
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
        normalised = [complete_row(r) for r in rows]
        save_atomically(datasets.Dataset.from_list(normalised), cache)
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
        for path in self.val_question_files or [p for p in [questions_file(self.coco_dir, split)] if p.is_file()]:
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
            collate_fn=Collator(self.processor, "train", decoder_start_token_id(self.processor_path),
                                *self.object_presence()),
        )

    def _generation_loader(self, rows: list[dict]) -> DataLoader:
        return DataLoader(
            RowDataset(rows), batch_size=self._per_device(self.val_batch_size), shuffle=False,
            num_workers=self.num_workers, collate_fn=Collator(self.processor, "generate"),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """0: captioning prompts (CHAIR); 1..k: the question sets (POPE), in the order of ``evaluation``."""
        return [self._generation_loader(rows) for rows in evaluation_loaders(*self._stage_rows("validate"))]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._generation_loader(rows) for rows in evaluation_loaders(*self._stage_rows("test"))]

    def predict_dataloader(self) -> DataLoader:
        """Captioning prompts of the test split: ``predict`` writes their captions."""
        return self._generation_loader(self._stage_rows("predict")[0])

    # ----------------------------------------------------------------- the evaluation contract (GroundedVLM)
    def evaluation(self, stage: str, chair_mode: ChairMode = "reference") -> EvaluationSpec:
        """CHAIR ground truth (parsed in ``chair_mode``), question sets in loader order, the world's bias probes."""
        from metrics import build_coco_ground_truth

        if self.coco_dir is None:
            raise ValueError("evaluation needs data.coco_dir (COCO-format annotations of the evaluation split)")
        _, questions = self._stage_rows(stage)
        ground_truth = build_coco_ground_truth(self.coco_dir, mode=chair_mode, cache_dir=self.cache_dir or self.coco_dir / ".cache")
        probes = tuple((anchor, companion) for anchor, companion, _ in self.world.bias) if self.world is not None else ()
        return EvaluationSpec(ground_truth=ground_truth, question_sets=tuple(questions), probes=probes,
                              categories=self.object_presence()[0])

    def object_presence(self) -> tuple[tuple[str, ...], dict[int, frozenset[str]] | None]:
        """(the training split's object categories, sorted; image id -> categories shown) from its instance
        annotations: the vocabulary and labels of the candidate-word score. ``((), None)`` without them."""
        if self._presence is None:
            if self.coco_dir is None:
                self._presence = ((), None)
            else:
                _, present, _ = coco_split(self.coco_dir, self.train_split)
                categories = tuple(sorted(set().union(*present.values())))
                self._presence = (categories, {int(i): frozenset(names) for i, names in present.items()})
        return self._presence

    def _stage_rows(self, stage: str) -> tuple[list[dict], dict[str, list[dict]]]:
        """(captioning rows, question rows by set name) that ``stage`` evaluates, loaded on first use."""
        test = stage in ("test", "predict")
        if not (self.test_captions if test else self.val_captions):
            if test:
                self.test_captions, self.test_questions = self._eval_rows(self.test_split)
            else:
                self.val_captions, self.val_questions = self._eval_rows(self.val_split)
        return (self.test_captions, self.test_questions) if test else (self.val_captions, self.val_questions)
