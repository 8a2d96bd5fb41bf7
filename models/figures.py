"""The analysis figures (matplotlib, PNG): score histograms, image-attention maps, captions with hallucinations marked.

matplotlib comes with the ``analysis`` extra (``pip install 'grounded-attention[analysis]'``); :func:`pyplot` names
it when it is missing. Figures are drawn off-screen (Agg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MISSING_EXTRA", "attention_maps", "caption_panels", "model_view", "pyplot", "score_histograms"]

MISSING_EXTRA = "pip install 'grounded-attention[analysis]'"
GROUNDED, HALLUCINATED = "#2b8a3e", "#c92a2a"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError naming the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"the analysis figures need matplotlib: {MISSING_EXTRA}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def score_histograms(groups: Sequence[tuple[str, Sequence[float], Sequence[bool], float | None]], path: Path,
                     title: str) -> Path:
    """One panel per signal (name, values, present, AUROC): grounded vs hallucinated mentions, NaN left out."""
    plt = pyplot()
    cols = min(3, max(1, len(groups)))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, values, present, area) in zip(axes.flat, groups):
        v, p = np.asarray(values, dtype=float), np.asarray(present, dtype=bool)
        keep = ~np.isnan(v)
        v, p = v[keep], p[keep]
        bins = np.histogram_bin_edges(v, bins=30) if len(v) else 10
        for chosen, colour, label in ((p, GROUNDED, "grounded"), (~p, HALLUCINATED, "hallucinated")):
            if chosen.any():  # density of an empty group would divide by zero
                ax.hist(v[chosen], bins=bins, alpha=0.6, color=colour, label=f"{label} (n={int(chosen.sum())})",
                        density=True)
        ax.set_title(f"{name}  AUROC {_label(area)}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return _save(plt, fig, path, title)


def model_view(image_processor: Any, image_path: str) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the image as the model sees it (the processor's resize/crop, normalisation undone)."""
    from PIL import Image

    pixels = image_processor(images=[Image.open(image_path).convert("RGB")], return_tensors="np")["pixel_values"]
    x = np.asarray(pixels, dtype=np.float32).reshape(-1, *pixels.shape[-3:])[0]  # (3, H, W); LLaVA-Next: base image
    if getattr(image_processor, "do_normalize", False):
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
        x = x * std + mean
    return np.clip(x.transpose(1, 2, 0), 0.0, 1.0)


def attention_maps(examples: Sequence[dict], path: Path, title: str) -> Path:
    """Panels of ``{"image": (H, W, 3), "attention": (P,), "title": str, "present": bool}``.

    A square number of image keys (LLaVA's patch grid) is drawn over the image; other layouts (BLIP-2's Q-Former
    queries, which have no place in the image) as bars per image key beside it.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, len(examples), figsize=(2.6 * len(examples), 5.4), squeeze=False)
    for col, example in enumerate(examples):
        image, attn = example["image"], np.asarray(example["attention"], dtype=float)
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(image)
        side = math.isqrt(len(attn))
        colour = GROUNDED if example["present"] else HALLUCINATED
        top.set_title(example["title"], fontsize=8, color=colour)
        top.axis("off")
        if side * side == len(attn) and side > 0:
            bottom.imshow(image)
            h, w = image.shape[:2]
            shown = bottom.imshow(attn.reshape(side, side), cmap="inferno", alpha=0.6, extent=(0, w, h, 0),
                                  interpolation="nearest")
            fig.colorbar(shown, ax=bottom, fraction=0.046, pad=0.04)
            bottom.axis("off")
        else:
            bottom.bar(np.arange(len(attn)), attn, color=colour)
            bottom.set_xlabel("image key (no spatial layout)", fontsize=7)
        bottom.set_title(f"on image: {attn.sum():.2f}", fontsize=8)
    return _save(plt, fig, path, title)


def _lines(caption: str, marks: Sequence[tuple[int, int, bool]], width: int) -> list[list[tuple[str, str | None]]]:
    """The caption wrapped at ``width`` characters, as (text, colour) pieces; marks: (start, end, present)."""
    colour = [None] * len(caption)
    for start, end, present in marks:
        for i in range(start, min(end, len(caption))):
            colour[i] = GROUNDED if present else HALLUCINATED
    lines, line, used, i = [], [], 0, 0
    for word in caption.split(" "):
        piece = word + " "
        if used and used + len(piece) > width:
            lines.append(line)
            line, used = [], 0
        for ch in piece:
            c = colour[i] if i < len(caption) else None
            if line and line[-1][1] == c:
                line[-1] = (line[-1][0] + ch, c)
            else:
                line.append((ch, c))
            i += 1
        used += len(piece)
    return lines + [line]


def caption_panels(examples: Sequence[dict], path: Path, title: str, width: int = 60) -> Path:
    """Rows of image | caption (grounded mentions green, hallucinated red and bold) | ground-truth objects.

    Each example: ``{"image": (H, W, 3), "caption": str, "marks": [(start, end, present)], "gt": [...],
    "label": str}``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(len(examples), 2, figsize=(9.5, 1.9 * len(examples)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for row, example in enumerate(examples):
        axes[row, 0].imshow(example["image"])
        axes[row, 0].axis("off")
        axes[row, 0].set_title(example["label"], fontsize=7)
        ax = axes[row, 1]
        ax.axis("off")
        y = 0.92
        for line in _lines(example["caption"], example["marks"], width):
            anchor = ax.text(0.0, y, "", transform=ax.transAxes, fontsize=9, va="top", family="monospace")
            for text, c in line:
                anchor = ax.annotate(text, xycoords=anchor, xy=(1, 0), va="bottom", fontsize=9, family="monospace",
                                     color=c or "black", fontweight="bold" if c == HALLUCINATED else "normal")
            y -= 0.17
        ax.text(0.0, max(y - 0.05, 0.0), "in the image: " + ", ".join(example["gt"]), transform=ax.transAxes,
                fontsize=8, va="top", color="#555555")
    return _save(plt, fig, path, title)
