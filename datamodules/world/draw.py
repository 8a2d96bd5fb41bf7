"""What one image of the world shows (categories, boxes) and how it is drawn (PIL shapes, textures, noise)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from datamodules.world.config import COLOURS, SHAPES, SPLITS, Look, WorldConfig, assign_looks, caption_nouns

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: soft, sub-pixel edges
TEXTURE_SHADE = 0.45  # brightness of the darker pixels of a striped / dotted texture
BACKGROUND = (30.0, 30.0, 34.0)  # dark background: a low-contrast object reads as "dark"


@dataclass(frozen=True)
class World:
    """Derived, picklable generation context shared by the workers."""

    config: WorldConfig
    looks: tuple[Look, ...]  # per category index
    nouns: tuple[tuple[str, ...], ...]
    is_companion: tuple[bool, ...]
    rules: tuple[tuple[int, int, float], ...]  # (anchor index, companion index, probability)
    probes: dict[int, int] = field(default_factory=dict)  # val index -> rule index


def build_world(config: WorldConfig) -> World:
    index = {name: i for i, name in enumerate(config.categories)}
    rules = tuple((index[a], index[c], p) for a, c, p in config.bias)
    looks = assign_looks(config.categories)
    probes: dict[int, int] = {}
    if rules:  # which val images are probes: a seeded choice made once, not per worker
        count = round(config.val_probe_fraction * config.num_val)
        order = np.random.default_rng([config.seed, 2, 0]).permutation(config.num_val)[:count]
        probes = {int(i): k % len(rules) for k, i in enumerate(order)}
    return World(
        config=config,
        looks=tuple(looks[name] for name in config.categories),
        nouns=tuple(caption_nouns(name) for name in config.categories),
        is_companion=tuple(name in config.companions for name in config.categories),
        rules=rules,
        probes=probes,
    )


def image_rng(config: WorldConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLITS.index(split), index])


def _draw_other(rng: np.random.Generator, num_categories: int, exclude: Iterable[int]) -> int:
    excluded = set(exclude)
    return int(rng.choice([k for k in range(num_categories) if k not in excluded]))


def sample_categories(world: World, rng: np.random.Generator, split: str, index: int) -> list[int]:
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


def place(world: World, rng: np.random.Generator, cats: list[int]) -> list[Box]:
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


def render(
    world: World, rng: np.random.Generator, cats: list[int], boxes: list[Box]
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

