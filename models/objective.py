"""The training objective::

    L = L_LM(positive) + lambda_grounding * L_grounding + lambda_contrastive * L_contrastive
        + lambda_word * L_word + lambda_negative_lm * L_negative_lm + lambda_presence * L_presence

DESIGN.md section 4. The LM loss is computed on positive captions only. ``L_word`` trains the candidate-word score
(:mod:`models.word_grounding`) against object presence, ``L_presence`` the same labels from pooled image tokens
(:mod:`models.presence`, a control); ``L_negative_lm`` is an LM-side term on negatives at their
first hallucinated word (:func:`negative_lm_loss`). Scores and gate logits come from :class:`models.grounding.GroundingRecorder` (NaN where a
token has no score), labels from the collator (:mod:`datamodules.collate`; ``IGNORE`` = -100 outside targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.labels import IGNORE
from models.grounding import GroundingRecorder

__all__ = ["IGNORE", "ObjectiveConfig", "contrastive_loss", "grounding_loss", "lm_loss", "masked_mean", "nanmean_layers",
           "negative_lm_loss"]


@dataclass
class ObjectiveConfig:
    """Weights and kinds of the grounding terms.

    Args:
        lambda_grounding: weight of ``L_grounding``.
        lambda_contrastive: weight of ``L_contrastive``.
        grounding_loss: ``direct`` (-mean G over caption tokens), ``object`` (-mean G over object words) or
            ``bce`` (BCE of the gate against labels: 1 on grounded object words, 0 on hallucinated ones).
        margin: of ``relu(margin - (mean_obj G(pos) - mean_obj G(neg)))``.
        lambda_word: weight of ``L_word``, the BCE of the candidate-word logits against the image's objects
            (needs ``grounding.word_score`` and instance annotations).
        word_embedding_grad: whether ``L_word`` trains the LM's input embeddings of the object words (its query is
            ``W e_w``); ``false`` holds ``e_w`` constant (a control: does the term act through the embeddings?).
        lambda_negative_lm: weight of ``L_negative_lm`` on the rows that carry a negative caption.
        negative_lm: ``unlikelihood`` (``-log(1 - p(w_neg))`` at the first hallucinated token) or ``margin``
            (``-log sigmoid(log p(x_pos) - log p(x_neg))`` where positive and negative first differ).
        lambda_presence: weight of ``L_presence``, the same BCE as ``L_word`` from a linear head on the image tokens
            at the LM input (:mod:`models.presence`): a control without grounding.
        presence_pool: how that head pools the image tokens: ``mean`` (logits of the mean token) or ``max`` (the
            max over image tokens of each token's logits: a patch must carry the object).
        presence_site: what that head reads: ``lm_input`` (the image tokens the language model receives) or
            ``grounded`` (the image-key features of the deepest grounded layer, those the word score compares with;
            needs ``grounding.enabled``).
    """

    lambda_grounding: float = 0.1
    lambda_contrastive: float = 0.1
    grounding_loss: Literal["direct", "object", "bce"] = "bce"
    margin: float = 0.2
    lambda_word: float = 0.0
    word_embedding_grad: bool = True
    lambda_negative_lm: float = 0.0
    negative_lm: Literal["unlikelihood", "margin"] = "margin"
    lambda_presence: float = 0.0
    presence_pool: Literal["mean", "max"] = "mean"
    presence_site: Literal["lm_input", "grounded"] = "lm_input"

    def __post_init__(self) -> None:
        if self.presence_site not in ("lm_input", "grounded"):
            raise ValueError(f"ObjectiveConfig.presence_site must be lm_input or grounded, got {self.presence_site!r}")
        if self.presence_pool not in ("mean", "max"):
            raise ValueError(f"ObjectiveConfig.presence_pool must be mean or max, got {self.presence_pool!r}")
        if self.grounding_loss not in ("direct", "object", "bce"):
            raise ValueError(f"ObjectiveConfig.grounding_loss must be direct, object or bce, got {self.grounding_loss!r}")
        if self.negative_lm not in ("unlikelihood", "margin"):
            raise ValueError(f"ObjectiveConfig.negative_lm must be unlikelihood or margin, got {self.negative_lm!r}")
        for name in ("lambda_grounding", "lambda_contrastive", "margin", "lambda_word", "lambda_negative_lm",
                     "lambda_presence"):
            if getattr(self, name) < 0:
                raise ValueError(f"ObjectiveConfig.{name} must be >= 0, got {getattr(self, name)}")



def nanmean_layers(recorder: GroundingRecorder, logits: bool = False) -> Tensor:
    """(B, T) mean over grounded layers of the recorded scores (or gate logits) of one forward."""
    read = recorder.forward_logits if logits else recorder.forward_scores
    return torch.stack([read(layer) for layer in recorder.layers]).mean(0)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` (and values defined); 0 with a zero gradient if none."""
    mask = mask & ~values.isnan()
    if not bool(mask.any()):
        return values.nan_to_num(0.0).sum() * 0.0
    return values[mask].mean()


def grounding_loss(kind: str, scores: Tensor, logits: Tensor, labels: Tensor, object_labels: Tensor,
                   neg_logits: Tensor | None, neg_labels: Tensor | None) -> Tensor:
    """L_grounding of a batch: scores/logits (B, T) of the positive pass, labels -100 outside the caption."""
    if kind == "direct":
        return -masked_mean(scores, labels != IGNORE)
    if kind == "object":
        return -masked_mean(scores, object_labels == 1)
    values, targets = [logits[object_labels == 1]], [torch.ones_like(logits[object_labels == 1])]
    if neg_logits is not None and neg_labels is not None:
        keep = neg_labels != IGNORE
        values.append(neg_logits[keep])
        targets.append(neg_labels[keep].to(neg_logits.dtype))
    z, y = torch.cat(values), torch.cat(targets)
    defined = ~z.isnan()
    if not bool(defined.any()):
        return logits.nan_to_num(0.0).sum() * 0.0
    return F.binary_cross_entropy_with_logits(z[defined], y[defined])


def contrastive_loss(pos_scores: Tensor, object_labels: Tensor, neg_scores: Tensor, neg_labels: Tensor,
                     neg_index: Tensor, margin: float) -> Tensor:
    """mean over pairs of relu(margin - (mean G over positive object words - mean G over hallucinated words))."""
    terms = []
    for pair, row in enumerate(neg_index.tolist()):
        pos = pos_scores[row][(object_labels[row] == 1) & ~pos_scores[row].isnan()]
        neg = neg_scores[pair][(neg_labels[pair] == 0) & ~neg_scores[pair].isnan()]
        if pos.numel() and neg.numel():
            terms.append(F.relu(margin - (pos.mean() - neg.mean())))
    if not terms:
        return pos_scores.nan_to_num(0.0).sum() * 0.0
    return torch.stack(terms).mean()


def lm_loss(logits: Tensor, labels: Tensor, reduction: str, shift: bool = True) -> Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) labels (-100 = ignored).

    ``shift``: position t predicts label t + 1 (decoder-only); False for an encoder-decoder's decoder, whose
    labels are already aligned with its logits. ``token``: mean over every target token of the batch (Hugging
    Face's loss). ``sample``: mean over rows of each row's token mean, so a one-word answer weighs as much as a
    long caption; rows without targets drop out.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    logits = logits.float()
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    mask = labels != IGNORE
    if reduction == "token":
        return tokens.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(1)  # (B,)
    rows = counts > 0
    if not bool(rows.any()):
        return tokens.sum() * 0.0
    return (tokens.sum(1)[rows] / counts[rows]).mean()



def negative_lm_loss(logits: Tensor, pos_next: Tensor, neg_next: Tensor, neg_labels: Tensor, kind: str) -> Tensor:
    """LM term of the negative captions at their first hallucinated token; mean over the rows that have one.

    All (N, T) tensors are aligned with the negative pass's logits (N, T, V): position ``j`` predicts
    ``neg_next[j]`` (the negative's next token), ``pos_next[j]`` is the positive caption's next token on the same
    row (same prompt), ``neg_labels[j]`` is 0 where ``neg_next[j]`` is a hallucinated object word. With ``j`` the
    first such position and ``d`` the first position where the two captions' next tokens differ:
    ``unlikelihood`` = ``-log(1 - p(neg_next[j]))``; ``margin`` = ``-log sigmoid(log p(pos_next[d]) - log
    p(neg_next[d]))`` (both tokens predicted from the shared prefix), for rows with ``d <= j``.
    """
    width = min(pos_next.shape[1], neg_next.shape[1])
    terms = []
    for r in range(neg_next.shape[0]):
        hallucinated = (neg_labels[r] == 0).nonzero().flatten()
        if not len(hallucinated):
            continue
        j = int(hallucinated[0])
        if kind == "unlikelihood":
            p = torch.softmax(logits[r, j].float(), -1)[neg_next[r, j]]
            terms.append(-torch.log1p(-p.clamp(max=1 - 1e-6)))
            continue
        differ = (pos_next[r, :width] != neg_next[r, :width]).nonzero().flatten()
        if not len(differ) or int(differ[0]) > j:
            continue
        d = int(differ[0])
        log_p = torch.log_softmax(logits[r, d].float(), -1)
        terms.append(-F.logsigmoid(log_p[pos_next[r, d]] - log_p[neg_next[r, d]]))
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).mean()


def check_objective(grounding, objective: ObjectiveConfig) -> None:
    """Objective terms that need what the grounding config does not provide are errors naming the settings."""
    if not grounding.enabled and (objective.lambda_grounding or objective.lambda_contrastive or objective.lambda_word):
        raise ValueError(
            "model.grounding.enabled is false but model.objective.lambda_grounding/lambda_contrastive/lambda_word "
            "is non-zero: the grounding terms would be computed from inert gates; set those lambdas to 0"
        )
    if objective.lambda_presence and objective.presence_site == "grounded" and not grounding.enabled:
        raise ValueError("model.objective.presence_site grounded reads the grounded layer's image keys: set "
                         "model.grounding.enabled true (or presence_site lm_input)")
    if objective.lambda_word and not grounding.word_score:
        raise ValueError("model.objective.lambda_word > 0 trains the candidate-word score: set "
                         "model.grounding.word_score true (or lambda_word 0)")
