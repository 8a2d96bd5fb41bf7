"""Typed settings of every decoding method, with the published defaults (docs/methods.md says where each is from).

One dataclass per method; ``DecodingSettings`` (in ``models/decoding/__init__.py``) holds one block of each, so a
LightningCLI config can set ``generation.method: vcd`` and ``generation.vcd.alpha: 1.0``. Errors name the setting
to change as ``<method>.<field>``.

Layer ranges are written as upstream writes them for a 32-layer LLaMA (``start_layer``/``end_layer``, end
exclusive) and clamped to the model at hand by ``layer_range``: ``[min(start, n - 1), min(end, n))``, so a range
that starts past the last layer still selects the last layer (the 2-layer demo model keeps one edited layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name} {message}")


def _number(obj, name: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """``<method>.<name>`` is a finite number in [low, high] (or (low, high] with low_open)."""
    value = getattr(obj, name)
    key = f"{obj.METHOD}.{name}"
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
           f"must be a finite number, got {value!r}")
    if low is not None:
        relation = ">" if low_open else ">="
        _check(value > low if low_open else value >= low, key, f"must be {relation} {low}, got {value!r}")
    if high is not None:
        _check(value <= high, key, f"must be <= {high}, got {value!r}")


def _integer(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    key = f"{obj.METHOD}.{name}"
    _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an int, got {value!r}")
    _check(value >= low, key, f"must be >= {low}, got {value!r}")


def _index_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _range(obj) -> None:
    _integer(obj, "start_layer", 0)
    _integer(obj, "end_layer", 1)
    _check(obj.start_layer < obj.end_layer, f"{obj.METHOD}.start_layer",
           f"must be < end_layer, got [{obj.start_layer}, {obj.end_layer})")


def layer_range(start: int, end: int, n_layers: int) -> range:
    """Upstream ``[start, end)`` clamped to a model of ``n_layers`` layers; never empty (see module docstring)."""
    return range(min(start, n_layers - 1), min(end, n_layers))


@dataclass
class GreedySettings:
    """Greedy decoding: the argmax token at every step (no settings)."""

    METHOD = "greedy"


@dataclass
class BeamSettings:
    """Beam search as Hugging Face ``generate(num_beams=...)`` runs it (length penalty, early-stop heuristic)."""

    METHOD = "beam"
    num_beams: int = 5
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _integer(self, "num_beams", 1)
        _number(self, "length_penalty")


@dataclass
class VCDSettings:
    """Visual contrastive decoding: ``(1 + alpha) l(v) - alpha l(v')`` with ``v'`` a diffusion-noised image."""

    METHOD = "vcd"
    alpha: float = 1.0
    beta: float = 0.1  # adaptive plausibility cutoff: keep tokens with p >= beta * p_max under l(v)
    noise_step: int = 500  # t of the 1000-step sigmoid-beta forward diffusion
    seed: int = 0  # noise of each image is seeded by this and the image's own pixels

    def __post_init__(self) -> None:
        _number(self, "alpha", 0.0)
        _number(self, "beta", 0.0, 1.0, low_open=True)
        _integer(self, "noise_step", 0)
        _check(self.noise_step < 1000, "vcd.noise_step", f"must be < 1000 (diffusion steps), got {self.noise_step}")
        _integer(self, "seed", 0)


@dataclass
class PAISettings:
    """PAI: image logits of the last query row ``a + alpha |a|`` in layers [start, end) + text-only CFG ``gamma``."""

    METHOD = "pai"
    alpha: float = 0.2
    gamma: float = 1.1
    beta: float = 0.1  # plausibility cutoff of the CFG step (fixed at 0.1 upstream)
    start_layer: int = 2
    end_layer: int = 32

    def __post_init__(self) -> None:
        _number(self, "alpha", 0.0)
        _number(self, "gamma", 0.0)
        _number(self, "beta", 0.0, 1.0, low_open=True)
        _range(self)


@dataclass
class OPERASettings:
    """OPERA: beam search with an over-trust penalty on the last layer's attention and retrospection-allocation."""

    METHOD = "opera"
    num_beams: int = 5
    num_candidates: int = 5  # tokens per beam scored with one extra forward pass each
    scale_factor: float = 50.0
    penalty_weight: float = 1.0
    threshold: int = 15  # rollback when one summary column was the maximum more than this many steps
    window: int = 512  # steps of rollback history
    warmup: int = 10  # first response tokens: image-attention reward instead of the penalty; no rollback into them
    rollback: bool = True
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _integer(self, "num_beams", 2)
        _integer(self, "num_candidates", 2)
        _number(self, "scale_factor", 0.0, low_open=True)
        _number(self, "penalty_weight", 0.0)
        _integer(self, "threshold", 0)
        _integer(self, "window", 1)
        _integer(self, "warmup", 0)
        _check(isinstance(self.rollback, bool), "opera.rollback", f"must be a bool, got {self.rollback!r}")
        _number(self, "length_penalty")


@dataclass
class DoLaSettings:
    """DoLa: ``log q_N - log q_M``, M the candidate layer with the largest JSD from the final layer, per row."""

    METHOD = "dola"
    layers: str | list[int] = "high"  # "low" | "high" (Hugging Face's buckets) or explicit hidden-state indices
    relative_top: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            _check(self.layers in ("low", "high"), "dola.layers",
                   f"must be 'low', 'high' or a list of ints, got {self.layers!r}")
        else:
            _check(_index_list(self.layers), "dola.layers",
                   f"must be 'low', 'high' or a list of non-negative ints, got {self.layers!r}")
            self.layers = list(self.layers)
        _number(self, "relative_top", 0.0, 1.0, low_open=True)


@dataclass
class EAHSettings:
    """EAH/EVAS: in shallow layers, the head with the densest image attention sink lends its map to every head."""

    METHOD = "eah"
    layers: list[int] = field(default_factory=lambda: [1])  # decoder layers (clamped to the model); [] = off
    threshold: float = 0.0008

    def __post_init__(self) -> None:
        _check(_index_list(self.layers), "eah.layers", f"must be a list of non-negative ints, got {self.layers!r}")
        self.layers = list(self.layers)
        _number(self, "threshold", 0.0)


@dataclass
class AAISettings:
    """AAI: pull the image part of each decoding query's attention toward the vision encoder's own attention."""

    METHOD = "aai"
    alpha: float = 0.3
    beta: float = 1.0  # re-weighting of the image attention mass
    start_layer: int = 2
    end_layer: int = 32
    warmup: int = 5  # generated tokens decoded untouched before the alignment starts

    def __post_init__(self) -> None:
        _number(self, "alpha", 0.0, 1.0)
        _number(self, "beta", 0.0, low_open=True)
        _range(self)
        _integer(self, "warmup", 0)


@dataclass
class VAFSettings:
    """VAF/ClearSight: logits of image keys x enhance, of pre-image (system) keys x suppress, in middle layers."""

    METHOD = "vaf"
    enhance: float = 1.15
    suppress: float = 0.95
    start_layer: int = 9
    end_layer: int = 15

    def __post_init__(self) -> None:
        _number(self, "enhance", 0.0, low_open=True)
        _number(self, "suppress", 0.0, low_open=True)
        _range(self)


@dataclass
class DeCoSettings:
    """DeCo: ``l_L + alpha p* l_{l*}`` on the final layer's top-k/top-p candidates, l* the most confident early
    layer."""

    METHOD = "deco"
    alpha: float = 0.6
    top_k: int = 20
    top_p: float = 0.9
    start_layer: int = 20
    end_layer: int = 29

    def __post_init__(self) -> None:
        _number(self, "alpha", 0.0)
        _integer(self, "top_k", 1)
        _number(self, "top_p", 0.0, 1.0, low_open=True)
        _range(self)


@dataclass
class M3IDSettings:
    """M3ID: ``lc + (1 - g_t) / g_t (lc - lu)``, ``g_t = exp(-lam t)``, lu without the image."""

    METHOD = "m3id"
    lam: float = 0.02
    beta: float = 0.1

    def __post_init__(self) -> None:
        _number(self, "lam", 0.0)
        _number(self, "beta", 0.0, 1.0, low_open=True)


@dataclass
class GroundedSettings:
    """Grounding-guided decoding (ours): object-word logits + ``weight * logsigmoid(z)``; below ``threshold`` the
    object is not named. Needs ``grounding.word_score`` (``models/decoding/grounded.py``)."""

    METHOD = "grounded"
    weight: float = 1.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        _number(self, "weight", 0.0)
        _number(self, "threshold", 0.0, 1.0)


def settings_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]
