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
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.grounding_state import _ACTIVE_STATE, GroundingRecorder, GroundingState  # noqa: F401 (re-exported)

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
        word_score: add the candidate-word score (:mod:`models.word_grounding`): each object word's input
            embedding, projected into this layer's feature space, against the image keys; it scores a word
            before the word is emitted (trained by ``objective.lambda_word``, used by ``generation.method:
            grounded``).
    """

    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    score: Literal["similarity", "attention_weighted", "learnable"] = "similarity"
    feature: Literal["value", "qk", "hidden"] = "value"
    init_scale: float = 2.0
    init_bias: float = 3.0
    learnable_gate: bool = True
    mlp_hidden: int = 64
    word_score: bool = False

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
        if not isinstance(self.word_score, bool):
            raise ValueError(f"GroundingConfig.word_score must be a bool, got {self.word_score!r}")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"GroundingConfig.mlp_hidden must be a positive int, got {self.mlp_hidden!r}")


class GroundingGate(nn.Module):
    """Per-layer gate parameters (``g = sigmoid(scale * G + bias)``) and the MLP of the learnable score."""

    def __init__(self, config: GroundingConfig, feature_dim: int, embed_dim: int | None = None) -> None:
        super().__init__()
        self.feature_dim = feature_dim  # width of the image-key features f_p this layer records
        scale = torch.tensor([float(config.init_scale)])  # (1,): DeepSpeed ZeRO-3 cannot partition 0-d parameters
        bias = torch.tensor([float(config.init_bias)])
        if config.learnable_gate:
            self.scale = nn.Parameter(scale)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)
        self.word_proj: nn.Module | None = None
        if config.word_score:  # candidate-word score: word_scale * max_p cos(word_proj(e_w), f_p) + word_bias
            self.word_proj = nn.Linear(embed_dim or feature_dim, feature_dim, bias=False)
            self.word_scale = nn.Parameter(torch.tensor([5.0]))
            self.word_bias = nn.Parameter(torch.tensor([-2.0]))
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
        """(B, T) grounding score -> (B, T) gate logit ``scale * G + bias`` (``g = sigmoid(logit)``)."""
        return self.scale.to(score.dtype) * score + self.bias.to(score.dtype)


@dataclass
class GroundingMeta:
    """What an attention module needs to know about its own grounding."""

    layer: int  # decoder layer index in the language model (non-negative)
    score: str
    feature: str
    cross: bool  # cross-attention (keys are encoder positions, every query is text)
    enabled: bool = True
    hidden: Tensor | None = None  # module input (B, T, D) stashed by a pre-hook until the attention call
    key_hidden: Tensor | None = None  # cross-attention: encoder states (B, S, D), likewise




def _flat(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _gather(x: Tensor, positions: Tensor) -> Tensor:
    """(B, S, D), (B, P) -> (B, P, D)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _query_features(meta: GroundingMeta, module: nn.Module, query: Tensor, value: Tensor, hidden: Tensor | None) -> Tensor:
    """(B, T, D) features of the queries; ``hidden`` is the module's input (B, T, D) when stashed."""
    t = query.shape[2]
    if meta.feature == "qk":
        return _flat(query)
    if meta.feature == "hidden" or meta.cross:
        if hidden is None:
            raise RuntimeError(f"grounded layer {meta.layer}: the module input was not stashed (hook missing)")
        if meta.feature == "hidden":
            return hidden
        b, tq, _ = hidden.shape
        return module.v(hidden).view(b, tq, -1)  # cross: the query token's own value vector W_v h_t
    return _flat(value[:, :, -t:])


def _image_features(
    meta: GroundingMeta, query: Tensor, key: Tensor, value: Tensor, positions: Tensor,
    hidden: Tensor | None, key_hidden: Tensor | None,
) -> Tensor:
    """(B, P, D) normalised features of the image keys."""
    if meta.feature == "qk":
        n_rep = query.shape[1] // key.shape[1]
        keys = _flat(repeat_kv(key, n_rep))
    elif meta.feature == "value":
        keys = _flat(value)
    elif meta.cross:
        keys = key_hidden
    else:
        if hidden is None or hidden.shape[1] != key.shape[2]:
            raise RuntimeError(f"grounded layer {meta.layer}: hidden feature needs the prefill's module input")
        keys = hidden
    return F.normalize(_gather(keys, positions).float(), dim=-1)


def similarity_score(f_q: Tensor, f_img: Tensor, visible: Tensor) -> Tensor:
    """max over visible image keys of cos: (B, T, D) raw, (B, P, D) normalised, (B, T, P) -> (B, T).

    Rows with no visible image key get -2 (outside [-1, 1]); callers mask them.
    """
    cos = F.normalize(f_q, dim=-1) @ f_img.transpose(1, 2)  # (B, T, P)
    return cos.masked_fill(~visible, -2.0).amax(dim=-1)


def _attended(
    module: nn.Module, query: Tensor, key: Tensor, values: Tensor, attention_mask: Tensor | None, kwargs: dict
) -> Tensor:
    """mean over heads of sdpa(q, k, values): (B, S, E) values shared by all heads -> (B, T, E)."""
    b, s, e = values.shape
    v = values[:, None].expand(b, key.shape[1], s, e)  # (B, Hkv, S, E)
    out, _ = sdpa_attention_forward(module, query, key, v, attention_mask, **kwargs)  # (B, T, H, E)
    return out.mean(dim=2)


def _scatter(f_img: Tensor, positions: Tensor, valid: Tensor, key_len: int) -> Tensor:
    """(B, P, D) image features -> (B, S, D) with zeros at every non-image key."""
    b, _, d = f_img.shape
    out = f_img.new_zeros(b, key_len, d)
    return out.scatter(1, positions[..., None].expand(-1, -1, d), f_img * valid[..., None])


# A decoding-time attention edit (models/decoding: PAI, VAF, EAH, AAI, OPERA's read-out) replaces the final sdpa
# call here, so it composes with grounding: it receives the grounding bias inside ``position_bias``.
ATTENTION_EDIT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("attention_edit", default=None)


def attention_core(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs):
    """sdpa, or the active attention edit (same signature and return as ``sdpa_attention_forward``)."""
    edit = ATTENTION_EDIT.get()
    if edit is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return edit(module, query, key, value, attention_mask, **kwargs)


def _cached_image_features(
    state: GroundingState, meta: GroundingMeta, query: Tensor, key: Tensor, value: Tensor, positions: Tensor,
    hidden: Tensor | None, key_hidden: Tensor | None,
) -> tuple[Tensor, bool]:
    """(B, P, D) image-key features and whether they were computed in this call. They are fixed once computed,
    so decoding steps reuse the prefill's (inference only)."""
    b, t, s = query.shape[0], query.shape[2], key.shape[2]
    inference = not torch.is_grad_enabled()
    cached = state._features.get(meta.layer) if inference else None
    if cached is not None and cached.shape[0] == b and (meta.cross or t < s):
        return cached, False
    f_img = _image_features(meta, query, key, value, positions, hidden, key_hidden)
    if inference:
        state._features[meta.layer] = f_img
    return f_img, True


def _visibility(cross: bool, key_img: Tensor, positions: Tensor, pos_valid: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Which image keys each query sees, (B, T, P) or (B, 1, P), and which queries are grounded, (B, T).

    The queries are the last ``t`` of the ``S`` keys (self-attention) or all text (cross-attention)."""
    b, s = key_img.shape
    if cross:
        visible = pos_valid[:, None, :].expand(b, t, -1)
        return visible, visible.any(-1)  # every query is text
    if t == 1:  # one query (decoding): it is the last position, so every image key is visible to it
        return pos_valid[:, None, :], ~key_img[:, -1:] & pos_valid.any(-1, keepdim=True)
    q_pos = torch.arange(s - t, s, device=key_img.device)
    text_q = ~key_img[:, s - t :]
    visible = pos_valid[:, None, :] & (positions[:, None, :] <= q_pos[None, :, None])  # (B, T, P)
    return visible, text_q & visible.any(-1)


def _score(
    kind: str, module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, attn_kwargs: dict,
    f_q: Tensor, f_img: Tensor, positions: Tensor, pos_valid: Tensor, visible: Tensor,
) -> Tensor:
    """(B, T) grounding score ``G`` of each query (``GroundingConfig.score``)."""
    s = key.shape[2]
    if kind == "similarity":
        return similarity_score(f_q, f_img, visible)
    if kind == "attention_weighted":
        v_img = _scatter(f_img, positions, pos_valid, s).to(query.dtype)  # (B, S, D)
        attended = _attended(module, query, key, v_img, attention_mask, attn_kwargs).float()
        return (F.normalize(f_q, dim=-1) * attended).sum(-1)
    indicator = pos_valid[..., None].to(f_img.dtype)
    v_img = _scatter(torch.cat([f_img, indicator], dim=-1), positions, pos_valid, s).to(query.dtype)
    out = _attended(module, query, key, v_img, attention_mask, attn_kwargs).float()  # (B, T, D+1)
    mass = out[..., -1:].clamp_min(1e-6)  # attention on image keys
    return getattr(module, GATE_ATTR).learned_score(F.normalize(f_q, dim=-1), F.normalize(out[..., :-1] / mass, dim=-1))


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
    hidden = key_hidden = None
    if meta is not None:  # take the inputs the pre-hook stashed, so no activation outlives this call
        hidden, key_hidden, meta.hidden, meta.key_hidden = meta.hidden, meta.key_hidden, None, None
    if meta is None or not meta.enabled:
        return attention_core(module, query, key, value, attention_mask, **kwargs)
    if state is None:
        raise RuntimeError(
            "grounded attention layer called without grounding inputs: the model must be called through the "
            "forward/generate that add_grounding() instrumented"
        )
    b, t, s = query.shape[0], query.shape[2], key.shape[2]
    key_img = state.key_mask(b, s, query.device)  # (B, S)
    positions, pos_valid = state.image_index(b, query.device)  # (B, P)
    if positions.shape[1] == 0:  # no image in the batch (text-only): nothing to ground
        if state.recorder is not None and state.recording:
            undefined = query.new_full((b, t), float("nan"), dtype=torch.float32)
            state.recorder.add(meta.layer, undefined, undefined)
        return attention_core(module, query, key, value, attention_mask, **kwargs)

    f_img, fresh = _cached_image_features(state, meta, query, key, value, positions, hidden, key_hidden)  # (B, P, D)
    f_q = _query_features(meta, module, query, value, hidden).float()  # (B, T, D)

    visible, valid = _visibility(meta.cross, key_img, positions, pos_valid, t)  # (B, T|1, P), (B, T)
    attn_kwargs = {k: v for k, v in kwargs.items() if k in ("scaling", "position_bias", "is_causal")}
    gate = getattr(module, GATE_ATTR)
    score = _score(meta.score, module, query, key, attention_mask, attn_kwargs, f_q, f_img, positions, pos_valid,
                   visible)  # (B, T)
    if state.recorder is not None and state.recording and fresh:  # the prefill's (or training pass's) image keys
        state.recorder.images.setdefault(meta.layer, []).append((f_img, pos_valid))
    logit = gate(score)  # (B, T)
    log_g = F.logsigmoid(logit).masked_fill(~valid, 0.0)  # 0 = no change for image/imageless queries

    if state.recorder is not None:
        # same ops in a checkpoint recompute (which must not record again) as in the forward
        undefined = ~valid
        recorded = (score.masked_fill(undefined, float("nan")), logit.masked_fill(undefined, float("nan")))
        if state.recording:
            state.recorder.add(meta.layer, *recorded)

    bias = (log_g[:, None, :, None] * key_img[:, None, None, :]).to(query.dtype)  # (B, 1, T, S)
    position_bias = kwargs.pop("position_bias", None)
    position_bias = bias if position_bias is None else position_bias + bias
    return attention_core(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, grounded_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
