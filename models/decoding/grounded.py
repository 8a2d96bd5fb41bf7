"""Grounding-guided decoding: object-word candidates re-scored by their candidate-word grounding score.

At every step (greedy), for each object-word token ``w`` of the model's table (:mod:`models.word_grounding`)::

    score[w] = logit[w] + weight * logsigmoid(z[w])          z: candidate-word logits of the row's image

and, with ``threshold > 0``, ``score[w] = -inf`` where ``sigmoid(z[w]) < threshold`` (the object is not named:
abstention). ``z`` is computed once per row from the prefill's image keys, so the cost over greedy is one
(B, W, P) cosine per grounded layer. ``weight = 0`` and ``threshold = 0`` is greedy, token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.decoding.search import greedy_search
from models.decoding.settings import GroundedSettings
from models.decoding.stream import Stream, prompt_image_mask, unwrap
from models.grounding import GroundingRecorder


@torch.no_grad()
def grounded(model, inputs: dict, settings: GroundedSettings, *, max_new_tokens: int, pad_token_id: int,
             eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """Greedy decoding with object-word logits moved by ``weight * logsigmoid(z)`` (see module docstring)."""
    from models.backbones import grounding_config
    from models.word_grounding import get_object_words, word_logits

    model = unwrap(model)
    config = getattr(model, "_grounding_config", None)
    if config is None or not config.enabled or not config.word_score:
        raise ValueError(
            "generation.method grounded needs a grounded model with candidate-word scores: set "
            "model.grounding.enabled true and model.grounding.word_score true (and train them with "
            "model.objective.lambda_word), or choose another generation.method"
        )
    grounding_config(model)
    tokens, _ = get_object_words(model).tensors(inputs["input_ids"].device)
    recorder = GroundingRecorder()
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), recorder=recorder)
    shift: list[Tensor] = []

    def score(outs, step):
        logits = outs[0].logits
        if not shift:  # after the prefill: the image keys are recorded
            z = word_logits(model, recorder, tokens).to(logits.dtype)  # (N, W)
            delta = settings.weight * F.logsigmoid(z)
            if settings.threshold > 0:
                delta = delta.masked_fill(torch.sigmoid(z) < settings.threshold, float("-inf"))
            shift.append(delta)
        if settings.weight == 0 and settings.threshold == 0:
            return logits
        return logits.index_add(1, tokens, shift[0])

    return greedy_search([stream], score, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)
