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

Modules: ``config`` (WorldConfig, category looks and caption nouns), ``draw`` (what each image shows and
how it is rendered), ``text`` (captions and questions), ``files`` (generation, COCO files, statistics),
``cli`` (the command line).
"""

from datamodules.world.cli import main
from datamodules.world.config import (
    COCO_IDS,
    DEFAULT_CATEGORIES,
    FORMAT_VERSION,
    Look,
    WorldConfig,
    assign_looks,
    caption_nouns,
)
from datamodules.world.files import MARKER, WorldMismatchError, generate_world, load_world_config, world_stats

__all__ = [
    "COCO_IDS",
    "DEFAULT_CATEGORIES",
    "FORMAT_VERSION",
    "MARKER",
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
