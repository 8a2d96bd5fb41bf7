"""The grounded attention function: a gate on the image-key logits of text queries.

For a grounded layer, text query ``t`` and the image keys ``P`` visible to it (DESIGN.md section 3)::

    G[t] = score(t, P)                       similarity | attention_weighted | learnable
    g[t] = sigmoid(scale * G[t] + bias)      learnable per layer
    A'   = softmax(logits + log g[t] * 1[key in P])

which equals multiplying the post-softmax image columns of row ``t`` by ``g[t]`` and renormalising, but runs
inside ``scaled_dot_product_attention`` as an additive bias. Image queries and text keys are untouched. The
function is registered in transformers' ``AttentionInterface`` (with ``sdpa_mask`` as its mask function) and
passes straight through to sdpa on attention modules that carry no gate.

Per-call data (image positions, an optional score recorder) arrives as the ``grounding`` forward keyword
argument (safe under gradient checkpointing) or, inside ``generate()``, from a context variable.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "grounded_sdpa"
GATE_ATTR = "grounding_gate"  # name of the gate module on an attention module (peft modules_to_save)
META_ATTR = "_grounding_meta"
SCORES = ("similarity", "attention_weighted", "learnable")
FEATURES = ("value", "qk", "hidden")


@dataclass
class GroundingConfig:
    """Where and how grounding acts.

    Args:
        enabled: if False the gates exist (and save/load) but attention is exactly the untouched model's.
        layers: indices into the language model's decoder layers; negative ones count from the end.
        score: ``similarity`` (max cosine to visible image keys), ``attention_weighted`` (attention-weighted
            cosine) or ``learnable`` (an MLP on the token feature and its attended image feature).
        feature: the vectors compared: ``value`` (value vectors, as in the KV cache), ``qk`` (post-RoPE query
            of the text token vs keys of image tokens) or ``hidden`` (the attention module's input states).
        init_scale: initial ``scale`` of ``g = sigmoid(scale * G + bias)``.
        init_bias: initial ``bias``.
        learnable_gate: train ``scale`` and ``bias`` (else they stay fixed buffers).
        mlp_hidden: hidden width of the ``learnable`` score's MLP.
    """

    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    score: Literal["similarity", "attention_weighted", "learnable"] = "similarity"
    feature: Literal["value", "qk", "hidden"] = "value"
    init_scale: float = 2.0
    init_bias: float = 3.0
    learnable_gate: bool = True
    mlp_hidden: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"GroundingConfig.enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError(f"GroundingConfig.layers must be a non-empty list of ints, got {self.layers!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"GroundingConfig.layers must hold ints, got {self.layers!r}")
        self.layers = list(self.layers)
        if self.score not in SCORES:
            raise ValueError(f"GroundingConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"GroundingConfig.feature must be one of {FEATURES}, got {self.feature!r}")
        for name in ("init_scale", "init_bias"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GroundingConfig.{name} must be a finite number, got {value!r}")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"GroundingConfig.mlp_hidden must be a positive int, got {self.mlp_hidden!r}")


class GroundingGate(nn.Module):
    """Per-layer gate parameters: ``log g = logsigmoid(scale * G + bias)``; the MLP of the learnable score."""

    def __init__(self, config: GroundingConfig, feature_dim: int) -> None:
        super().__init__()
        scale = torch.tensor(float(config.init_scale))
        bias = torch.tensor(float(config.init_bias))
        if config.learnable_gate:
            self.scale = nn.Parameter(scale)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)
        self.mlp: nn.Module | None = None
        if config.score == "learnable":
            self.mlp = nn.Sequential(
                nn.Linear(2 * feature_dim, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, 1)
            )

    def learned_score(self, token: Tensor, attended: Tensor) -> Tensor:
        """(B, T, D), (B, T, D) -> (B, T) in (-1, 1)."""
        assert self.mlp is not None
        return torch.tanh(self.mlp(torch.cat([token, attended], dim=-1)).squeeze(-1))

    def forward(self, score: Tensor) -> Tensor:
        """(B, T) grounding score -> (B, T) log gate."""
        return F.logsigmoid(self.scale.to(score.dtype) * score + self.bias.to(score.dtype))


@dataclass
class GroundingMeta:
    """What an attention module needs to know about its own grounding."""

    layer: int  # decoder layer index in the language model (non-negative)
    score: str
    feature: str
    cross: bool  # cross-attention (keys are encoder positions, every query is text)
    enabled: bool = True
    hidden: Tensor | None = None  # stashed module input (B, T, D) for the `hidden` feature
    key_hidden: Tensor | None = None  # cross-attention: encoder states (B, S, D)
    prefill_hidden: Tensor | None = None  # self-attention: (B, L, D) of the prefill, for cached decoding


class GroundingRecorder:
    """Collects grounding scores: per grounded layer, one (batch, query length) tensor per attention call.

    Scores are NaN where undefined (image tokens, text before any image). Use it as a forward keyword
    argument (``model(**inputs, grounding_scores=rec)``, safe under gradient checkpointing) or as a context
    manager around ``generate()`` (``with rec: model.generate(...)``).
    """

    def __init__(self) -> None:
        self.calls: dict[int, list[Tensor]] = {}
        self._token: contextvars.Token | None = None

    def add(self, layer: int, scores: Tensor) -> None:
        self.calls.setdefault(layer, []).append(scores)

    @property
    def layers(self) -> list[int]:
        return sorted(self.calls)

    def __getitem__(self, layer: int) -> list[Tensor]:
        return self.calls[layer]

    def clear(self) -> None:
        self.calls.clear()

    def forward_scores(self, layer: int) -> Tensor:
        """The (B, T) scores of a single forward pass."""
        calls = self.calls[layer]
        if len(calls) != 1:
            raise RuntimeError(f"layer {layer} was called {len(calls)} times; use sequence_scores() for generate()")
        return calls[0]

    def sequence_scores(self, layer: int, beam_indices: Tensor | None = None) -> Tensor:
        """Scores of every position fed to the model during ``generate()``: (N, prompt + new tokens - 1).

        Position ``j`` is the score of token ``j`` of the returned sequence as a query. With beam search pass
        ``generate(..., return_dict_in_generate=True).beam_indices`` to follow each returned beam's ancestry.
        """
        steps = self.calls[layer]
        if beam_indices is None:
            return torch.cat(steps, dim=1)
        prefill, decode = steps[0], steps[1:]
        n, width = beam_indices.shape
        out = torch.full((n, prefill.shape[1] + len(decode)), float("nan"), dtype=prefill.dtype, device=prefill.device)
        first = beam_indices[:, 0].clamp_min(0)
        out[:, : prefill.shape[1]] = prefill[first]
        for s, step in enumerate(decode, start=1):
            if s >= width:
                break
            slot = beam_indices[:, s]
            alive = slot >= 0
            out[alive, prefill.shape[1] + s - 1] = step[slot[alive], 0]
        return out

    def __enter__(self) -> "GroundingRecorder":
        self._token = _ACTIVE_RECORDER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_RECORDER.reset(self._token)
        self._token = None


@dataclass
class GroundingState:
    """Per-call inputs of the grounded layers.

    ``image_mask`` is (B0, L) bool over the sequence the language model attends to (for encoder-decoder models:
    the encoder sequence). ``B`` may be a multiple of ``B0`` (beams / returned sequences, expanded with
    repeat_interleave as ``generate()`` does) and keys may extend past ``L`` (generated tokens are text).
    """

    image_mask: Tensor | None
    recorder: GroundingRecorder | None = None
    recording: bool = True


_ACTIVE_STATE: contextvars.ContextVar[GroundingState | None] = contextvars.ContextVar("grounding_state", default=None)
_ACTIVE_RECORDER: contextvars.ContextVar[GroundingRecorder | None] = contextvars.ContextVar(
    "grounding_recorder", default=None
)


def _key_image_mask(state: GroundingState, batch: int, key_len: int, device: torch.device) -> Tensor:
    """(B0, L) -> (B, S): expand to the call's batch, pad generated positions with False."""
    mask = state.image_mask
    if mask is None:
        raise RuntimeError(
            "a grounded attention layer ran without image positions: call the model through its forward/generate "
            "with input_ids (image placeholder tokens locate the image), or pass grounding=GroundingState(...)"
        )
    mask = mask.to(device)
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise RuntimeError(f"grounding image mask has batch {mask.shape[0]}, attention has batch {batch}")
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
    if mask.shape[1] > key_len:
        raise RuntimeError(
            f"grounding image mask covers {mask.shape[1]} positions but attention sees only {key_len} keys "
            "(sliding-window or truncated caches are not supported by grounded layers)"
        )
    if mask.shape[1] < key_len:
        mask = F.pad(mask, (0, key_len - mask.shape[1]), value=False)
    return mask


def _flat(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _features(meta: GroundingMeta, module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Token features (B, T, D) of the queries and (B, S, D) of every key position."""
    t, s = query.shape[2], key.shape[2]
    if meta.feature == "qk":
        n_rep = query.shape[1] // key.shape[1]
        return _flat(query), _flat(repeat_kv(key, n_rep))
    if meta.feature == "value":
        keys = _flat(value)
        if meta.cross:
            if meta.hidden is None:
                raise RuntimeError("cross-attention value feature needs the module input; hook missing")
            b, tq, _ = meta.hidden.shape
            proj = getattr(module, "v")  # the query token's own value vector, W_v h_t
            return proj(meta.hidden).view(b, tq, -1), keys
        return keys[:, s - t :], keys
    # hidden
    if meta.hidden is None:
        raise RuntimeError("hidden feature needs the module input; hook missing")
    if meta.cross:
        return meta.hidden, meta.key_hidden
    if t == s:
        return meta.hidden, meta.hidden
    if meta.prefill_hidden is None or meta.prefill_hidden.shape[0] != query.shape[0]:
        raise RuntimeError("cached decoding with the hidden feature needs the prefill of the same batch")
    pad = s - meta.prefill_hidden.shape[1] - t
    keys = F.pad(meta.prefill_hidden, (0, 0, 0, max(pad, 0)))
    return meta.hidden, torch.cat([keys[:, : s - t], meta.hidden], dim=1)


def _query_masks(meta: GroundingMeta, key_img: Tensor, attention_mask: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
    """text_query (B, T) bool and visible image keys (B, T, S) bool."""
    b, s = key_img.shape
    if meta.cross:
        text_q = torch.ones(b, t, dtype=torch.bool, device=key_img.device)
        visible = key_img[:, None, :].expand(b, t, s)
    else:
        q_pos = torch.arange(s - t, s, device=key_img.device)
        text_q = ~key_img[:, s - t :]
        causal = torch.arange(s, device=key_img.device)[None, :] <= q_pos[:, None]  # (T, S)
        visible = key_img[:, None, :] & causal[None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        visible = visible & attention_mask[:, 0, -t:, :s].expand(b, t, s) if attention_mask.shape[1] == 1 else visible
    return text_q, visible


def similarity_score(f_q: Tensor, f_k: Tensor, visible: Tensor) -> Tensor:
    """max over visible keys of cos(f_q, f_k): (B, T, D), (B, S, D), (B, T, S) -> (B, T); 0 if none visible."""
    cos = F.normalize(f_q, dim=-1) @ F.normalize(f_k, dim=-1).transpose(1, 2)  # (B, T, S)
    cos = cos.masked_fill(~visible, torch.finfo(cos.dtype).min)
    best = cos.amax(dim=-1)
    return torch.where(visible.any(-1), best, torch.zeros_like(best))


def _attended(
    module: nn.Module, query: Tensor, key: Tensor, extra_value: Tensor, attention_mask: Tensor | None, kwargs: dict
) -> Tensor:
    """mean over heads of sdpa(q, k, extra_value): (B, S, E) values shared by heads -> (B, T, E)."""
    b, s, e = extra_value.shape
    v = extra_value[:, None].expand(b, key.shape[1], s, e)  # (B, Hkv, S, E)
    out, _ = sdpa_attention_forward(module, query, key, v, attention_mask, **kwargs)  # (B, T, H, E)
    return out.mean(dim=2)


def grounded_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: sdpa with the grounding bias on text-query x image-key logits.

    query (B, H, T, d), key/value (B, Hkv, S, d), attention_mask None | (B, 1, T, S) bool/float.
    """
    state = kwargs.pop("grounding", None) or _ACTIVE_STATE.get()
    meta: GroundingMeta | None = getattr(module, META_ATTR, None)
    if meta is None or not meta.enabled:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if state is None:
        raise RuntimeError(
            "grounded attention layer called without grounding inputs: the model must be called through the "
            "forward/generate that add_grounding() instrumented"
        )
    b, t, s = query.shape[0], query.shape[2], key.shape[2]
    key_img = _key_image_mask(state, b, s, query.device)  # (B, S)
    text_q, visible = _query_masks(meta, key_img, attention_mask, t)
    valid = text_q & visible.any(-1)  # (B, T)

    f_q, f_k = _features(meta, module, query, key, value)
    f_q, f_k = f_q.float(), f_k.float()
    attn_kwargs = {k: v for k, v in kwargs.items() if k in ("scaling", "position_bias", "is_causal")}
    if meta.score == "similarity":
        score = similarity_score(f_q, f_k, visible)
    elif meta.score == "attention_weighted":
        v_img = F.normalize(f_k, dim=-1) * key_img[..., None]  # (B, S, D) normalised image features, 0 elsewhere
        attended = _attended(module, query, key, v_img.to(query.dtype), attention_mask, attn_kwargs).float()
        score = (F.normalize(f_q, dim=-1) * attended).sum(-1)
    else:
        img = key_img[..., None].to(f_k.dtype)
        v_img = torch.cat([f_k * img, img], dim=-1)  # (B, S, D+1): features and image indicator
        out = _attended(module, query, key, v_img.to(query.dtype), attention_mask, attn_kwargs).float()
        mass = out[..., -1:].clamp_min(1e-6)
        gate = getattr(module, GATE_ATTR)
        score = gate.learned_score(F.normalize(f_q, dim=-1), F.normalize(out[..., :-1] / mass, dim=-1))
    score = torch.where(valid, score, torch.zeros_like(score))
    log_g = getattr(module, GATE_ATTR)(score)  # (B, T)
    log_g = torch.where(valid, log_g, torch.zeros_like(log_g))

    if state.recorder is not None:
        # same ops in a checkpoint recompute (which must not record again) as in the forward
        recorded = torch.where(valid, score, torch.full_like(score, float("nan")))
        if state.recording:
            state.recorder.add(meta.layer, recorded)

    bias = (log_g[:, None, :, None] * key_img[:, None, None, :]).to(query.dtype)  # (B, 1, T, S)
    position_bias = kwargs.pop("position_bias", None)
    position_bias = bias if position_bias is None else position_bias + bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, grounded_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
