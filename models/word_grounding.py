"""Candidate-word grounding: a score for an object word against the image, known before the word is emitted.

The grounded layer's score ``G[t]`` is computed at a token's own position, so it can only act on what follows a
word, never on whether the word is written. The candidate-word score asks the image about the word itself. For a
grounded layer ``l`` with ``GroundingConfig.word_score``, an object-word token ``w`` and a row's image keys ``P``::

    S_l[w] = max_{p in P} cos(W_l e_w, f_p)        e_w: the LM's input embedding of w; f_p: image-key feature
    z[w]   = mean_l (word_scale_l * S_l[w] + word_bias_l)                       (B, W) word logits

Training (``objective.lambda_word``): BCE of ``z`` against "the word's category is in the image" (instance
annotations), for every object word of the dataset's categories in every training image. The image keys must then
carry which objects are present, where the language model reads them. Decoding (``generation.method: grounded``):
object-word logits get ``weight * logsigmoid(z[w])`` (:mod:`models.decoding.logits`).

Object words: the first token of every caption noun of a category (the CHAIR synonym table: singular and plural);
a first token shared by two categories is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import _unwrap, gate_modules
from models.grounding import GroundingRecorder

__all__ = ["ObjectWords", "object_words", "set_object_words", "get_object_words", "word_logits", "word_loss"]

OBJECT_WORDS_ATTR = "_grounding_object_words"


@dataclass(frozen=True)
class ObjectWords:
    """Object-word tokens of a tokenizer: ``tokens[i]`` is a first token of a noun of ``categories[category[i]]``."""

    categories: tuple[str, ...]
    tokens: tuple[int, ...]
    category: tuple[int, ...]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(W,) token ids and (W,) category indices."""
        return (torch.tensor(self.tokens, dtype=torch.long, device=device),
                torch.tensor(self.category, dtype=torch.long, device=device))


def _nouns(category: str) -> list[str]:
    from metrics.coco_objects import get_parser

    synonyms = get_parser("reference").synonyms
    return list(dict.fromkeys([category] + sorted(w for w, node in synonyms.items() if node == category)))


def object_words(tokenizer: Any, categories: Sequence[str]) -> ObjectWords:
    """The object-word table of ``tokenizer`` for ``categories`` (COCO names).

    A noun contributes the token that starts it after a space ("a knife" -> the token of " knife"), for its
    singular and plural form, if that token spells at least two letters of the noun (a bare space marker or a
    single letter is no word).
    """
    from metrics.english import pluralize

    if not categories:
        raise ValueError("object_words needs the dataset's object categories (none given)")
    lead = len(tokenizer("a", add_special_tokens=False)["input_ids"])
    owner: dict[int, set[int]] = {}
    for c, name in enumerate(categories):
        for noun in _nouns(name):
            for form in dict.fromkeys((noun, pluralize(noun))):
                ids = tokenizer(f"a {form}", add_special_tokens=False)["input_ids"]
                if len(ids) <= lead:
                    continue
                piece = tokenizer.decode([ids[lead]]).strip().lower()
                if len(piece) >= 2 and form.lower().startswith(piece):
                    owner.setdefault(ids[lead], set()).add(c)
    tokens = sorted(t for t, cats in owner.items() if len(cats) == 1)
    if not tokens:
        raise ValueError(f"the tokenizer has no object-word token for any of the categories {list(categories)[:5]}...")
    return ObjectWords(tuple(categories), tuple(tokens), tuple(next(iter(owner[t])) for t in tokens))


def set_object_words(model: nn.Module, words: ObjectWords) -> None:
    """Attach the object-word table to a grounded model (read by the word loss and ``grounded`` decoding)."""
    setattr(_unwrap(model), OBJECT_WORDS_ATTR, words)


def get_object_words(model: nn.Module) -> ObjectWords:
    words = getattr(_unwrap(model), OBJECT_WORDS_ATTR, None)
    if words is None:
        raise ValueError(
            "the model has no object-word table: call models.word_grounding.set_object_words(model, "
            "object_words(tokenizer, categories)) (GroundedVLM does it from the datamodule's categories)"
        )
    return words


def word_logits(model: nn.Module, recorder: GroundingRecorder, tokens: Tensor, embedding_grad: bool = True) -> Tensor:
    """(B, W) candidate-word logits ``z``: mean over grounded layers, from the image keys ``recorder`` holds.

    ``recorder`` must have seen one forward pass (training) or a prefill (decoding) of the grounded model. With
    ``embedding_grad=False`` no gradient reaches the LM's input embeddings of the words (``e_w`` is a constant).
    """
    gates = gate_modules(model)
    if not gates or any(g.word_proj is None for g in gates.values()):
        raise ValueError("candidate-word scores need model.grounding.word_score: true (the gates have no word_proj)")
    embeddings = _unwrap(model).get_input_embeddings().weight[tokens]  # (W, E)
    if not embedding_grad:
        embeddings = embeddings.detach()
    out = []
    for name, gate in gates.items():
        layer = int(name.removeprefix("layer"))
        if not recorder.images.get(layer):
            raise RuntimeError(f"grounded layer {layer} recorded no image keys: run the model with the recorder first")
        f_img, valid = recorder.images[layer][0]  # (B, P, D) normalised, (B, P)
        query = F.normalize(gate.word_proj(embeddings.to(gate.word_proj.weight.dtype)).float(), dim=-1)  # (W, D)
        cos = torch.einsum("bpd,wd->bwp", f_img.float(), query).masked_fill(~valid[:, None, :], -2.0)
        out.append(gate.word_scale.float() * cos.amax(-1) + gate.word_bias.float())  # (B, W)
    return torch.stack(out).mean(0)


def word_loss(z: Tensor, presence: Tensor, category: Tensor, known: Tensor | None = None) -> Tensor:
    """Mean BCE of (B, W) word logits against (B, C) bool object presence at each word's category, over the
    rows whose presence is ``known`` (B,) (all by default); 0 with a zero gradient if none is."""
    if known is not None:
        z, presence = z[known], presence[known]
    if not z.numel():
        return z.sum() * 0.0
    return F.binary_cross_entropy_with_logits(z, presence[:, category].to(z.dtype))
