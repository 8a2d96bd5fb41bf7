"""PAI, VAF, EAH and AAI as decoding functions (their attention edits live in ``models/decoding/attention.py``).

Same signature as every method: ``fn(model, inputs, settings, *, max_new_tokens, pad_token_id, eos_token_id,
image_mask=None) -> LongTensor (B, new tokens)``; greedy over the edited model's scores.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from models.decoding.attention import (
    AAIEdit,
    EAHEdit,
    PAIEdit,
    VAFEdit,
    decoder_targets,
    encoder_self_attentions,
    routed,
)
from models.decoding.logits import plausible, text_layers
from models.decoding.search import greedy_search
from models.decoding.settings import AAISettings, EAHSettings, PAISettings, VAFSettings, layer_range
from models.decoding.stream import Stream, is_encoder_decoder, prompt_image_mask, text_only_inputs, unwrap


def _greedy(model, streams: list[Stream], score: Callable, max_new_tokens: int, pad_token_id: int,
            eos_token_id) -> Tensor:
    with routed(model):
        return greedy_search(streams, score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id)


def _first(outs, step) -> Tensor:
    return outs[0].logits


@torch.no_grad()
def pai(model, inputs: dict, settings: PAISettings, *, max_new_tokens: int, pad_token_id: int,
        eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """PAI: image attention of the last query row amplified in layers [start, end) + classifier-free guidance
    ``gamma (log p_img - log p_text) + log p_text`` against the prompt without its image (skipped at gamma 1)."""
    model = unwrap(model)
    mask = prompt_image_mask(model, inputs, image_mask)
    layers = layer_range(settings.start_layer, settings.end_layer, text_layers(model))
    streams = [Stream(model, inputs, mask, PAIEdit(decoder_targets(model, layers), settings.alpha))]
    if settings.gamma != 1:
        text, text_mask = text_only_inputs(inputs, mask, pad_token_id)
        streams.append(Stream(model, text, text_mask))  # the unconditional pass is not edited (as upstream)

    def score(outs, step):
        log_p = torch.log_softmax(outs[0].logits, -1)
        if settings.gamma == 1:
            return log_p
        log_u = torch.log_softmax(outs[1].logits, -1)
        guided = settings.gamma * (log_p - log_u) + log_u
        return guided.masked_fill(~plausible(log_p, settings.beta), float("-inf"))

    return _greedy(model, streams, score, max_new_tokens, pad_token_id, eos_token_id)


@torch.no_grad()
def vaf(model, inputs: dict, settings: VAFSettings, *, max_new_tokens: int, pad_token_id: int,
        eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """VAF: image-key logits x enhance, system-prompt-key logits x suppress, in layers [start, end)."""
    model = unwrap(model)
    layers = layer_range(settings.start_layer, settings.end_layer, text_layers(model))
    edit = VAFEdit(decoder_targets(model, layers), settings.enhance, settings.suppress)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), edit)
    return _greedy(model, [stream], _first, max_new_tokens, pad_token_id, eos_token_id)


def eah_targets(model: nn.Module, layers: list[int]) -> dict[int, tuple[int, bool]]:
    """Decoder self-attention layers (Flan-T5: encoder self-attention, where the prompt is read), clamped."""
    if is_encoder_decoder(model):
        attns = encoder_self_attentions(model)
        return {id(attns[min(i, len(attns) - 1)]): (min(i, len(attns) - 1), False) for i in layers}
    n = text_layers(model)
    return decoder_targets(model, sorted({min(i, n - 1) for i in layers}))


@torch.no_grad()
def eah(model, inputs: dict, settings: EAHSettings, *, max_new_tokens: int, pad_token_id: int,
        eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """EAH/EVAS: per row, the head with the densest image attention sink lends its map to every head (prefill)."""
    model = unwrap(model)
    edit = EAHEdit(eah_targets(model, settings.layers), settings.threshold)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), edit)
    return _greedy(model, [stream], _first, max_new_tokens, pad_token_id, eos_token_id)


# ---------------------------------------------------------------------------------------------------- AAI
def _captured(module: nn.Module, config, run: Callable[[], object]) -> Tensor:
    """The attention weights ``module`` returns during ``run()`` (its config switched to eager meanwhile)."""
    store: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: store.append(out[1]))
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        run()
    finally:
        handle.remove()
        config._attn_implementation = saved
    return store[-1]


def _received(attention: Tensor) -> Tensor:
    """(B, H, Q, K) attention -> (B, K) attention each key receives, averaged over heads and queries, normalised."""
    received = attention.float().mean(dim=(1, 2))
    return received / received.sum(-1, keepdim=True)


def _clip_reference(model, inputs: dict) -> Tensor:
    """LLaVA: the CLIP layer that makes the image features; attention received by each kept patch."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int) or layer == 0:
        raise ValueError(f"aai needs a single vision_feature_layer >= 1 or < 0 (got {layer!r}): choose another "
                         "generation.method for this backbone")
    blocks = tower.encoder.layers
    module = blocks[layer - 1] if layer > 0 else blocks[len(blocks) + layer]
    pixels = inputs["pixel_values"].to(tower.dtype)
    received = _received(_captured(module.self_attn, tower.config, lambda: tower(pixels)))
    if model.config.vision_feature_select_strategy == "default":  # the class token is not an image token
        received = received[:, 1:] / received[:, 1:].sum(-1, keepdim=True)
    return received


def _qformer_reference(model, inputs: dict) -> Tensor:
    """BLIP-2/InstructBLIP: the Q-Former's last self-attention; attention received by each query token."""
    pixels = inputs["pixel_values"].to(model.vision_model.dtype)
    image = model.vision_model(pixels).last_hidden_state
    queries = model.query_tokens.expand(image.shape[0], -1, -1)
    n = queries.shape[1]
    kwargs = dict(query_embeds=queries, encoder_hidden_states=image,
                  encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device))
    if "qformer_input_ids" in inputs:  # InstructBLIP: the instruction shares the Q-Former's self-attention
        text_mask = inputs.get("qformer_attention_mask", torch.ones_like(inputs["qformer_input_ids"]))
        kwargs.update(input_ids=inputs["qformer_input_ids"],
                      attention_mask=torch.cat([torch.ones_like(text_mask[:, :1]).expand(-1, n), text_mask], 1))
    module = model.qformer.encoder.layer[-1].attention.attention
    attention = _captured(module, model.qformer.config, lambda: model.qformer(**kwargs))
    return _received(attention[:, :, :n, :n])


AAI_REFERENCE: dict[str, Callable[[nn.Module, dict], Tensor]] = {
    "llava": _clip_reference,
    "blip-2": _qformer_reference,
    "instructblip": _qformer_reference,
}


def aai_reference(model, inputs: dict, image_mask: Tensor) -> Tensor:
    """(B, L) reference distribution over each row's image tokens (0 elsewhere) from the vision side."""
    model_type = model.config.model_type
    if model_type not in AAI_REFERENCE:
        raise ValueError(f"aai needs one vision-encoder attention column per image token; {model_type} has none "
                         f"(supported: {sorted(AAI_REFERENCE)}): choose another generation.method")
    if inputs.get("pixel_values") is None:
        raise ValueError("aai aligns attention with the image: inputs need pixel_values")
    reference = AAI_REFERENCE[model_type](model, inputs)  # (B, P)
    counts = image_mask.sum(1)
    if bool((counts != reference.shape[1]).any()):
        raise ValueError(f"aai: rows have {counts.tolist()} image tokens but the vision encoder gives "
                         f"{reference.shape[1]} reference weights per image")
    out = torch.zeros(image_mask.shape, dtype=torch.float32, device=image_mask.device)
    out[image_mask] = reference.to(out.device).reshape(-1)
    return out


@torch.no_grad()
def aai(model, inputs: dict, settings: AAISettings, *, max_new_tokens: int, pad_token_id: int,
        eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """AAI: after ``warmup`` tokens, each decoding query's image attention is pulled toward the vision reference."""
    model = unwrap(model)
    mask = prompt_image_mask(model, inputs, image_mask)
    layers = layer_range(settings.start_layer, settings.end_layer, text_layers(model))
    edit = AAIEdit(decoder_targets(model, layers), settings.alpha, settings.beta, settings.warmup,
                   aai_reference(model, inputs, mask))
    stream = Stream(model, inputs, mask, edit)
    return _greedy(model, [stream], _first, max_new_tokens, pad_token_id, eos_token_id)
