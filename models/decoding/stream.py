"""A batch of sequences decoded with its own KV cache, on any backbone of the registry (plain or grounded).

``Stream`` runs the prompt through the whole VLM once (``prefill``) and then feeds one token per row to the text
model (``step``), exactly as Hugging Face ``generate`` does: positions from the attention mask (left padding), an
all-ones mask dropped, ``logits_to_keep=1``, except that decoder-only caches append in place
(``models.decoding.cache``) where ``generate`` concatenates; for Flan-T5 the encoder runs once and the decoder
starts from ``decoder_start_token_id``. Several streams decode side by side (VCD: a noised image; PAI/M3ID: the
prompt without its image). Beam searches fold a sample's beams into its one cache row on decoder-only models
(``expand``). While a stream calls the model, its ``GroundingState`` (image positions, for grounded layers) and its
attention edit (PAI, VAF, ...) are active; both are per-stream context variables, so a method's second pass is
neither grounded with the wrong image nor edited.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from models.backbones import backbone_spec, image_token_mask
from models.decoding.cache import grow_in_place
from models.grounding import ATTENTION_EDIT
from models.grounding_state import _ACTIVE_STATE, GroundingRecorder, GroundingState

# model_type -> the module that decodes text tokens once the image is in the cache (and runs text-only prompts)
TEXT_MODEL: dict[str, Callable[[PreTrainedModel], nn.Module]] = {
    "llava": lambda m: m,
    "llava_next": lambda m: m,
    "blip-2": lambda m: m.language_model,
    "instructblip": lambda m: m.language_model,
}


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model under a peft wrapper (LoRA layers are injected in place, so they still run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config.get_text_config(), "is_encoder_decoder", False))


def prompt_image_mask(model: PreTrainedModel, inputs: dict, image_mask: Tensor | None = None) -> Tensor:
    """(B, L) bool image positions of the prompt (encoder prompt for Flan-T5): given, or from the placeholders."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("decoding needs inputs['input_ids'] (the prompt with its image placeholder tokens)")
    if image_mask is None:
        return image_token_mask(model, input_ids, inputs.get("pixel_values") is not None)
    if image_mask.shape != input_ids.shape or image_mask.dtype != torch.bool:
        raise ValueError(f"image_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {image_mask.dtype} {tuple(image_mask.shape)}")
    return image_mask.to(input_ids.device)


def text_only_inputs(inputs: dict, image_mask: Tensor, pad_token_id: int) -> tuple[dict, Tensor]:
    """The prompt without its image tokens, re-left-padded, and its (all False) image mask."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    rows = [row[keep] for row, keep in zip(ids, mask & ~image_mask)]
    empty = [i for i, row in enumerate(rows) if row.numel() == 0]
    if empty:
        raise ValueError(f"prompt rows {empty} hold nothing but the image: a text-only pass needs some prompt text")
    width = max(row.numel() for row in rows)
    out = ids.new_full((len(rows), width), pad_token_id)
    keep = torch.zeros_like(out)
    for i, row in enumerate(rows):
        out[i, width - row.numel():] = row
        keep[i, width - row.numel():] = 1
    return {"input_ids": out, "attention_mask": keep}, torch.zeros_like(out, dtype=torch.bool)


def prompt_then(prompt_mask: Tensor, visible: Tensor) -> Tensor:
    """(B, 1, Q, L + G) bool 4D mask of Q queries per row: the row's prompt (B, L), then the generated columns that
    ``visible`` (B, Q, G) shows each query."""
    b, q = visible.shape[:2]
    return torch.cat([prompt_mask.bool()[:, None, None, :].expand(b, 1, q, prompt_mask.shape[1]), visible[:, None]], -1)


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


@contextlib.contextmanager
def activated(state: GroundingState, edit: Callable | None):
    """Make ``state`` the grounding inputs and ``edit`` the attention edit of every attention call inside."""
    token_state, token_edit = _ACTIVE_STATE.set(state), ATTENTION_EDIT.set(edit)
    try:
        yield
    finally:
        ATTENTION_EDIT.reset(token_edit)
        _ACTIVE_STATE.reset(token_state)


@dataclass
class StepOutput:
    logits: Tensor  # (N, V) float32, next-token logits of the last position
    hidden: tuple[Tensor, ...] | None = None  # per hidden-state index, (N, D) at the last position


class Stream:
    """Prompt ``inputs`` (input_ids, attention_mask, pixel_values, ... as the VLM's processor makes them)."""

    def __init__(self, model: PreTrainedModel, inputs: dict, image_mask: Tensor, edit: Callable | None = None,
                 hidden_states: bool = False, recorder: GroundingRecorder | None = None) -> None:
        backbone_spec(model)  # unsupported architectures fail here, naming the supported ones
        self.model = model
        self.text_model = TEXT_MODEL[model.config.model_type](model)
        self._takes_positions = _accepts(self.text_model, "position_ids")
        self._takes_logits_to_keep = _accepts(self.text_model, "logits_to_keep")
        self.encoder_decoder = is_encoder_decoder(model)
        self.inputs = inputs
        self.state = GroundingState(image_mask, recorder)  # recorder: grounding scores of a grounded model
        self.edit = edit
        self.hidden_states = hidden_states
        self.cache = None
        self.mask: Tensor | None = None  # (N, S) long over cache positions (decoder positions for Flan-T5)
        self.mask_dropped = False  # generate() passes no mask when the prompt has no padding
        self.last_pos: Tensor | None = None  # (N,) position id of the last fed token
        self.encoder: Tensor | None = None  # Flan-T5: (N, L, D) encoder states and their (N, L) mask
        self.encoder_mask: Tensor | None = None
        self.generated = 0  # tokens fed after the prompt
        self.beams = 1  # > 1: beams folded into their sample's cache row (``expand(k, fold=True)``)
        self.visible: Tensor | None = None  # folded: (B, K, G) bool, the generated cache columns each beam sees
        if edit is not None and hasattr(edit, "bind"):
            edit.bind(self)

    # ------------------------------------------------------------------ calls
    def _call(self, fn: nn.Module, kwargs: dict, state: GroundingState | None = None, last: int = 1) -> StepOutput:
        """Run ``fn`` with this stream's grounding state and edit active; keeps the returned cache."""
        out, self.cache = self._run(fn, kwargs, state or self.state, last)
        return out

    def _run(self, fn: nn.Module, kwargs: dict, state: GroundingState, last: int = 1) -> tuple[StepOutput, object]:
        """``last`` > 1: the outputs of the last ``last`` positions of every row, flattened row-major (R * last)."""
        if self.hidden_states:
            kwargs["output_hidden_states"] = True
        with activated(state, self.edit):
            out = fn(**kwargs, use_cache=True)
        lm = getattr(out, "language_model_outputs", None)
        lm = out if lm is None else lm
        if self.encoder_decoder and self.encoder is None:
            self.encoder = lm.encoder_last_hidden_state
        hidden = None
        if self.hidden_states:
            states = lm.decoder_hidden_states if self.encoder_decoder else lm.hidden_states
            hidden = tuple(h[:, -last:].flatten(0, 1) for h in states)
        return StepOutput(out.logits[:, -last:].flatten(0, 1).float(), hidden), lm.cache

    def _decoder_start(self, batch: int, device: torch.device) -> Tensor:
        config = self.text_model.generation_config
        start = config.decoder_start_token_id
        if start is None:
            start = self.text_model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the Flan-T5 language model has no decoder_start_token_id in its generation config")
        return torch.full((batch, 1), int(start), dtype=torch.long, device=device)

    def prefill(self) -> StepOutput:
        """Run the prompt; the logits of its last position choose the first new token."""
        inputs = dict(self.inputs)
        ids = inputs["input_ids"]
        has_pixels = inputs.get("pixel_values") is not None
        fn = self.model if has_pixels else self.text_model
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.long()
        if self.encoder_decoder:
            self.encoder_mask = mask
            inputs["attention_mask"] = mask
            dec = inputs.pop("decoder_input_ids", None)
            inputs["decoder_input_ids"] = self._decoder_start(ids.shape[0], ids.device) if dec is None else dec
            self.mask = torch.ones_like(inputs["decoder_input_ids"])
            return self._call(fn, inputs)
        self.mask = mask
        self.mask_dropped = bool(mask.all())
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.last_pos = positions[:, -1]
        inputs["attention_mask"] = None if self.mask_dropped else mask
        self._positions(inputs, positions)
        out = self._call(fn, inputs)
        grow_in_place(self.cache)  # steps append in place instead of concatenating the cache
        return out

    def step(self, tokens: Tensor) -> StepOutput:
        """Feed one token per row (N,); the logits choose the next one."""
        if self.beams > 1:
            return self._step_folded(tokens)
        self.generated += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        if self.encoder_decoder:
            kwargs = dict(encoder_outputs=(self.encoder,), attention_mask=self.encoder_mask,
                          decoder_input_ids=tokens[:, None], cache=self.cache)
            if not bool(self.mask.all()):
                kwargs["decoder_attention_mask"] = self.mask
            return self._call(self.text_model, kwargs)
        self.last_pos = self.last_pos + 1
        kwargs = dict(input_ids=tokens[:, None], attention_mask=None if self.mask_dropped else self.mask,
                      cache=self.cache)
        self._positions(kwargs, self.last_pos[:, None])
        return self._call(self.text_model, kwargs)

    @property
    def width(self) -> int:
        """Cache columns (positions of the cache, holes and folded beams' columns included)."""
        return self.mask.shape[1] + (self.visible.shape[2] if self.beams > 1 else 0)

    # ------------------------------------------------------------------ beams
    def expand(self, k: int, fold: bool = False) -> None:
        """Every row becomes ``k`` consecutive rows (beams), as generate() expands its inputs.

        ``fold`` (decoder-only models): the cache keeps one row per sample instead. Each step appends the ``k``
        beams' tokens to their sample's row as ``k`` new columns, fed in one pass at the same position, and a 4D
        mask lets each beam see the prompt and the columns of its own ancestors only (``visible``). Nothing is
        copied per beam: no ``k``-fold prompt cache and no reordering of it after each step, only of ``visible``.
        The outputs are those of ``k`` rows (each beam's query sees the same keys at the same positions; only the
        order of the keys, so float rounding, differs).
        """
        if fold and not self.encoder_decoder:
            self.beams = k
            self.visible = torch.zeros(self.mask.shape[0], k, 0, dtype=torch.bool, device=self.mask.device)
            return
        self.cache.batch_repeat_interleave(k)
        for name in ("mask", "last_pos", "encoder", "encoder_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat_interleave(k, dim=0))

    def reorder(self, index: Tensor) -> None:
        """Row ``i`` continues row ``index[i]`` (beam search; folded: ``index`` stays within each sample)."""
        if self.beams > 1:
            b, k = self.visible.shape[:2]
            local = index.view(b, k) - torch.arange(b, device=index.device)[:, None] * k  # (B, K) parent beam
            self.visible = self.visible.gather(1, local[..., None].expand(-1, -1, self.visible.shape[2]))
            return
        self.cache.reorder_cache(index)
        for name in ("mask", "last_pos", "encoder", "encoder_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])

    def _step_folded(self, tokens: Tensor) -> StepOutput:
        """Feed one token per beam (B * K,) as K columns of each sample's cache row; (B * K) outputs."""
        b, k = self.visible.shape[:2]
        self.generated += 1
        own = torch.eye(k, dtype=torch.bool, device=tokens.device).expand(b, k, k)
        self.visible = torch.cat([self.visible, own], dim=2)  # (B, K, G + K)
        self.last_pos = self.last_pos + 1
        mask = prompt_then(self.mask, self.visible)
        kwargs = dict(input_ids=tokens.view(b, k), attention_mask=mask, cache=self.cache)
        self._positions(kwargs, self.last_pos[:, None].expand(b, k), keep=k)
        return self._call(self.text_model, kwargs, last=k)

    # ------------------------------------------------------------------ OPERA
    def peek(self, tokens: Tensor) -> StepOutput:
        """``step`` whose token is dropped from the cache again (a candidate's forward pass)."""
        saved = self.mask, self.last_pos, self.generated
        out = self.step(tokens)
        self.cache.crop(-1)
        self.mask, self.last_pos, self.generated = saved
        return out

    def peek_all(self, tokens: Tensor) -> StepOutput:
        """Feed C candidate tokens per row (N, C) in one decoder-only pass, then drop them from the cache.

        Each candidate sees the cache and itself only (a block-diagonal 4D mask, all at the next position), so the
        pass equals C single-token passes; only the edit's read-out of it is meant to be used. Folded beams: the
        pass has K * C queries per sample, beam-major (query ``i * C + j`` is candidate ``j`` of beam ``i``).
        """
        n, c = tokens.shape
        if self.beams > 1:  # folded: a sample's K * C candidates in its row, each seeing its beam's columns
            n, k = self.visible.shape[:2]
            past = prompt_then(self.mask, self.visible.repeat_interleave(c, dim=1))
            tokens, c = tokens.reshape(n, k * c), k * c
        else:
            past = self.mask.bool()[:, None, None, :].expand(n, 1, c, self.mask.shape[1])
        own = torch.eye(c, dtype=torch.bool, device=tokens.device)[None, None].expand(n, 1, c, c)
        kwargs = dict(input_ids=tokens, attention_mask=torch.cat([past, own], dim=-1), cache=self.cache)
        self._positions(kwargs, (self.last_pos + 1)[:, None].expand(n, c))
        out = self._call(self.text_model, kwargs)
        self.cache.crop(-c)
        return out

    def refill(self, rows: Tensor, sample: int, tokens: Tensor, after_prompt: Callable[[], None] | None = None
               ) -> StepOutput:
        """Recompute cache rows ``rows`` as prompt row ``sample`` + ``tokens`` (R, n), keeping the cache length.

        Decoder-only: the prompt is run as in ``prefill`` (``after_prompt`` is called then), the tokens as one
        multi-token step; the prompt keeps its positions (so do its image tokens) and the rest of the row becomes
        masked holes. Flan-T5: one decoder pass over the left-padded decoder row (T5's relative positions only see
        differences).
        """
        k, n = tokens.shape
        if self.beams > 1:
            return self._refill_folded(sample, tokens, after_prompt)
        length = self.mask.shape[1]
        state = GroundingState(self.state.image_mask[sample:sample + 1])
        if self.encoder_decoder:
            pad = length - n - 1
            start = self._decoder_start(k, tokens.device)
            ids = torch.cat([start.expand(k, pad), start, tokens], dim=1)
            mask = torch.cat([torch.zeros_like(ids[:, :pad]), torch.ones_like(ids[:, pad:])], dim=1)
            out, fresh = self._run(self.text_model, dict(
                encoder_outputs=(self.encoder[rows],), attention_mask=self.encoder_mask[rows],
                decoder_input_ids=ids, decoder_attention_mask=mask), state)
        else:
            out, fresh, prompt_mask, last = self._run_prompt(sample, k, state, after_prompt)
            mask = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
            if n:
                kwargs = dict(input_ids=tokens, attention_mask=mask, cache=fresh)
                self._positions(kwargs, last[:, None] + 1 + torch.arange(n, device=tokens.device))
                out, fresh = self._run(self.text_model, kwargs, state)
            self.last_pos[rows] = last + n
        self._write_rows(rows, fresh, mask.shape[1])
        self.mask[rows] = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        self.mask_dropped = False
        return out

    def _refill_folded(self, sample: int, tokens: Tensor, after_prompt: Callable[[], None] | None) -> StepOutput:
        """``refill`` of folded beams: the sample's one cache row becomes the prompt and then the K beams' tokens
        step-major (column ``L + j * K + i`` holds beam ``i``'s token ``j``), each beam seeing its own chain only;
        the columns after them are holes until the next step. Returns the K beams' outputs (K rows)."""
        k, n = tokens.shape
        state = GroundingState(self.state.image_mask[sample:sample + 1])
        out, fresh, prompt_mask, last = self._run_prompt(sample, 1, state, after_prompt)
        column = torch.arange(n * k, device=tokens.device)
        chain = column[None, :] % k == torch.arange(k, device=tokens.device)[:, None]  # (K, n * K) beam i's columns
        if n:
            step = column // k
            sees = chain[column % k] & (step[None, :] <= step[:, None])  # (n * K, n * K)
            kwargs = dict(input_ids=tokens.t().reshape(1, n * k), attention_mask=prompt_then(prompt_mask, sees[None]),
                          cache=fresh)
            self._positions(kwargs, last[:, None] + 1 + step, keep=k)
            out, fresh = self._run(self.text_model, kwargs, state, last=k)
        else:
            out = StepOutput(out.logits.expand(k, -1), None if out.hidden is None else
                             tuple(h.expand(k, -1) for h in out.hidden))
        self._write_rows(torch.tensor([sample], device=tokens.device), fresh, prompt_mask.shape[1] + n * k)
        self.visible[sample] = False
        self.visible[sample, :, :n * k] = chain
        self.last_pos[sample] = last[0] + n
        return out

    def _run_prompt(self, sample: int, copies: int, state: GroundingState, after_prompt: Callable[[], None] | None
                    ) -> tuple[StepOutput, object, Tensor, Tensor]:
        """Prompt row ``sample`` run as in ``prefill``, ``copies`` rows of it (decoder-only; ``after_prompt`` is
        called then): its output and cache, its (copies, L) mask and the (copies,) position of its last token."""
        prompt = {key: value[sample:sample + 1].expand(copies, *value.shape[1:])
                  for key, value in self.inputs.items() if torch.is_tensor(value)}
        mask = prompt.get("attention_mask", torch.ones_like(prompt["input_ids"])).long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs = dict(prompt, attention_mask=mask)
        self._positions(kwargs, positions)
        fn = self.model if prompt.get("pixel_values") is not None else self.text_model
        out, fresh = self._run(fn, kwargs, state)
        if after_prompt is not None:
            after_prompt()
        return out, fresh, mask, positions[:, -1]

    def _positions(self, kwargs: dict, positions: Tensor, keep: int = 1) -> None:
        """Position ids and ``logits_to_keep=keep`` (generate() keeps 1) where the text model takes them."""
        if self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep

    def _write_rows(self, rows: Tensor, fresh, width: int) -> None:
        """Copy the self-attention cache ``fresh`` (R rows, ``width`` positions) into rows ``rows``; zero the rest."""
        def layers(cache):
            return getattr(cache, "self_attention_cache", cache).layers

        for main, new in zip(layers(self.cache), layers(fresh)):
            for name in ("keys", "values"):
                target = getattr(main, name)
                target[rows] = 0
                target[rows, :, :width] = getattr(new, name).to(target.dtype)
