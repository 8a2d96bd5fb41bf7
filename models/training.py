"""One training step of :class:`models.module.GroundedVLM`: the batch split into model inputs, the LM loss, and every
other term of the objective (:mod:`models.objective`) with the forward passes they need (negative captions, the
candidate-word table, the presence control's captured image tokens). Also the learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.grounding import GroundingRecorder
from models.objective import contrastive_loss, grounding_loss, lm_loss, masked_mean, nanmean_layers, negative_lm_loss
from models.presence import capture_lm_inputs, grounded_presence_logits, presence_logits
from models.word_grounding import word_logits, word_loss

if TYPE_CHECKING:
    from models.module import GroundedVLM

__all__ = ["lr_factor", "model_inputs", "negative_inputs", "object_presence", "objective_terms", "training_loss"]

# batch keys the collator adds for the objective and the metrics, never passed to the model
_NOT_INPUTS = {"labels", "object_labels", "image_ids", "question_ids", "targets", "object_presence",
               "object_presence_known"}


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def model_inputs(batch: dict) -> dict:
    """The batch's model inputs: without labels, ids, targets and the negative captions (``neg_*``)."""
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS and not k.startswith("neg_")}


def negative_inputs(batch: dict, encoder_decoder: bool, full_logits: bool = False) -> dict:
    """Inputs of the negative captions: the positive rows' at ``neg_index``, replaced by every ``neg_*`` input.

    Only the grounding scores are used unless ``full_logits`` (the LM term on negatives)."""
    index = batch["neg_index"]
    inputs = {k: v[index] for k, v in model_inputs(batch).items()}
    inputs.update({k[4:]: v for k, v in batch.items() if k.startswith("neg_") and k not in ("neg_index", "neg_object_labels")})
    if not encoder_decoder and not full_logits:
        inputs["logits_to_keep"] = 1
    return inputs


def object_presence(batch: dict, setting: str) -> Tensor:
    """(B, C) presence labels of the batch; a clear error naming ``setting`` where the data has none."""
    if "object_presence" not in batch:
        raise ValueError(
            f"model.objective.{setting} needs object presence labels in the batch: the training data must come "
            "from COCO-format instance annotations (data.coco_dir or data.world), not data.pairs_file"
        )
    return batch["object_presence"]


def training_loss(module: GroundedVLM, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """The step's loss and what it logs (``train/lm``, each other term, ``train/loss``)."""
    if module.encoder_decoder and "decoder_input_ids" not in batch:
        raise ValueError(
            f"model.backbone {module.backbone} is an encoder-decoder (Flan-T5) but the batch has no decoder inputs: "
            "data.init_args.processor must name the backbone's hub id or a directory that also holds its "
            "config.json, so the collator builds the encoder-decoder layout"
        )
    rec = GroundingRecorder() if module.grounding.enabled else None
    extra = {"grounding_scores": rec} if rec is not None else {}
    head = module.presence_head
    at_input = head is not None and module.objective.presence_site == "lm_input"
    capture = capture_lm_inputs(module._base()) if at_input else contextlib.nullcontext({})
    with capture as captured:
        if module.lm_loss_reduction == "token":
            loss = module.model(**model_inputs(batch), labels=batch["labels"], **extra).loss
        else:
            out = module.model(**model_inputs(batch), **extra)
            loss = lm_loss(out.logits, batch["labels"], module.lm_loss_reduction, shift=not module.encoder_decoder)
    logs = {"train/lm": loss.detach()}
    loss = loss + objective_terms(module, batch, rec, logs)
    if head is not None:
        presence = object_presence(batch, "lambda_presence")
        logits = (presence_logits(head, captured, module._base(), batch["input_ids"]) if at_input
                  else grounded_presence_logits(head, rec))  # (B, C)
        every = torch.arange(presence.shape[1], device=presence.device)  # word_loss with one "word" per category
        l_p = word_loss(logits, presence, every, batch.get("object_presence_known"))
        loss = loss + module.objective.lambda_presence * l_p
        logs["train/presence"] = l_p.detach()
    logs["train/loss"] = loss.detach()
    return loss, logs


def objective_terms(module: GroundedVLM, batch: dict, rec: GroundingRecorder | None, logs: dict) -> Tensor | float:
    """Every term of the objective besides the LM loss and the presence control; fills ``logs``."""
    obj, total = module.objective, 0.0
    lam_g, lam_c = obj.lambda_grounding, obj.lambda_contrastive
    wants_negatives = (rec is not None and (lam_c or (lam_g and obj.grounding_loss == "bce"))) or obj.lambda_negative_lm
    neg_rec = neg_out = None
    if wants_negatives and "neg_index" in batch:
        neg_rec = GroundingRecorder() if rec is not None else None
        neg_out = module.model(**negative_inputs(batch, module.encoder_decoder, full_logits=bool(obj.lambda_negative_lm)),
                               **({"grounding_scores": neg_rec} if neg_rec is not None else {}))
    if rec is not None and (lam_g or lam_c):
        scores, logits = nanmean_layers(rec), nanmean_layers(rec, logits=True)
        neg_scores = neg_logits = None
        if neg_rec is not None and (lam_c or obj.grounding_loss == "bce"):
            neg_scores, neg_logits = nanmean_layers(neg_rec), nanmean_layers(neg_rec, logits=True)
        l_g = grounding_loss(obj.grounding_loss, scores, logits, batch["labels"],
                             batch["object_labels"], neg_logits, batch.get("neg_object_labels"))
        total = total + lam_g * l_g
        logs["train/grounding"] = l_g.detach()
        if neg_scores is not None:
            l_c = contrastive_loss(scores, batch["object_labels"], neg_scores, batch["neg_object_labels"],
                                   batch["neg_index"], obj.margin)
            total = total + lam_c * l_c
            logs["train/contrastive"] = l_c.detach()
        logs["train/score_objects"] = masked_mean(scores.detach(), batch["object_labels"] == 1)
    if obj.lambda_word:
        presence = object_presence(batch, "lambda_word")
        tokens, category = module.object_words().tensors(presence.device)
        z = word_logits(module._base(), rec, tokens, embedding_grad=obj.word_embedding_grad)  # (B, W)
        l_w = word_loss(z, presence, category, batch.get("object_presence_known"))
        total = total + obj.lambda_word * l_w
        logs["train/word"] = l_w.detach()
    if obj.lambda_negative_lm and neg_out is not None:
        key = "decoder_input_ids" if module.encoder_decoder else "input_ids"
        pos, neg = batch[key][batch["neg_index"]], batch[f"neg_{key}"]
        l_n = negative_lm_loss(neg_out.logits[:, :-1], pos[:, 1:], neg[:, 1:], batch["neg_object_labels"][:, 1:],
                               obj.negative_lm)
        total = total + obj.lambda_negative_lm * l_n
        logs["train/negative_lm"] = l_n.detach()
    return total
