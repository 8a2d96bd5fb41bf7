"""A control for the candidate-word objective: object presence read from the pooled image tokens, no grounding.

``objective.lambda_presence`` trains a linear head on the mean image token at the language model's input (the
projector's output for LLaVA, the Q-Former's projected queries for BLIP-2) with the same labels and loss as
``lambda_word`` (BCE against the image's object categories, from the instance annotations). It supervises the image
tokens with the same information as the candidate-word score while leaving out everything that makes that score
*grounding*: no per-word query, no gate, and it works with ``grounding.enabled: false``. ``presence_pool: mean``
also leaves out the patch-level max (row "presence", ``configs/experiments/presence.yaml``); ``max`` keeps it: each
image token gets the head's logits and each category its max over the image tokens (row "presence_max",
``configs/experiments/presence_max.yaml``). ``presence_site: grounded`` reads the image-key features of the deepest
grounded layer instead, the ones the candidate-word score compares with (row "presence_grounded_max"). A
training-only head: decoding never reads it. Rows of docs/results.md.

The functions take the Hugging Face model itself (``GroundedVLM._base()``: under peft, the model it wraps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from models.backbones import backbone_spec, gate_modules, image_token_mask
from models.grounding_state import GroundingRecorder

__all__ = ["PresenceHead", "capture_lm_inputs", "grounded_feature_dim", "grounded_presence_logits", "image_token_max",
           "image_token_mean", "lm_input_image_mask", "presence_dim", "presence_logits"]


class PresenceHead(nn.Module):
    """(B, T, D) LM input embeddings + (B, T) image-token mask -> (B, C) presence logits of C categories, from the
    mean image token (``pool="mean"``) or as the max over image tokens of each token's logits (``pool="max"``)."""

    def __init__(self, dim: int, categories: int, pool: str = "mean") -> None:
        super().__init__()
        if categories < 1:
            raise ValueError("the presence head needs the dataset's object categories (none given)")
        if pool not in ("mean", "max"):
            raise ValueError(f"presence pool must be mean or max, got {pool!r}")
        self.proj = nn.Linear(dim, categories)
        self.pool = pool

    def forward(self, embeds: Tensor, image_mask: Tensor) -> Tensor:
        if self.pool == "mean":
            return self.proj(image_token_mean(embeds, image_mask).to(self.proj.weight.dtype))
        logits = self.proj(embeds.to(self.proj.weight.dtype))  # (B, T, C)
        return image_token_max(logits, image_mask)


def image_token_max(values: Tensor, image_mask: Tensor) -> Tensor:
    """(B, C) max of ``values`` (B, T, C) over the positions of ``image_mask`` (B, T); rows without any: zeros."""
    masked = values.masked_fill(~image_mask.unsqueeze(-1), float("-inf")).amax(1)  # (B, C)
    return torch.where(image_mask.any(1, keepdim=True), masked, torch.zeros_like(masked))


def image_token_mean(embeds: Tensor, image_mask: Tensor) -> Tensor:
    """(B, D) mean of ``embeds`` (B, T, D) over the positions of ``image_mask`` (B, T); rows without any: zeros."""
    mask = image_mask.to(embeds.dtype).unsqueeze(-1)  # (B, T, 1)
    return (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@contextlib.contextmanager
def capture_lm_inputs(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the block, ``captured["embeds"]`` is the ``inputs_embeds`` (B, T, D) the language model received in
    its first forward (image features merged in)."""
    language_model = backbone_spec(model).language_model(model)
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "embeds" in captured:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError(f"{type(language_model).__name__} was called without inputs_embeds: the presence head "
                               "reads the image tokens there")
        captured["embeds"] = embeds

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def lm_input_image_mask(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, T) image positions of ``input_ids`` as the language model sees them."""
    return image_token_mask(model, input_ids, has_pixels=True)


def presence_dim(model: nn.Module) -> int:
    """Width of the language model's input embeddings."""
    return backbone_spec(model).language_model(model).get_input_embeddings().embedding_dim


def grounded_feature_dim(model: nn.Module) -> int:
    """Width of the image-key features of the deepest grounded layer (``presence_site: grounded``)."""
    gates = gate_modules(model)
    if not gates:
        raise ValueError("objective.presence_site grounded needs a grounded model (grounding.enabled: true)")
    return gates[max(gates, key=lambda name: int(name.removeprefix("layer")))].feature_dim


def grounded_presence_logits(head: PresenceHead, recorder: GroundingRecorder) -> Tensor:
    """(B, C) logits of the head on the image-key features (B, P, D) the deepest grounded layer recorded."""
    if not recorder.images:
        raise RuntimeError("the grounded layers recorded no image keys: run the model with the recorder first")
    f_img, valid = recorder.images[max(recorder.images)][0]  # (B, P, D) normalised, (B, P)
    return head(f_img, valid)


def presence_logits(head: PresenceHead, captured: dict[str, Tensor], model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, C) logits of the head from what :func:`capture_lm_inputs` caught in the forward of ``input_ids``."""
    if "embeds" not in captured:
        raise RuntimeError("the language model ran no forward inside capture_lm_inputs")
    embeds = captured["embeds"]
    return head(embeds, lm_input_image_mask(model, input_ids).to(embeds.device))
