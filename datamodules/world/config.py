"""What decides a world: ``WorldConfig``, the COCO ids of its categories, their looks and caption nouns."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from datamodules.world.text import TEMPLATES
from metrics.coco_objects import COCO_CATEGORIES, get_parser
from metrics.english import pluralize

FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val")
VAL_ID_OFFSET = 1_000_000  # val image ids start above every train id
MAX_IMAGES = VAL_ID_OFFSET - 1

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
MAX_SYNONYMS = 2  # nouns per category besides its name: a small vocabulary for a small model


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
        _check_int("captions_per_image", self.captions_per_image, 1, len(TEMPLATES))
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
