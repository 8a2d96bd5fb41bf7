"""The world's captions and yes/no questions: every object kind present named with its count, true adjectives."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from metrics.english import NUMBER_WORDS, indefinite_article, pluralize

if TYPE_CHECKING:
    from datamodules.world.draw import World

TEMPLATES: tuple[str, ...] = (
    "{objects}.",
    "a picture of {objects}.",
    "there {be} {objects}.",
    "an image with {objects}.",
    "{first} next to {rest}.",  # needs two kinds of object
)


def question_text(name: str) -> str:
    """The yes/no question about category ``name``."""
    return f"Is there {indefinite_article(name)} {name} in the image?"


def _adjectives(world: World, cat: int) -> tuple[str, ...]:
    """Words that truly describe a category's objects: its colour; a companion is "small" / "dark" when so."""
    cfg = world.config
    if not world.is_companion[cat]:
        return (world.looks[cat].colour,)
    size = ("small",) if cfg.companion_scale < 0.8 else ("large",) if cfg.companion_scale > 1.25 else ()
    shade = ("dark",) if cfg.companion_contrast < 0.75 else (world.looks[cat].colour,)
    return size + shade


def _mention(world: World, rng: np.random.Generator, cat: int, count: int) -> str:
    noun = str(rng.choice(world.nouns[cat]))
    words = [pluralize(noun) if count > 1 else noun]
    if rng.random() < 0.5:
        words.insert(0, str(rng.choice(_adjectives(world, cat))))
    return f"{NUMBER_WORDS[count] if count > 1 else indefinite_article(words[0])} {' '.join(words)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def image_captions(world: World, rng: np.random.Generator, cats: list[int]) -> list[str]:
    """``captions_per_image`` captions, each naming every object kind present with its count."""
    counts = Counter(cats)
    usable = [t for t in TEMPLATES if len(counts) > 1 or "{first}" not in t]
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


def image_questions(world: World, rng: np.random.Generator, cats: list[int]) -> list[tuple[int, str]]:
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

