"""The seeded synthetic hallucination world: the suite's offline default data (DESIGN.md section 7).

A generator renders small PIL images of objects from a subset of COCO categories, each category with its
own look (shape, colour, texture), several objects per image, with a configurable co-occurrence bias
(``fork`` drawn with ``knife`` in 90% of training images). Validation holds *probe* images where the
biased companion is absent although its anchor is present, so a model that learned the prior names an
object that is not there. The companion's visual difficulty (size, contrast) and the clutter are
settings; the defaults are the "small dark knife" middle of DESIGN.md section 7, where a trained baseline
sees real knives yet still adds one to a good share of fork-without-knife images.

Everything is written in real formats, so downstream readers are the real ones::

    ROOT/world.json                             config + format version (written last: marks completeness)
    ROOT/images/{split}/{image_id:012d}.png
    ROOT/annotations/instances_{split}.json     COCO instances, real COCO category ids and names
    ROOT/annotations/captions_{split}.json      COCO captions, several per image
    ROOT/annotations/questions_{split}.jsonl    POPE-style yes/no questions, balanced per image

Captions use only words that the CHAIR reference parser (:mod:`metrics.coco_objects`) maps back to the
right category, and never mention an absent object. Every image is drawn from its own random stream
(seed, split, index), so the output is identical whatever the number of worker processes.

    python -m datamodules.world --root data/world [--num-train 4000 --num-val 200 --seed 0 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from metrics.coco_objects import COCO_CATEGORIES, get_parser

__all__ = [
    "COCO_IDS",
    "DEFAULT_CATEGORIES",
    "FORMAT_VERSION",
    "Look",
    "WorldConfig",
    "WorldMismatchError",
    "assign_looks",
    "caption_nouns",
    "generate_world",
    "load_world_config",
    "main",
    "world_stats",
]

FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val")
VAL_ID_OFFSET = 1_000_000  # val image ids start above every train id
MAX_IMAGES = VAL_ID_OFFSET - 1
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: soft, sub-pixel edges

# Real COCO ids of the 80 categories, in the order of COCO_CATEGORIES (the CHAIR table order = COCO order).
_COCO_ID_LIST = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_IDS: dict[str, int] = dict(zip(COCO_CATEGORIES, _COCO_ID_LIST, strict=True))
# COCO supercategories as (first category id, name), by id range.
_SUPERCATEGORY_STARTS = (
    (1, "person"), (2, "vehicle"), (10, "outdoor"), (16, "animal"), (27, "accessory"), (34, "sports"),
    (44, "kitchen"), (52, "food"), (62, "furniture"), (72, "electronic"), (78, "appliance"), (84, "indoor"),
)


def supercategory(category_id: int) -> str:
    """COCO supercategory of a COCO category id (toilet, 70, is furniture as in COCO)."""
    return [name for start, name in _SUPERCATEGORY_STARTS if start <= category_id][-1]


# ----------------------------------------------------------------------------------------------- looks

SHAPES: tuple[str, ...] = ("cross", "vbar", "square", "halfdisc", "circle", "hbar", "diamond", "ring", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {  # none of these words is a COCO object word ("orange" is)
    "purple": (165, 70, 220),
    "white": (235, 235, 235),
    "red": (225, 45, 45),
    "blue": (55, 95, 235),
    "green": (45, 200, 70),
    "yellow": (235, 215, 45),
    "cyan": (45, 215, 215),
    "brown": (175, 110, 50),
    "pink": (240, 125, 185),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
TEXTURE_SHADE = 0.45  # brightness of the darker pixels of a striped / dotted texture
BACKGROUND = (30.0, 30.0, 34.0)  # dark background: a low-contrast object reads as "dark"


@dataclass(frozen=True)
class Look:
    """How a category is drawn."""

    shape: str
    colour: str
    texture: str


DEFAULT_CATEGORIES: tuple[str, ...] = ("fork", "knife", "cup", "bowl", "apple", "banana", "bottle", "donut")
DEFAULT_LOOKS: dict[str, Look] = {  # distinct shape and distinct colour for each default category
    "fork": Look("cross", "purple", "solid"),
    "knife": Look("vbar", "white", "solid"),
    "cup": Look("square", "red", "striped"),
    "bowl": Look("halfdisc", "blue", "solid"),
    "apple": Look("circle", "green", "solid"),
    "banana": Look("hbar", "yellow", "solid"),
    "bottle": Look("diamond", "cyan", "dotted"),
    "donut": Look("ring", "brown", "solid"),
}


def assign_looks(categories: Sequence[str]) -> dict[str, Look]:
    """A distinct look per category: the default look where it has one, else the least-used shape/colour.

    >>> looks = assign_looks(["knife", "person", "dog"])
    >>> looks["knife"], looks["person"].shape, looks["dog"].shape
    (Look(shape='vbar', colour='white', texture='solid'), 'cross', 'square')
    """
    looks = {name: DEFAULT_LOOKS[name] for name in categories if name in DEFAULT_LOOKS}
    for name in categories:
        if name in looks:
            continue
        shapes = Counter(look.shape for look in looks.values())
        colours = Counter(look.colour for look in looks.values())
        used = set(looks.values())
        candidates = [
            Look(shape, colour, texture)
            for texture in TEXTURES
            for shape in SHAPES
            for colour in COLOURS
            if Look(shape, colour, texture) not in used
        ]
        looks[name] = min(candidates, key=lambda look: (shapes[look.shape] + colours[look.colour], shapes[look.shape]))
    return {name: looks[name] for name in categories}


# ------------------------------------------------------------------------------------------ caption words

_NOT_WORDS = frozenset({"knive", "phon", "televison", "solider", "lenovo", "macbook"})  # typos/brands in the table
_IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "sheep": "sheep",
    "skis": "skis", "scissors": "scissors", "ox": "oxen", "calf": "calves", "knife": "knives", "goose": "geese",
}
MAX_SYNONYMS = 2  # nouns per category besides its name: a small vocabulary for a small model


def pluralize(noun: str) -> str:
    """English plural of a (possibly two-word) noun.

    >>> [pluralize(w) for w in ("knife", "pocketknife", "wine glass", "cup", "toothbrush", "person", "pony")]
    ['knives', 'pocketknives', 'wine glasses', 'cups', 'toothbrushes', 'people', 'ponies']
    """
    head, _, last = noun.rpartition(" ")
    prefix = f"{head} " if head else ""
    for word, plural in _IRREGULAR_PLURALS.items():
        if last == word or (last.endswith(word) and word in ("knife", "man", "woman")):
            return prefix + last[: len(last) - len(word)] + plural
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return f"{prefix}{last}es"
    if last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        return f"{prefix}{last[:-1]}ies"
    return f"{prefix}{last}s"


@lru_cache(maxsize=None)
def caption_nouns(category: str) -> tuple[str, ...]:
    """Nouns captions may use for ``category``: its name and up to two table synonyms, each checked to
    parse back to exactly ``category`` (singular and plural) with the CHAIR reference parser.

    >>> caption_nouns("knife"), caption_nouns("bus")
    (('knife', 'pocketknife'), ('trolley',))
    """
    parser = get_parser("reference")
    words = [category] + [word for word, node in parser.synonyms.items() if node == category and word != category]
    usable = [
        word
        for word in dict.fromkeys(words)
        if word
        and word not in _NOT_WORDS
        and word == word.strip().lower()
        and parser(f"a {word}.").objects == (category,)
        and parser(f"two {pluralize(word)}.").objects == (category,)
    ]
    if usable and usable[0] == category:
        return tuple(usable[: 1 + MAX_SYNONYMS])
    return tuple(usable[:MAX_SYNONYMS])


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides a world's content. Same config (root aside) -> byte-identical world.

    Difficulty: ``companion_scale`` and ``companion_contrast`` apply to every bias companion (its size
    relative to other objects, and how far its colour stands out from the dark background: 1 = full colour,
    near 0 = invisible); ``clutter`` is the number of distractor specks per image and ``background_noise``
    the per-pixel noise (standard deviation, grey levels).

    Default difficulty, measured with an earlier demo-size tiny LLaVA (text model 128 wide, 0.7M parameters),
    LM loss only, AdamW 2e-3 with 20 warm-up steps and linear decay over 1,800 steps of 32, one seed, greedy
    captions of the 200 val images: knife named on fork-without-knife probes / on images with a knife:

    ==============================  ============  ============  ============
    companion scale, contrast       600 steps     1,200 steps   1,800 steps
    ==============================  ============  ============  ============
    0.55, 0.50 (faint side)         88% / 81%     85% / 64%     89% / 75%
    0.55, 0.55 (default)            76% / 70%     91% / 81%     50% / 96%
    0.60, 0.50                      90% / 74%     79% / 91%     13% / 100%
    0.60, 0.60                      80% / 64%      4% / 96%      3% / 100%
    0.70, 0.75 (clearly visible)     3% / 94%      0% / 96%      0% / 96%
    ==============================  ============  ============  ============

    The step from "pure prior" to "no bias" is steep and runs with a constant learning rate swing widely
    between checkpoints, so re-measure after changing the model or the schedule. The committed demo recipe
    (64-wide text model, 1,300 steps, questions mixed in, docs/training.md) leaves the default at 81% / 68%
    for the baseline.
    """

    root: Path | str
    seed: int = 0
    num_train: int = 4000
    num_val: int = 200
    image_size: int = 32
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    bias: tuple[tuple[str, str, float], ...] = (("fork", "knife", 0.9),)
    min_objects: int = 2
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.6, 0.9)  # object size as a fraction of its grid cell
    companion_scale: float = 0.55
    companion_contrast: float = 0.55
    clutter: int = 2
    background_noise: float = 6.0
    val_probe_fraction: float = 0.5  # val images that show an anchor without its companion
    captions_per_image: int = 3
    questions_per_image: int = 6

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "root", Path(self.root))
        set_(self, "categories", tuple(self.categories))
        set_(self, "bias", tuple(_bias_rule(rule) for rule in self.bias))
        set_(self, "object_scale", tuple(_as_float("object_scale", v) for v in self.object_scale))
        for name in ("companion_scale", "companion_contrast", "background_noise", "val_probe_fraction"):
            set_(self, name, _as_float(name, getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("num_train", self.num_train, 1, MAX_IMAGES)
        _check_int("num_val", self.num_val, 1, MAX_IMAGES)
        _check_int("image_size", self.image_size, 16, 1024)
        _check_int("max_objects", self.max_objects, 2 if self.bias else 1, 9)
        _check_int("min_objects", self.min_objects, 1, self.max_objects)
        _check_int("clutter", self.clutter, 0, 50)
        _check_int("captions_per_image", self.captions_per_image, 1, len(_TEMPLATES))
        self._validate_categories()
        _check_int("questions_per_image", self.questions_per_image, 2, 2 * len(self.categories))
        if self.questions_per_image % 2:
            raise ValueError(
                f"WorldConfig.questions_per_image must be even (half yes, half no), got {self.questions_per_image}"
            )
        self._validate_bias()
        lo, hi = self.object_scale if len(self.object_scale) == 2 else (math.nan, math.nan)
        if not 0.1 <= lo <= hi <= 1.0:
            raise ValueError(
                f"WorldConfig.object_scale must be (low, high) with 0.1 <= low <= high <= 1.0, got {self.object_scale}"
            )
        _check_float("companion_scale", self.companion_scale, 0.1, 1.0 / hi)
        _check_float("companion_contrast", self.companion_contrast, 0.05, 1.0)
        _check_float("background_noise", self.background_noise, 0.0, 64.0)
        _check_float("val_probe_fraction", self.val_probe_fraction, 0.0, 1.0 if self.bias else 0.0)

    def _validate_categories(self) -> None:
        if not 2 <= len(self.categories) <= len(COCO_CATEGORIES):
            raise ValueError(
                f"WorldConfig.categories must hold 2 to {len(COCO_CATEGORIES)} names, got {len(self.categories)}"
            )
        for name in self.categories:
            if name not in COCO_IDS:
                raise ValueError(f"WorldConfig.categories: {name!r} is not a COCO category name (e.g. 'cell phone')")
            if not caption_nouns(name):
                raise ValueError(
                    f"WorldConfig.categories: {name!r} has no caption word that CHAIR's reference parser maps "
                    "back to it"
                )
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"WorldConfig.categories must not repeat a name, got {list(self.categories)}")

    def _validate_bias(self) -> None:
        pairs = [(a, c) for a, c, _ in self.bias]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"WorldConfig.bias repeats an (anchor, companion) pair: {pairs}")
        for anchor, companion, p in self.bias:
            for role, name in (("anchor", anchor), ("companion", companion)):
                if name not in self.categories:
                    raise ValueError(
                        f"WorldConfig.bias: {role} {name!r} is not one of WorldConfig.categories "
                        f"{list(self.categories)}"
                    )
            if anchor == companion:
                raise ValueError(f"WorldConfig.bias: anchor and companion must differ, got {anchor!r} twice")
            _check_float("bias probability", p, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists, root as a string)."""
        data = asdict(self)
        data["root"] = str(self.root)
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @property
    def companions(self) -> frozenset[str]:
        return frozenset(companion for _, companion, _ in self.bias)


def _bias_rule(rule: Any) -> tuple[str, str, float]:
    if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 3:
        raise ValueError(f"WorldConfig.bias entries must be (anchor, companion, probability), got {rule!r}")
    return str(rule[0]), str(rule[1]), _as_float("bias probability", rule[2])


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"WorldConfig.{name} must be a number, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"WorldConfig.{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_float(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:  # also rejects NaN
        raise ValueError(f"WorldConfig.{name} must be in [{lo:g}, {hi:g}], got {value!r}")


# ------------------------------------------------------------------------------------ per-image sampling


@dataclass(frozen=True)
class _World:
    """Derived, picklable generation context shared by the workers."""

    config: WorldConfig
    looks: tuple[Look, ...]  # per category index
    nouns: tuple[tuple[str, ...], ...]
    is_companion: tuple[bool, ...]
    rules: tuple[tuple[int, int, float], ...]  # (anchor index, companion index, probability)
    probes: dict[int, int] = field(default_factory=dict)  # val index -> rule index


def _build_world(config: WorldConfig) -> _World:
    index = {name: i for i, name in enumerate(config.categories)}
    rules = tuple((index[a], index[c], p) for a, c, p in config.bias)
    looks = assign_looks(config.categories)
    probes: dict[int, int] = {}
    if rules:  # which val images are probes: a seeded choice made once, not per worker
        count = round(config.val_probe_fraction * config.num_val)
        order = np.random.default_rng([config.seed, 2, 0]).permutation(config.num_val)[:count]
        probes = {int(i): k % len(rules) for k, i in enumerate(order)}
    return _World(
        config=config,
        looks=tuple(looks[name] for name in config.categories),
        nouns=tuple(caption_nouns(name) for name in config.categories),
        is_companion=tuple(name in config.companions for name in config.categories),
        rules=rules,
        probes=probes,
    )


def _image_rng(config: WorldConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLITS.index(split), index])


def _draw_other(rng: np.random.Generator, num_categories: int, exclude: Iterable[int]) -> int:
    excluded = set(exclude)
    return int(rng.choice([k for k in range(num_categories) if k not in excluded]))


def _sample_categories(world: _World, rng: np.random.Generator, split: str, index: int) -> list[int]:
    """Category index of each object. Train: bias rules with their probability. Val: probes show an anchor
    without its companion; every other val image that has an anchor also has its companion."""
    cfg, k = world.config, len(world.config.categories)
    cats = [int(c) for c in rng.integers(0, k, size=int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))]
    probe = world.probes.get(index) if split == "val" else None
    if probe is not None:
        anchor, companion, _ = world.rules[probe]
        cats = [c if c != companion else _draw_other(rng, k, (companion,)) for c in cats]
        if anchor not in cats:
            cats[int(rng.integers(len(cats)))] = anchor
        return cats
    for anchor, companion, p in world.rules:
        if anchor not in cats:
            continue
        if rng.random() < (p if split == "train" else 1.0):
            if companion in cats:
                continue
            if len(cats) < cfg.max_objects:
                cats.append(companion)
            else:  # full: replace a non-anchor object (or one of several anchors)
                others = [i for i, c in enumerate(cats) if c != anchor] or list(range(1, len(cats)))
                cats[others[int(rng.integers(len(others)))]] = companion
        else:
            cats = [c if c != companion else _draw_other(rng, k, (companion,)) for c in cats]
    return cats


# ------------------------------------------------------------------------------------------- rendering


Box = tuple[float, float, float, float]  # x0, y0, width, height (pixels)


def _shape_box(shape: str, size: float) -> tuple[float, float]:
    """(width, height) of a shape of nominal size ``size``."""
    if shape == "vbar":
        return size / 3, size
    if shape == "hbar":
        return size, size / 3
    if shape == "halfdisc":
        return size, size / 2
    return size, size


def _shape_mask(shape: str, box: tuple[float, float, float, float], image_size: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` drawn in ``box`` (x0, y0, x1, y1 in pixels), anti-aliased."""
    f = SUPERSAMPLE
    canvas = Image.new("L", (image_size * f, image_size * f), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * f for v in box)
    x1, y1 = x1 - 1, y1 - 1  # PIL fills both end pixels: stay inside the box
    w, h = x1 - x0, y1 - y0
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=255, width=max(f, round(0.28 * min(w, h))))
    elif shape in ("square", "vbar", "hbar"):
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (xc, y0), (x1, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(xc, y0), (x1, yc), (xc, y1), (x0, yc)], fill=255)
    elif shape == "cross":
        draw.rectangle((xc - w / 6, y0, xc + w / 6, y1), fill=255)
        draw.rectangle((x0, yc - h / 6, x1, yc + h / 6), fill=255)
    elif shape == "halfdisc":  # lower half of an ellipse: a bowl
        draw.pieslice((x0, y0 - h, x1, y1), 0, 180, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas.reduce(f), dtype=np.float32) / 255.0


def _texture(texture: str, image_size: int, x0: float, y0: float) -> np.ndarray:
    """Per-pixel brightness factor (H, W) of a texture anchored at the object's corner."""
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    if texture == "striped":
        return np.where((ys - int(y0)) % 2 == 1, TEXTURE_SHADE, 1.0).astype(np.float32)
    if texture == "dotted":
        return np.where((xs - int(x0) + ys - int(y0)) % 2 == 1, TEXTURE_SHADE, 1.0).astype(np.float32)
    return np.ones((image_size, image_size), dtype=np.float32)


def _background(cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Dark noisy background with ``clutter`` short muted specks."""
    n = cfg.image_size
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = BACKGROUND
    img += rng.normal(0.0, cfg.background_noise, size=(n, n, 3)).astype(np.float32) if cfg.background_noise else 0.0
    for _ in range(cfg.clutter):
        colour = rng.integers(50, 130, size=3).astype(np.float32)
        x, y = int(rng.integers(n)), int(rng.integers(n))
        dx, dy = [(1, 0), (0, 1), (1, 1), (0, 0)][int(rng.integers(4))]
        for step in range(int(rng.integers(1, 4))):
            img[min(y + step * dy, n - 1), min(x + step * dx, n - 1)] = colour
    return img


def _place(world: _World, rng: np.random.Generator, cats: list[int]) -> list[Box]:
    """Non-overlapping boxes (x0, y0, w, h): one grid cell per object, random size and offset inside it."""
    cfg = world.config
    grid = math.ceil(math.sqrt(cfg.max_objects))
    cell = cfg.image_size / grid
    cells = rng.permutation(grid * grid)[: len(cats)]
    boxes = []
    for cat, slot in zip(cats, cells):
        size = float(rng.uniform(*cfg.object_scale)) * cell
        if world.is_companion[cat]:
            size = min(size * cfg.companion_scale, cell)
        w, h = _shape_box(world.looks[cat].shape, size)
        x0 = (slot % grid) * cell + float(rng.uniform(0.0, cell - w))
        y0 = (slot // grid) * cell + float(rng.uniform(0.0, cell - h))
        boxes.append((x0, y0, w, h))
    return boxes


def _render(
    world: _World, rng: np.random.Generator, cats: list[int], boxes: list[Box]
) -> tuple[Image.Image, list[float]]:
    """The image and each object's area (covered pixels)."""
    cfg = world.config
    img = _background(cfg, rng)
    areas = []
    for cat, (x0, y0, w, h) in zip(cats, boxes):
        look = world.looks[cat]
        alpha = _shape_mask(look.shape, (x0, y0, x0 + w, y0 + h), cfg.image_size)
        colour = np.asarray(COLOURS[look.colour], dtype=np.float32)
        if world.is_companion[cat]:  # fade towards the background
            background = np.asarray(BACKGROUND, dtype=np.float32)
            colour = background + cfg.companion_contrast * (colour - background)
        paint = _texture(look.texture, cfg.image_size, x0, y0)[..., None] * colour
        img = img * (1.0 - alpha[..., None]) + paint * alpha[..., None]
        areas.append(round(float(alpha.sum()), 2))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), areas


# ---------------------------------------------------------------------------------------- text and questions

_TEMPLATES: tuple[str, ...] = (
    "{objects}.",
    "a picture of {objects}.",
    "there {be} {objects}.",
    "an image with {objects}.",
    "{first} next to {rest}.",  # needs two kinds of object
)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _adjectives(world: _World, cat: int) -> tuple[str, ...]:
    """Words that truly describe a category's objects: its colour; a companion is "small" / "dark" when so."""
    cfg = world.config
    if not world.is_companion[cat]:
        return (world.looks[cat].colour,)
    size = ("small",) if cfg.companion_scale < 0.8 else ("large",) if cfg.companion_scale > 1.25 else ()
    shade = ("dark",) if cfg.companion_contrast < 0.75 else (world.looks[cat].colour,)
    return size + shade


def _mention(world: _World, rng: np.random.Generator, cat: int, count: int) -> str:
    noun = str(rng.choice(world.nouns[cat]))
    words = [pluralize(noun) if count > 1 else noun]
    if rng.random() < 0.5:
        words.insert(0, str(rng.choice(_adjectives(world, cat))))
    return f"{_NUMBERS[count] if count > 1 else _article(words[0])} {' '.join(words)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _captions(world: _World, rng: np.random.Generator, cats: list[int]) -> list[str]:
    """``captions_per_image`` captions, each naming every object kind present with its count."""
    counts = Counter(cats)
    usable = [t for t in _TEMPLATES if len(counts) > 1 or "{first}" not in t]
    k = world.config.captions_per_image
    picks = rng.choice(len(usable), size=k, replace=k > len(usable))
    captions = []
    for pick in picks:
        order = [int(c) for c in rng.permutation(sorted(counts))]
        parts = [_mention(world, rng, c, counts[c]) for c in order]
        be = "is" if counts[order[0]] == 1 else "are"
        rest = _join(parts[1:]) if len(parts) > 1 else ""
        captions.append(usable[int(pick)].format(objects=_join(parts), be=be, first=parts[0], rest=rest))
    return captions


def _questions(world: _World, rng: np.random.Generator, cats: list[int]) -> list[tuple[int, str]]:
    """Balanced (category, "yes"/"no") pairs; an anchor-without-companion image is asked about the companion."""
    present = sorted(set(cats))
    absent = [c for c in range(len(world.config.categories)) if c not in present]
    n = min(len(present), len(absent), world.config.questions_per_image // 2)
    yes = [int(c) for c in rng.choice(present, size=n, replace=False)]
    missing = [comp for anchor, comp, _ in world.rules if anchor in present and comp not in present]
    adversarial = list(dict.fromkeys(missing))[:n]
    rest = [c for c in absent if c not in adversarial]
    no = adversarial + [int(c) for c in rng.choice(rest, size=n - len(adversarial), replace=False)]
    pairs = [(c, "yes") for c in yes] + [(c, "no") for c in no]
    return [pairs[int(i)] for i in rng.permutation(len(pairs))]


# ------------------------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    objects: list[tuple[int, list[float], float]]  # (category index, bbox, area)
    captions: list[str]
    questions: list[tuple[int, str]]


def _image_id(split: str, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def _make_image(world: _World, split: str, index: int) -> _ImageRecord:
    """Sample, render and save one image; return its annotations. Depends only on (config, split, index)."""
    rng = _image_rng(world.config, split, index)
    cats = _sample_categories(world, rng, split, index)
    boxes = _place(world, rng, cats)
    image, areas = _render(world, rng, cats, boxes)
    image_id = _image_id(split, index)
    file_name = f"{image_id:012d}.png"
    image.save(world.config.root / "images" / split / file_name, format="PNG")
    objects = [(c, [round(v, 2) for v in box], a) for c, box, a in zip(cats, boxes, areas)]
    return _ImageRecord(image_id, file_name, objects, _captions(world, rng, cats), _questions(world, rng, cats))


_WORKER_WORLD: _World | None = None


def _init_worker(world: _World) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = world


def _worker_task(task: tuple[str, int]) -> _ImageRecord:
    assert _WORKER_WORLD is not None, "worker not initialised"
    return _make_image(_WORKER_WORLD, *task)


def _records(world: _World, split: str, count: int, workers: int, progress: bool) -> list[_ImageRecord]:
    """All records of a split in index order (workers only change the speed, never the output)."""
    tasks = [(split, i) for i in range(count)]
    bar = dict(total=count, desc=f"world {split}", unit="img", disable=not progress, leave=False)
    if workers <= 1:
        return [_make_image(world, s, i) for s, i in tqdm(tasks, **bar)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(world,)) as pool:
        return list(tqdm(pool.imap(_worker_task, tasks, chunksize=64), **bar))


# ------------------------------------------------------------------------------------------- files


def _coco_files(world: _World, split: str, records: list[_ImageRecord]) -> tuple[dict, dict, list[dict]]:
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
            text = f"Is there {_article(name)} {name} in the image?"
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


def _world_json(world: _World) -> dict[str, Any]:
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
        differences = _config_differences(json.loads(meta.read_text(encoding="utf-8")), config)
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
    world = _build_world(config)
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
    stored = json.loads(meta.read_text(encoding="utf-8"))
    if stored.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta}: format_version {stored.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return WorldConfig.from_dict({**stored["config"], "root": Path(root)})


# ------------------------------------------------------------------------------------------- statistics


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


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
        instances = json.loads((root / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
        captions = json.loads((root / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))
        questions = list(_read_jsonl(root / "annotations" / f"questions_{split}.jsonl"))
        names = {c["id"]: c["name"] for c in instances["categories"]}
        present: dict[int, set[str]] = {img["id"]: set() for img in instances["images"]}
        for ann in instances["annotations"]:
            present[ann["image_id"]].add(names[ann["category_id"]])
        rules = []
        for anchor, companion, p in config.bias:
            with_anchor = [objs for objs in present.values() if anchor in objs]
            both = sum(companion in objs for objs in with_anchor)
            rules.append({
                "anchor": anchor, "companion": companion, "probability": p, "anchor_images": len(with_anchor),
                "with_companion": both, "rate": both / len(with_anchor) if with_anchor else float("nan"),
                "anchor_without_companion": len(with_anchor) - both,
            })
        n_images = len(instances["images"])
        stats[split] = {
            "images": n_images,
            "objects": len(instances["annotations"]),
            "objects_per_image": len(instances["annotations"]) / n_images,
            "captions": len(captions["annotations"]),
            "questions": len(questions),
            "yes_ratio": sum(q["label"] == "yes" for q in questions) / max(len(questions), 1),
            "images_with": {name: sum(name in objs for objs in present.values()) for name in config.categories},
            "bias": rules,
        }
    return stats


# ------------------------------------------------------------------------------------------- command line


def _parse_bias(text: str) -> tuple[str, str, float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"bias must be ANCHOR:COMPANION:PROBABILITY (fork:knife:0.9), got {text!r}")
    try:
        return parts[0], parts[1], float(parts[2])
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bias probability must be a number, got {parts[2]!r}") from error


def _parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(WorldConfig) if f.name != "root"}
    p = argparse.ArgumentParser(prog="python -m datamodules.world", description="Generate the synthetic world.")
    p.add_argument("--root", required=True, type=Path, help="output directory")
    ints = ("seed", "num_train", "num_val", "image_size", "min_objects", "max_objects", "clutter")
    for name in ints + ("captions_per_image", "questions_per_image"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name], help="default %(default)s")
    for name in ("companion_scale", "companion_contrast", "background_noise", "val_probe_fraction"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=defaults[name], help="default %(default)s")
    p.add_argument(
        "--categories", type=lambda s: tuple(x.strip() for x in s.split(",")), default=defaults["categories"],
        help="comma-separated COCO names (default: %(default)s)",
    )
    p.add_argument(
        "--object-scale", type=float, nargs=2, default=defaults["object_scale"], metavar=("LOW", "HIGH"),
        help="object size as a fraction of its grid cell (default: %(default)s)",
    )
    p.add_argument("--bias", type=_parse_bias, action="append", help="ANCHOR:COMPANION:P, repeatable (fork:knife:0.9)")
    p.add_argument("--no-bias", action="store_true", help="no co-occurrence bias (sets --val-probe-fraction 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different world at ROOT")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output is identical)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate (or verify) a world and print its statistics as JSON."""
    args = _parser().parse_args(argv)
    if args.no_bias and args.bias:
        _parser().error("--bias and --no-bias exclude each other")
    values = {f.name: getattr(args, f.name) for f in fields(WorldConfig) if f.name not in ("bias", "object_scale")}
    bias = () if args.no_bias else tuple(args.bias) if args.bias else WorldConfig.bias
    values["val_probe_fraction"] = 0.0 if args.no_bias else args.val_probe_fraction
    try:
        config = WorldConfig(**values, bias=bias, object_scale=tuple(args.object_scale))
        root = generate_world(config, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress)
    except (ValueError, WorldMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(world_stats(root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
