"""Peer decoding methods on any backbone of the registry, batched, with the KV cache, composable with grounding.

One registry, ``METHODS: name -> Method(settings class, function)``. Every function has the signature

    fn(model, inputs, settings, *, max_new_tokens, pad_token_id, eos_token_id, image_mask=None) -> LongTensor

``model`` is a Hugging Face VLM from ``models.backbones.BACKBONES`` (plain, grounded with ``add_grounding``, or
wrapped by peft); ``inputs`` is what its processor makes (left-padded ``input_ids``, ``attention_mask``,
``pixel_values``, ...); the result is (B, new tokens), ``pad_token_id`` after a row's EOS. ``grounded`` (ours) needs
a grounded model with ``grounding.word_score`` and an object-word table (``models.word_grounding``). Image positions come
from the image placeholder tokens of each row (or ``image_mask``, (B, L) bool). ``DecodingSettings`` holds the
chosen method and one typed block per method, for a LightningCLI ``generation`` section:

    generation:
      method: vcd
      vcd: {alpha: 1.0, beta: 0.1}

Adding a method: a settings dataclass (``settings.py``), a function, an entry in ``METHODS`` and a field of the
same name in ``DecodingSettings`` (methods whose settings have no fields, like greedy, need no field).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable, NamedTuple

from torch import Tensor

from models.decoding.edited import aai, eah, pai, vaf
from models.decoding.grounded import grounded
from models.decoding.logits import beam, deco, dola, greedy, m3id, vcd
from models.decoding.opera import opera
from models.decoding.settings import (
    AAISettings,
    BeamSettings,
    DeCoSettings,
    DoLaSettings,
    EAHSettings,
    GreedySettings,
    GroundedSettings,
    M3IDSettings,
    OPERASettings,
    PAISettings,
    VAFSettings,
    VCDSettings,
)


class Method(NamedTuple):
    settings: type
    fn: Callable[..., Tensor]
    word_score: bool = False  # needs a grounded model with candidate-word scores (``grounding.word_score``)


METHODS: dict[str, Method] = {
    "greedy": Method(GreedySettings, greedy),
    "beam": Method(BeamSettings, beam),
    "vcd": Method(VCDSettings, vcd),
    "pai": Method(PAISettings, pai),
    "opera": Method(OPERASettings, opera),
    "dola": Method(DoLaSettings, dola),
    "eah": Method(EAHSettings, eah),
    "aai": Method(AAISettings, aai),
    "deco": Method(DeCoSettings, deco),
    "vaf": Method(VAFSettings, vaf),
    "m3id": Method(M3IDSettings, m3id),
    "grounded": Method(GroundedSettings, grounded, word_score=True),
}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"generation.method {name!r} is not a decoding method; known methods: {', '.join(METHODS)}")
    return name


@dataclass
class DecodingSettings:
    """The decoding method and the settings of every method (only the chosen method's block is used)."""

    method: str = "greedy"
    beam: BeamSettings = field(default_factory=BeamSettings)
    vcd: VCDSettings = field(default_factory=VCDSettings)
    pai: PAISettings = field(default_factory=PAISettings)
    opera: OPERASettings = field(default_factory=OPERASettings)
    dola: DoLaSettings = field(default_factory=DoLaSettings)
    eah: EAHSettings = field(default_factory=EAHSettings)
    aai: AAISettings = field(default_factory=AAISettings)
    deco: DeCoSettings = field(default_factory=DeCoSettings)
    vaf: VAFSettings = field(default_factory=VAFSettings)
    m3id: M3IDSettings = field(default_factory=M3IDSettings)
    grounded: GroundedSettings = field(default_factory=GroundedSettings)

    def __post_init__(self) -> None:
        check_method(self.method)
        for name, (cls, *_) in METHODS.items():
            block = getattr(self, name, None)
            if fields(cls) and not isinstance(block, cls):
                raise ValueError(f"generation.{name} must be a {cls.__name__}, got {type(block).__name__}")

    @property
    def selected(self):
        """The settings block of the chosen method (methods without settings, like greedy, get a fresh one)."""
        check_method(self.method)
        block = getattr(self, self.method, None)
        return METHODS[self.method].settings() if block is None else block

    def describe(self) -> dict:
        """``{"method": name, <name>: {settings}}`` for reports."""
        return {"method": self.method, self.method: asdict(self.selected)}


def decode(model, inputs: dict, settings: DecodingSettings, *, max_new_tokens: int, pad_token_id: int,
           eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """Decode ``inputs`` with ``settings.method``: (B, new tokens)."""
    check_method(settings.method)
    return METHODS[settings.method].fn(model, inputs, settings.selected, max_new_tokens=max_new_tokens,
                                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, image_mask=image_mask)


__all__ = ["METHODS", "DecodingSettings", "Method", "check_method", "decode"]
