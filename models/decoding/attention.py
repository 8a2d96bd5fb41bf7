"""Attention-editing methods (PAI, VAF, EAH, AAI) through transformers' attention registry.

While such a method decodes, every attention call of the language model goes through ``attention_core``
(``models/grounding.py``): grounded models already route there; a plain model's text configs are switched to the
registered ``decoding_sdpa`` function (sdpa + the active edit) for the duration and restored afterwards. The edit
sees the same arguments as ``sdpa_attention_forward`` (post-RoPE q/k, the KV cache, the mask, and the grounding
gate or T5's relative bias in ``position_bias``), acts only on the attention modules it targets, and uses sdpa
wherever its formula allows; rows it must compute explicitly (PAI's last query row, AAI's decoding query, EAH's
prefill map) are computed from the same logits sdpa would use.
"""

from __future__ import annotations

import abc
import contextlib

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.backbones import _layers_of, backbone_spec
from models.grounding import ATTN_IMPLEMENTATION, attention_core
from models.grounding_state import _ACTIVE_STATE

EDIT_ATTN = "decoding_sdpa"
AttentionInterface.register(EDIT_ATTN, attention_core)
AttentionMaskInterface.register(EDIT_ATTN, sdpa_mask)
MIN = torch.finfo(torch.float32).min


@contextlib.contextmanager
def routed(model: nn.Module):
    """Route the language model's attention through ``attention_core`` inside the block (restored after)."""
    language_model = backbone_spec(model).language_model(model)
    configs = {id(m.config): m.config for m in language_model.modules()
               if isinstance(getattr(m, "config", None), PretrainedConfig)}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        if config._attn_implementation not in (ATTN_IMPLEMENTATION, EDIT_ATTN):
            config._attn_implementation = EDIT_ATTN
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


def decoder_targets(model: nn.Module, layers) -> dict[int, tuple[int, bool]]:
    """id(attention module) -> (layer, is cross-attention) for the decoder layers ``layers`` (Flan-T5: cross)."""
    attns, cross = _layers_of(backbone_spec(model).language_model(model))
    return {id(attns[i]): (i, cross) for i in layers}


def encoder_self_attentions(model: nn.Module) -> list[nn.Module]:
    """Flan-T5: the encoder's self-attention modules (where the prompt, image included, is read)."""
    encoder = backbone_spec(model).language_model(model).get_encoder()
    return [block.layer[0].SelfAttention for block in encoder.block]


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Query rows of a (B, H, T, S) mask or bias; a broadcast query dimension (size 1) stays as it is."""
    return x if x.shape[2] == 1 else x[:, :, rows]


def explicit_logits(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, kwargs: dict,
                    rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
    """(B, H, R, S) float32 logits sdpa would softmax for query ``rows`` (masked keys = float32 min), and
    (B|1, 1|H, R, S) bool: which keys each row may see."""
    t, s = query.shape[2], key.shape[2]
    q = query[:, :, rows].float()
    k = repeat_kv(key, query.shape[1] // key.shape[1]).float()
    scaling = kwargs.get("scaling") or q.shape[-1] ** -0.5
    logits = q @ k.transpose(-1, -2) * scaling
    bias = kwargs.get("position_bias")
    if bias is not None:
        logits = logits + _rows(bias, rows).float()
    q_pos = torch.arange(s - t, s, device=query.device)[rows]
    if attention_mask is None:
        causal = t > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True))
        allowed = torch.arange(s, device=query.device)[None, :] <= q_pos[:, None] if causal else torch.ones(
            q_pos.numel(), s, dtype=torch.bool, device=query.device)
        allowed = allowed[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = _rows(attention_mask, rows)
    else:
        allowed = _rows(attention_mask, rows) > MIN / 2
        logits = logits + _rows(attention_mask, rows).float()
    return logits.masked_fill(~allowed, MIN), allowed


def attend(probs: Tensor, value: Tensor) -> Tensor:
    """(B, H, R, S) probabilities, (B, Hkv, S, d) values -> (B, R, H, d) like sdpa_attention_forward."""
    v = repeat_kv(value, probs.shape[1] // value.shape[1])
    return (probs.to(v.dtype) @ v).transpose(1, 2)


class AttentionEdit(abc.ABC):
    """Called for every attention module while active; ``edit`` runs on the targeted ones, sdpa elsewhere."""

    def __init__(self, targets: dict[int, tuple[int, bool]]) -> None:
        self.targets = targets
        self.stream = None

    def bind(self, stream) -> None:
        self.stream = stream

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        target = self.targets.get(id(module))
        if target is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return self.edit(module, target[1], query, key, value, attention_mask, kwargs)

    @staticmethod
    def image_keys(batch: int, key_len: int, device: torch.device) -> Tensor:
        """(B, S) bool image keys of this call (beams expanded, generated positions False)."""
        return _ACTIVE_STATE.get().key_mask(batch, key_len, device)

    @abc.abstractmethod
    def edit(self, module: nn.Module, cross: bool, query: Tensor, key: Tensor, value: Tensor,
             attention_mask: Tensor | None, kwargs: dict) -> tuple[Tensor, None]:
        """The edited attention output (B, T, H, d) of a targeted module."""


class PAIEdit(AttentionEdit):
    """Last query row: image-key logits ``a + alpha |a|`` before the softmax (``a`` includes the mask and bias)."""

    def __init__(self, targets, alpha: float) -> None:
        super().__init__(targets)
        self.alpha = alpha

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        logits, _ = explicit_logits(module, query, key, attention_mask, kwargs, rows=slice(t - 1, t))  # (B, H, 1, S)
        img = self.image_keys(b, s, query.device)[:, None, None, :] & (logits > MIN / 2)
        row = attend(torch.where(img, logits + self.alpha * logits.abs(), logits).softmax(-1), value)  # (B, 1, H, d)
        if t == 1:
            return row, None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return torch.cat([out[:, :-1], row.to(out.dtype)], dim=1), None


def _first_last(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) bool -> first and last True index per row and whether the row has any."""
    has = mask.any(1)
    first = mask.int().argmax(1)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    return first, last, has


class VAFEdit(AttentionEdit):
    """Logits of image keys x enhance and of the keys before the image x suppress (scaled keys, so sdpa runs).

    Prefill: only query rows after the image are edited (two sdpa calls, rows selected); decoding: every row.
    """

    def __init__(self, targets, enhance: float, suppress: float) -> None:
        super().__init__(targets)
        self.enhance, self.suppress = enhance, suppress

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        img = self.image_keys(b, s, query.device)  # (B, S)
        first, last, has = _first_last(img)
        positions = torch.arange(s, device=query.device)
        before = (positions[None, :] < first[:, None]) & has[:, None]  # system-prompt keys (pads are masked)
        scale = 1 + (self.enhance - 1) * img.float() + (self.suppress - 1) * before.float()
        scaled = key * scale[:, None, :, None].to(key.dtype)
        out, _ = sdpa_attention_forward(module, query, scaled, value, attention_mask, **kwargs)
        if cross or t == 1:
            return out, None
        plain, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        after = (positions[s - t:][None, :] > last[:, None]) & has[:, None]  # (B, T) query rows after the image
        return torch.where(after[:, :, None, None], out, plain), None


class EAHEdit(AttentionEdit):
    """Prefill: the head with the most image keys above ``threshold`` (column mass from other queries / their
    count) lends its attention map to every head of the layer, per row. Decoding steps are untouched."""

    def __init__(self, targets, threshold: float) -> None:
        super().__init__(targets)
        self.threshold = threshold

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        b, h, t, s = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        if t == 1:
            return out, None
        logits, allowed = explicit_logits(module, query, key, attention_mask, kwargs)
        probs = logits.softmax(-1)  # (B, H, T, S)
        other = allowed & (torch.arange(s - t, s, device=query.device)[:, None] != torch.arange(s, device=query.device))
        count = other.sum(2).float()  # (B|1, 1, S) queries that see each key, itself excluded
        score = (probs * other).sum(2) / count.clamp_min(1)  # (B, H, S)
        img = self.image_keys(b, s, query.device)[:, None, :] & (count > 0)
        sinks = ((score > self.threshold) & img).sum(-1)  # (B, H)
        best, winner = sinks.max(-1)
        rows = best > 0
        if not bool(rows.any()):
            return out, None
        lent = probs[torch.arange(b, device=query.device), winner][:, None].expand(-1, h, -1, -1)
        return torch.where(rows[:, None, None, None], attend(lent, value).to(out.dtype), out), None


class AAIEdit(AttentionEdit):
    """Decoding query (after ``warmup`` tokens): image attention ``m a_hat`` -> ``beta m ((1 - alpha) a_hat +
    alpha r)``, renormalised, ``r`` the vision encoder's reference distribution over the row's image tokens."""

    def __init__(self, targets, alpha: float, beta: float, warmup: int, reference: Tensor) -> None:
        super().__init__(targets)
        self.alpha, self.beta, self.warmup = alpha, beta, warmup
        self.reference = reference  # (B0, L) over prompt positions, rows sum to 1 (0 without an image)

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        if t != 1 or self.stream.generated < self.warmup:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        logits, _ = explicit_logits(module, query, key, attention_mask, kwargs)
        probs = logits.softmax(-1)  # (B, H, 1, S)
        img = self.image_keys(b, s, query.device)[:, None, None, :].float()
        ref = self.reference.to(query.device).repeat_interleave(b // self.reference.shape[0], dim=0)
        ref = torch.nn.functional.pad(ref, (0, s - ref.shape[1]))[:, None, None, :]
        mass = (probs * img).sum(-1, keepdim=True)  # (B, H, 1, 1)
        image_part = probs * img / mass.clamp_min(1e-12)
        new = probs * (1 - img) + self.beta * mass * ((1 - self.alpha) * image_part + self.alpha * ref)
        return attend(new / new.sum(-1, keepdim=True), value), None
