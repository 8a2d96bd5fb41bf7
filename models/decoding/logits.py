"""Methods that only change how next-token scores are formed: greedy, beam, VCD, PAI's CFG step, M3ID, DoLa, DeCo.

Every method has the signature ``fn(model, inputs, settings, *, max_new_tokens, pad_token_id, eos_token_id,
image_mask=None) -> LongTensor (B, new tokens)`` (see ``models/decoding/__init__.py``).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Callable

import torch
from torch import Tensor

from models.backbones import backbone_spec
from models.decoding.search import beam_search, greedy_search
from models.decoding.settings import (
    BeamSettings,
    DeCoSettings,
    DoLaSettings,
    GreedySettings,
    M3IDSettings,
    VCDSettings,
    layer_range,
)
from models.decoding.stream import Stream, is_encoder_decoder, prompt_image_mask, text_only_inputs, unwrap


@torch.no_grad()
def greedy(model, inputs: dict, settings: GreedySettings, *, max_new_tokens: int, pad_token_id: int,
           eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """The argmax token at every step (Hugging Face ``generate(do_sample=False)``)."""
    model = unwrap(model)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask))
    return greedy_search([stream], lambda outs, step: outs[0].logits, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id)


@torch.no_grad()
def beam(model, inputs: dict, settings: BeamSettings, *, max_new_tokens: int, pad_token_id: int,
         eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """Beam search (Hugging Face ``generate(num_beams=K)``); returns the best hypothesis of each row."""
    model = unwrap(model)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask))
    return beam_search(stream, settings.num_beams, settings.length_penalty, max_new_tokens=max_new_tokens,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id)


# ---------------------------------------------------------------------------------------------------- VCD
def diffusion_alpha_bar(noise_step: int, steps: int = 1000) -> float:
    """cumprod(1 - beta)[t] of VCD's schedule ``beta = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[noise_step])


def add_diffusion_noise(pixel_values: Tensor, noise_step: int, seed: int) -> Tensor:
    """``sqrt(a_t) x + sqrt(1 - a_t) eps`` per image; eps is seeded by ``seed`` and the image's own pixels.

    Seeding by content keeps a row's noise the same whatever else is in the batch (and across runs).
    """
    alpha_bar = diffusion_alpha_bar(noise_step)
    noise = torch.empty_like(pixel_values, dtype=torch.float32)
    for i, image in enumerate(pixel_values):
        digest = zlib.crc32(image.detach().float().cpu().numpy().tobytes(), zlib.crc32(str(seed).encode()))
        g = torch.Generator().manual_seed(digest)  # the CPU generator keeps 32 bits of a seed
        noise[i] = torch.randn(image.shape, generator=g).to(noise.device)
    noisy = math.sqrt(alpha_bar) * pixel_values.float() + math.sqrt(1 - alpha_bar) * noise
    return noisy.to(pixel_values.dtype)


def plausible(log_probs: Tensor, beta: float) -> Tensor:
    """(N, V) bool: adaptive plausibility constraint, ``p >= beta * max p`` (works on logits or log-probs)."""
    return log_probs >= log_probs.max(dim=-1, keepdim=True).values + math.log(beta)


@torch.no_grad()
def vcd(model, inputs: dict, settings: VCDSettings, *, max_new_tokens: int, pad_token_id: int,
        eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """``(1 + alpha) l(v) - alpha l(v')`` on tokens with ``p(v) >= beta p_max``; argmax (upstream samples)."""
    model = unwrap(model)
    mask = prompt_image_mask(model, inputs, image_mask)
    if inputs.get("pixel_values") is None:
        raise ValueError("vcd contrasts the image with a noised copy: inputs need pixel_values")
    noised = dict(inputs, pixel_values=add_diffusion_noise(inputs["pixel_values"], settings.noise_step, settings.seed))
    streams = [Stream(model, inputs, mask), Stream(model, noised, mask)]
    alpha, beta = settings.alpha, settings.beta

    def score(outs, step):
        clean, noisy = outs[0].logits, outs[1].logits
        return ((1 + alpha) * clean - alpha * noisy).masked_fill(~plausible(clean, beta), float("-inf"))

    return greedy_search(streams, score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)


# ---------------------------------------------------------------------------------------------------- M3ID
@torch.no_grad()
def m3id(model, inputs: dict, settings: M3IDSettings, *, max_new_tokens: int, pad_token_id: int,
         eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """``lc + (1 - g_t) / g_t (lc - lu)`` with ``g_t = exp(-lam t)`` (t = tokens generated so far), APC beta."""
    model = unwrap(model)
    mask = prompt_image_mask(model, inputs, image_mask)
    text, text_mask = text_only_inputs(inputs, mask, pad_token_id)
    streams = [Stream(model, inputs, mask), Stream(model, text, text_mask)]

    def score(outs, step):
        lc, lu = torch.log_softmax(outs[0].logits, -1), torch.log_softmax(outs[1].logits, -1)
        g = math.exp(-settings.lam * step)
        return (lc + (1 - g) / g * (lc - lu)).masked_fill(~plausible(lc, settings.beta), float("-inf"))

    return greedy_search(streams, score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)


# ---------------------------------------------------------------------------------------------------- DoLa
def text_layers(model) -> int:
    """Decoder layers of the text model (Flan-T5: the decoder's)."""
    config = model.config.get_text_config()
    return config.num_decoder_layers if is_encoder_decoder(model) else config.num_hidden_layers


def dola_candidate_layers(layers: str | list[int], n_layers: int, skip_embeddings: bool) -> list[int]:
    """Hidden-state indices (0 = embeddings, n_layers = final) of the premature candidates.

    ``low``/``high`` follow Hugging Face's ``dola_layers`` buckets; tied word embeddings skip index 0 and 1
    (decoder-only), as there.
    """
    if not isinstance(layers, str):
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ValueError(f"dola.layers {bad} are not premature layers of a {n_layers}-layer text model "
                             f"(hidden-state indices 0..{n_layers - 1})")
        return list(layers)
    start = 2 if skip_embeddings else 0
    half = n_layers // 2
    if layers == "low":
        if start >= half:
            return [min(start, n_layers - 1)]
        return list(range(start, half, 2) if n_layers <= 40 else range(start, 20, 2))
    return list(range(half, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))


def jsd_per_row(final: Tensor, premature: Tensor) -> Tensor:
    """(N, V), (M, N, V) logits -> (M, N) Jensen-Shannon divergence ``(KL(p||m) + KL(q||m)) / 2``, m = (p + q) / 2.

    The paper's JSD. DoLa's code and Hugging Face pass the arguments of ``F.kl_div`` the other way round, which
    gives ``(KL(m||p) + KL(m||q)) / 2`` (docs/methods.md).
    """
    log_p, log_q = torch.log_softmax(final, -1)[None], torch.log_softmax(premature, -1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def dola_scores(final: Tensor, premature: Tensor, relative_top: float) -> tuple[Tensor, Tensor]:
    """(N, V) contrast ``log q_N - log q_M`` with M chosen per row by JSD, and (N,) the chosen candidate index."""
    if premature.shape[0] == 0:
        return final, torch.full(final.shape[:1], -1, dtype=torch.long, device=final.device)
    chosen = jsd_per_row(final, premature).argmax(dim=0)  # (N,)
    base = premature[chosen, torch.arange(final.shape[0], device=final.device)]  # (N, V)
    mature, base = torch.log_softmax(final, -1), torch.log_softmax(base, -1)
    keep = plausible(mature, relative_top)  # Hugging Face's relative-top filter (min_tokens_to_keep=1)
    return (mature - base).masked_fill(~keep, float("-inf")), chosen


@torch.no_grad()
def dola(model, inputs: dict, settings: DoLaSettings, *, max_new_tokens: int, pad_token_id: int,
         eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """DoLa contrast of the final layer with the most divergent premature layer (chosen per row, per step)."""
    model = unwrap(model)
    text_config = model.config.get_text_config()
    n = text_layers(model)
    skip = not is_encoder_decoder(model) and bool(getattr(text_config, "tie_word_embeddings", False))
    layers = dola_candidate_layers(settings.layers, n, skip)
    head = model.get_output_embeddings()
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), hidden_states=bool(layers))

    def score(outs, step):
        out = outs[0]
        if not layers:
            return out.logits
        premature = torch.stack([head(out.hidden[i]).float() for i in layers])  # (M, N, V)
        return dola_scores(out.logits, premature, settings.relative_top)[0]

    return greedy_search([stream], score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)


# ---------------------------------------------------------------------------------------------------- DeCo
def final_norm(model) -> Callable[[Tensor], Tensor]:
    """The text model's last normalisation (what turns a middle layer's state into an early-exit prediction)."""
    lm = backbone_spec(model).language_model(model)
    kind = model.config.get_text_config().model_type
    if kind == "llama":
        return (lm.model if hasattr(lm, "model") else lm).norm
    if kind == "opt":
        decoder = lm.model.decoder
        parts = [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]
        return lambda h: functools.reduce(lambda x, f: f(x), parts, h)
    if kind == "t5":
        scale = lm.model_dim ** -0.5 if lm.config.scale_decoder_outputs else 1.0
        return lambda h: lm.decoder.final_layer_norm(h) * scale
    raise ValueError(f"deco needs the final norm of the text model; {kind!r} is not one of llama, opt, t5: "
                     "choose another generation.method")


def deco_scores(final: Tensor, early: Tensor, settings: DeCoSettings) -> Tensor:
    """(N, V) final logits, (M, N, V) early-exit logits -> ``l_L + alpha p* l_{l*}`` on the candidate tokens."""
    probs = torch.softmax(final, -1)
    top_p, top_i = probs.topk(min(settings.top_k, probs.shape[-1]), dim=-1)  # (N, k) sorted
    keep = (top_p.cumsum(-1) - top_p) < settings.top_p  # nucleus within the top k; the first always stays
    candidates = torch.zeros_like(final, dtype=torch.bool).scatter(1, top_i, keep)
    early_probs = torch.softmax(early, -1).masked_fill(~candidates[None], 0.0)  # (M, N, V)
    best = early_probs.amax(dim=-1)  # (M, N) most confident candidate per layer
    p_star, layer = best.max(dim=0)  # (N,)
    anchor = early[layer, torch.arange(final.shape[0], device=final.device)]  # (N, V)
    return (final + settings.alpha * p_star[:, None] * anchor).masked_fill(~candidates, float("-inf"))


@torch.no_grad()
def deco(model, inputs: dict, settings: DeCoSettings, *, max_new_tokens: int, pad_token_id: int,
         eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """DeCo: the final layer's candidates re-scored with the most confident early layer's logits."""
    model = unwrap(model)
    layers = list(layer_range(settings.start_layer, settings.end_layer, text_layers(model)))
    norm, head = final_norm(model), model.get_output_embeddings()
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), hidden_states=True)

    def score(outs, step):
        out = outs[0]
        early = torch.stack([head(norm(out.hidden[i])).float() for i in layers])  # (M, N, V)
        return deco_scores(out.logits, early, settings)

    return greedy_search([stream], score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)
