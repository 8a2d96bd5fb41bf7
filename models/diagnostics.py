"""What grounding sees, per object mention of a generated caption: the signals ``analyze`` and the report measure.

For a batch of prompts and the tokens a model generated for them, one teacher-forced pass (prompt + generated
tokens, grounding recorder on, attention read out) gives, for generated token ``k`` (its position in the sequence,
and the position before it, which predicts it):

* ``lm_logprob``: log p(token k | image, prompt, tokens < k) of the language model (no decoding-method edits);
* ``G_own/L{l}``, ``G_pred/L{l}``: grounding score G of layer ``l`` at the token's own / the predicting position;
* ``gate_own/L{l}``, ``gate_pred/L{l}``: the gate logit ``scale * G + bias`` at the same positions;
* ``image_attention/L{l}``: attention mass the predicting position puts on the image keys in layer ``l``
  (mean over heads), read through the attention registry (:class:`ImageAttentionReadout`);
* ``word_z``: the candidate-word logit z of the token (:mod:`models.word_grounding`), NaN where the model has no
  word score or the token is no object word.

Plus the image-token features the linear probes read (:mod:`models.probes`): at the language model's input and at
each grounded layer. :func:`mention_rows` turns the signals into one row per object mention (both CHAIR modes,
present or hallucinated from the ground truth); :func:`auroc` scores a signal over them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from metrics.io import normalize_image_id
from models.backbones import backbone_spec, gate_modules
from models.decoding.attention import AttentionEdit, decoder_targets, explicit_logits, routed
from models.decoding.stream import is_encoder_decoder, prompt_image_mask, unwrap
from models.grounding import ATTENTION_EDIT, META_ATTR, GroundingRecorder, GroundingState
from models.mention_tokens import ObjectMention, align_mentions, caption_mentions, token_spans
from models.training import model_inputs
from models.word_grounding import ObjectWords, get_object_words, word_logits

__all__ = ["ForcedPass", "ImageAttentionReadout", "MentionScores", "auroc", "forced_pass", "generated_tokens",
           "grounded_layers", "mention_rows", "report_signal", "validation_mention_scores"]


def auroc(scores: Sequence[float] | Tensor, present: Sequence[bool] | Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for present (positive) vs hallucinated mentions; ties count half.

    torchmetrics' exact binary AUROC (trapezoids over every distinct threshold) on the scores' dense ranks: the same
    order, but never squashed by the sigmoid torchmetrics applies to values outside [0, 1]. NaN scores are left
    out; None without both classes.

    >>> auroc([0.1, 0.4, 0.4, 0.9], [False, False, True, True])
    0.875
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(present, dtype=torch.bool).flatten()
    keep = ~s.isnan()
    s, y = s[keep], y[keep]
    if not bool(y.any()) or bool(y.all()):
        return None
    _, ranks = torch.unique(s, return_inverse=True)
    ranks = ranks.double() / max(int(ranks.max()), 1)
    return float(binary_auroc(ranks, y.long(), thresholds=None))


def grounded_layers(model: nn.Module) -> list[int]:
    """Decoder layers (non-negative indices) that carry a grounding gate, enabled or not."""
    return sorted(int(name.removeprefix("layer")) for name in gate_modules(model))


def generated_tokens(new: Tensor, eos_token_id: int | Sequence[int] | None,
                     image_token_id: int | None) -> list[list[int]]:
    """Each row's generated tokens up to (not including) its first EOS; a row is also cut before an image
    placeholder token (it would be read as an image position)."""
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    if image_token_id is not None:
        stops.add(int(image_token_id))
    out = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def _batch(x: Tensor | None, rows: slice) -> Tensor | None:
    """Rows of a tensor whose batch dimension may be broadcast (size 1)."""
    return x if x is None or x.shape[0] == 1 else x[rows]


class ImageAttentionReadout(AttentionEdit):
    """Keeps, in the target layers, the attention of query ``rows`` over every key (mean over heads); the output
    is sdpa's, unchanged. ``chunk`` batch rows are computed at a time (memory: chunk x heads x rows x keys)."""

    def __init__(self, targets: dict[int, tuple[int, bool]], rows: slice, keep_values: bool = False,
                 chunk: int = 8) -> None:
        super().__init__(targets)
        self.rows, self.keep_values, self.chunk = rows, keep_values, chunk
        self.probs: dict[int, Tensor] = {}  # layer -> (B, R, S) float32
        self.values: dict[int, Tensor] = {}  # layer -> (B, S, Hkv * d) value vectors (keep_values)

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        layer = self.targets[id(module)][0]
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        settings = {**kwargs, "is_causal": False} if cross else kwargs
        parts = []
        for b0 in range(0, query.shape[0], self.chunk):
            rows = slice(b0, b0 + self.chunk)
            part = {**settings, "position_bias": _batch(settings.get("position_bias"), rows)}
            logits, _ = explicit_logits(module, query[rows], key[rows], _batch(attention_mask, rows), part, self.rows)
            parts.append(logits.softmax(-1).mean(dim=1))  # (b, R, S)
        self.probs[layer] = torch.cat(parts)
        if self.keep_values:
            self.values[layer] = value.transpose(1, 2).flatten(2)
        return out


@dataclass
class ForcedPass:
    """Teacher-forced signals of a batch: ``signals[name]`` (B, N) at generated token k (NaN where undefined)."""

    signals: dict[str, Tensor]
    word_z: Tensor | None  # (B, W) candidate-word logits of the table's object words
    features: dict[str, Tensor] = field(default_factory=dict)  # site -> (B, 2D) [mean, max] over image tokens
    attention: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, N, P) over image keys (NaN padded)


def _decoder_start(model: nn.Module) -> int:
    text = backbone_spec(model).language_model(model)
    start = text.generation_config.decoder_start_token_id
    start = text.config.decoder_start_token_id if start is None else start
    if start is None:
        raise ValueError("the encoder-decoder language model has no decoder_start_token_id")
    return int(start)


def _teacher_inputs(model: nn.Module, inputs: dict, gen: Tensor, gen_mask: Tensor) -> tuple[dict, Tensor, int]:
    """(model kwargs, (B, S) image mask of the sequence grounded layers see, offset of generated token 0)."""
    image_mask = prompt_image_mask(model, inputs)
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    if is_encoder_decoder(model):  # the decoder reads [start, g0, g1, ...]; keys are encoder positions
        start = gen.new_full((gen.shape[0], 1), _decoder_start(model))
        kwargs["decoder_input_ids"] = torch.cat([start, gen], 1)
        kwargs["decoder_attention_mask"] = torch.cat([torch.ones_like(start), gen_mask], 1)
        return kwargs, image_mask, 1
    prompt = inputs["input_ids"]
    mask = torch.cat([inputs.get("attention_mask", torch.ones_like(prompt)).long(), gen_mask], 1)
    kwargs["input_ids"], kwargs["attention_mask"] = torch.cat([prompt, gen], 1), mask
    accepted = inspect.signature(model.forward).parameters
    if "position_ids" in accepted:  # left padding, as generate() counts
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    if "logits_to_keep" in accepted:  # the positions that predict a generated token (and the last one)
        kwargs["logits_to_keep"] = gen.shape[1] + 1
    return kwargs, F.pad(image_mask, (0, gen.shape[1]), value=False), prompt.shape[1]


def _pooled(features: Tensor, valid: Tensor) -> Tensor:
    """(B, P, D) features, (B, P) valid -> (B, 2D) mean and max over the valid image tokens."""
    f = features.float()
    w = valid[..., None].float()
    mean = (f * w).sum(1) / w.sum(1).clamp_min(1.0)
    peak = f.masked_fill(~valid[..., None], float("-inf")).amax(1)
    return torch.cat([mean, peak], -1).cpu()


def _log_probs(logits: Tensor, rows: slice, gen: Tensor) -> Tensor:
    """(B, N) log-probability of each generated token from the logits of the positions ``rows`` (row by row)."""
    return torch.stack([F.log_softmax(logits[b, rows].float(), -1).gather(-1, gen[b, :, None]).squeeze(-1)
                        for b in range(gen.shape[0])])


@torch.no_grad()
def forced_pass(model: nn.Module, inputs: dict, tokens: Sequence[Sequence[int]], pad_token_id: int, *,
                readout: bool = True, features: bool = True, chunk: int = 8) -> ForcedPass:
    """One teacher-forced pass of ``inputs`` (a generation batch) followed by each row's generated ``tokens``.

    ``readout``: read the attention over the image keys (``chunk`` rows at a time); ``features``: the probes'."""
    base = unwrap(model)
    device = inputs["input_ids"].device
    n = max(1, max((len(t) for t in tokens), default=1))
    gen = torch.full((len(tokens), n), pad_token_id, dtype=torch.long, device=device)
    gen_mask = torch.zeros_like(gen)
    for b, row in enumerate(tokens):
        gen[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        gen_mask[b, : len(row)] = 1
    kwargs, image_mask, offset = _teacher_inputs(base, inputs, gen, gen_mask)
    layers = grounded_layers(base)
    enabled = _grounding_on(base)
    recorder = GroundingRecorder()
    state = GroundingState(image_mask, recorder)
    edit = ImageAttentionReadout(decoder_targets(base, layers), slice(offset - 1, offset - 1 + n),
                                 keep_values=features and not enabled, chunk=chunk) if readout else None
    captured: dict[str, Tensor] = {}

    def keep_embeds(module: nn.Module, args: tuple, kw: dict) -> None:  # the language model's input (B, L, D)
        captured.setdefault("embeds", kw.get("inputs_embeds"))

    hook = backbone_spec(base).language_model(base).register_forward_pre_hook(keep_embeds, with_kwargs=True)
    token = ATTENTION_EDIT.set(edit)
    try:
        with routed(base) if edit is not None else contextlib.nullcontext():
            out = model(**kwargs, grounding=state)
    finally:
        ATTENTION_EDIT.reset(token)
        hook.remove()
    rows = slice(offset - 1, offset - 1 + n)
    kept = slice(0, n) if out.logits.shape[1] == n + 1 else rows  # logits_to_keep
    signals = {"lm_logprob": _log_probs(out.logits, kept, gen)}
    for layer in recorder.layers:
        for name, store in (("G", recorder.forward_scores), ("gate", recorder.forward_logits)):
            values = store(layer).float()
            signals[f"{name}_own/L{layer}"] = values[:, offset: offset + n]
            signals[f"{name}_pred/L{layer}"] = values[:, rows]
    positions, valid = state.image_index(gen.shape[0], device)  # (B, P) image keys
    result = ForcedPass(signals, _word_z(model, recorder) if enabled else None)
    if edit is not None:
        for layer, probs in edit.probs.items():
            on_image = probs.gather(2, positions[:, None, :].expand(-1, n, -1))  # (B, N, P)
            signals[f"image_attention/L{layer}"] = (on_image * valid[:, None, :]).sum(-1)
            result.attention[layer] = on_image.masked_fill(~valid[:, None, :], float("nan")).cpu()
    if features:
        embeds = captured.get("embeds")
        if embeds is None:
            raise RuntimeError("the language model was called without inputs_embeds: no image-token features to probe")
        gather = positions[..., None].expand(-1, -1, embeds.shape[-1])
        result.features["lm_input"] = _pooled(embeds.gather(1, gather), valid)
        for layer in layers:
            if recorder.images.get(layer):
                f_img, f_valid = recorder.images[layer][0]
            else:  # grounding off: the layer's value vectors at the image keys (what the gate would compare)
                values = edit.values[layer]
                gather = positions[..., None].expand(-1, -1, values.shape[-1])
                f_img = F.normalize(values.gather(1, gather).float(), dim=-1)
                f_valid = valid
            result.features[f"L{layer}"] = _pooled(f_img, f_valid)
    for name, values in signals.items():  # NaN past each row's end
        signals[name] = values.float().masked_fill(gen_mask == 0, float("nan")).cpu()
    return result


def _grounding_on(model: nn.Module) -> bool:
    """Whether any grounded layer is enabled (a disabled one records nothing)."""
    return any(getattr(m, META_ATTR).enabled for m in model.modules() if getattr(m, META_ATTR, None) is not None)


def _object_words(model: nn.Module) -> ObjectWords | None:
    """The model's object-word table (:func:`models.word_grounding.set_object_words`), None without one."""
    try:
        return get_object_words(model)
    except ValueError:
        return None


def _word_z(model: nn.Module, recorder: GroundingRecorder) -> Tensor | None:
    """(B, W) candidate-word logits where the model has word scores and an object-word table, else None."""
    words = _object_words(model)
    gates = gate_modules(model)
    if words is None or not gates or any(g.word_proj is None for g in gates.values()):
        return None
    tokens = torch.tensor(words.tokens, device=next(iter(gates.values())).word_proj.weight.device)
    return word_logits(model, recorder, tokens).float().cpu()


def mention_rows(tokenizer: Any, tokens: Sequence[Sequence[int]], image_ids: Sequence[Any], forced: ForcedPass,
                 ground_truth: Mapping[str, Mapping[Any, frozenset[str]]], word_index: Mapping[int, int],
                 attention_layer: int | None = None) -> tuple[list[str], list[dict]]:
    """(captions, one row per object mention) of a batch: for every CHAIR mode of ``ground_truth`` (mode -> image
    id -> objects), the mention's words, category, whether it is present, its first token and every signal there.

    ``word_index`` maps an object-word token id to its column of ``forced.word_z``. With ``attention_layer``, a row
    also carries ``attention``: that layer's attention of the predicting position over the image keys (a list).
    """
    captions, rows = [], []
    for b, (row_tokens, image_id) in enumerate(zip(tokens, image_ids)):
        caption, spans = token_spans(tokenizer, row_tokens)
        captions.append(caption)
        for mode, truth in ground_truth.items():
            for m in align_mentions(caption_mentions(caption, mode), spans):
                if not m.tokens:
                    continue
                rows.append(_mention_row(b, m, mode, image_id, truth, row_tokens, forced, word_index, attention_layer))
    return captions, rows


def _mention_row(b: int, m: ObjectMention, mode: str, image_id: Any, truth: Mapping[Any, frozenset[str]],
                 row_tokens: Sequence[int], forced: ForcedPass, word_index: Mapping[int, int],
                 attention_layer: int | None) -> dict:
    k = m.tokens[0]
    token_id = int(row_tokens[k])
    row = {"image_id": image_id, "mode": mode, "text": m.text, "category": m.category, "start": m.start, "end": m.end,
           "present": m.category in truth[image_id], "token": k, "token_id": token_id, "n_tokens": len(m.tokens)}
    for name, values in forced.signals.items():
        row[name] = float(values[b, k])
    column = word_index.get(token_id)
    row["word_z"] = float(forced.word_z[b, column]) if forced.word_z is not None and column is not None else math.nan
    if attention_layer is not None and attention_layer in forced.attention:
        attn = forced.attention[attention_layer][b, k]
        row["attention"] = attn[~attn.isnan()].tolist()
    return row


class MentionScores(Metric):
    """The grounding score and the present/hallucinated label of every object mention of the validation captions
    (states are concatenated across processes), for the report's grounding diagnostics."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("present", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, present: Tensor) -> None:
        self.scores.append(scores.to(self.device, torch.float64))  # on the metric's device: NCCL gathers there
        self.present.append(present.to(self.device, torch.bool))

    def compute(self) -> tuple[Tensor, Tensor]:
        if not len(self.scores):  # no mention anywhere (a list before a sync, a tensor after)
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        return dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.present).cpu()


def report_signal(word_score: bool) -> str:
    """The report's grounding score of a mention: the candidate-word logit z where the model has word scores,
    else the grounding score G at the mention's first token (mean over grounded layers)."""
    return "word_z" if word_score else "G_own"


def validation_mention_scores(module: Any, batch: dict, new: Tensor) -> tuple[Tensor, Tensor]:
    """(scores, present) of the mentions of one validation batch's captions (``new``: the generated tokens), in the
    module's CHAIR mode against its CHAIR ground truth: one teacher-forced pass, no attention read-out."""
    base = module._base()
    tokens = generated_tokens(new.cpu(), module.eos_token_id(), base.config.image_token_id)
    forced = forced_pass(module.model, model_inputs(batch), tokens, module.tokenizer.pad_token_id,
                         readout=False, features=False)
    words = _object_words(module.model)
    index = {t: j for j, t in enumerate(words.tokens)} if words is not None else {}
    ids = [normalize_image_id(i) for i in batch["image_ids"]]
    _, rows = mention_rows(module.tokenizer, tokens, ids, forced, {module.chair_mode: module.chair.ground_truth}, index)
    signal = report_signal(module.grounding.word_score)
    if signal == "word_z":
        scores = [r["word_z"] for r in rows]
    else:
        scores = [float(torch.tensor([r[k] for k in r if k.startswith("G_own/")]).nanmean()) for r in rows]
    return torch.tensor(scores, dtype=torch.float64), torch.tensor([r["present"] for r in rows], dtype=torch.bool)
