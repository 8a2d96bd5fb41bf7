"""Collation of rows into model inputs with the backbone's processor (decoder-only and encoder-decoder layouts)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.labels import IGNORE, token_labels


class Collator:
    """Builds model inputs with the backbone's processor.

    ``train``, decoder-only: right-padded ``prompt + target + eos`` with LM labels on the target only and
    object-token labels (1 = grounded object word) on the positions whose input is that word. Encoder-decoder
    (``decoder_start_token_id`` set: BLIP-2 / InstructBLIP with Flan-T5): the prompt is the encoder input, the
    labels are ``target + eos`` and the decoder input is the target shifted right behind the start token, so
    object labels sit on the decoder positions whose input is the word, as in the decoder-only layout. Rows
    with a negative add ``neg_*`` inputs (the negative caption in the same layout; the model inputs the
    negative pass shares with the positive one are taken at ``neg_index``) with 1/0 labels (grounded /
    hallucinated object words). With ``categories`` and ``presence`` (image id -> categories shown), training batches
    also carry ``object_presence`` (B, C) and ``object_presence_known`` (B,). ``generate``: left-padded prompts.
    """

    def __init__(self, processor: Any, mode: str, decoder_start_token_id: int | None = None,
                 categories: Sequence[str] = (), presence: Mapping[int, frozenset[str]] | None = None) -> None:
        self.processor, self.mode, self.decoder_start = processor, mode, decoder_start_token_id
        self.categories, self.presence = tuple(categories), presence
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _prompts(self, rows: Sequence[dict]) -> tuple[list[list[int]], Tensor, dict]:
        self.tokenizer.padding_side = "right"
        enc = self.processor(images=[r["pixels"] for r in rows], text=[r["prompt"] for r in rows], return_tensors=None)
        ids = [list(x) for x in enc["input_ids"]]
        pixel_values = torch.as_tensor(np.stack(enc["pixel_values"]))
        extra = {k: self._extra(k, v) for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        return ids, pixel_values, extra

    def _extra(self, key: str, value: Any) -> Tensor:
        """Further processor outputs; ragged ones (InstructBLIP's Q-Former prompt) right-padded."""
        if not isinstance(value, list) or not value or not isinstance(value[0], (list, tuple)):
            return torch.as_tensor(np.asarray(value))
        if key.endswith("attention_mask"):
            fill = 0
        else:
            qformer = getattr(self.processor, "qformer_tokenizer", None)
            tokenizer = qformer if key.startswith("qformer") and qformer is not None else self.tokenizer
            fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return self._pad([list(v) for v in value], fill)

    def _target(self, text: str, grounded: Sequence, hallucinated: Sequence) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [self.tokenizer.eos_token_id]
        offsets = list(enc["offset_mapping"]) + [(0, 0)]
        labels = token_labels(offsets, [tuple(s) for s in grounded], [tuple(s) for s in hallucinated])
        return ids, labels

    def _pad(self, seqs: list[list[int]], value: int) -> Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def _mask(self, seqs: list[list[int]]) -> Tensor:
        return self._pad([[1] * len(s) for s in seqs], 0)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        return self.train(rows) if self.mode == "train" else self.generate(rows)

    def train(self, rows: Sequence[dict]) -> dict[str, Any]:
        prompts, pixel_values, extra = self._prompts(rows)
        targets, objects, negatives, neg_objects, neg_index = [], [], [], [], []
        for i, row in enumerate(rows):
            target, labels = self._target(row["target"], row.get("pos_spans") or [], [])
            targets.append(target)
            objects.append(labels)
            if row.get("neg_text"):
                neg, labels = self._target(row["neg_text"], row["neg_grounded"], row["neg_hallucinated"])
                negatives.append(neg)
                neg_objects.append(labels)
                neg_index.append(i)
        layout = self._decoder_only if self.decoder_start is None else self._encoder_decoder
        batch = {**layout(prompts, targets, objects), "pixel_values": pixel_values, **extra}
        if self.presence is not None and self.categories:  # labels of the candidate-word score (B, C), rows known (B,)
            shown = [self.presence.get(r.get("image_id", -1)) for r in rows]
            batch["object_presence"] = torch.tensor([[c in (names or ()) for c in self.categories] for names in shown])
            batch["object_presence_known"] = torch.tensor([names is not None for names in shown])
        if negatives:
            inputs = layout([prompts[i] for i in neg_index], negatives, neg_objects)
            batch["neg_object_labels"] = inputs.pop("object_labels")
            inputs.pop("labels")
            if self.decoder_start is not None:  # the encoder input is the positive row's: taken at neg_index
                inputs.pop("input_ids"), inputs.pop("attention_mask")
            batch.update({f"neg_{k}": v for k, v in inputs.items()})
            batch["neg_index"] = torch.tensor(neg_index, dtype=torch.long)
        return batch

    def _decoder_only(self, prompts: list[list[int]], targets: list[list[int]], objects: list[list[int]]) -> dict[str, Tensor]:
        ids = [p + t for p, t in zip(prompts, targets)]
        return {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._mask(ids),
            "labels": self._pad([[IGNORE] * len(p) + t for p, t in zip(prompts, targets)], IGNORE),
            "object_labels": self._pad([[IGNORE] * len(p) + o for p, o in zip(prompts, objects)], IGNORE),
        }

    def _encoder_decoder(self, prompts: list[list[int]], targets: list[list[int]], objects: list[list[int]]) -> dict[str, Tensor]:
        decoder = [[self.decoder_start] + t[:-1] for t in targets]  # decoder input j is target token j - 1
        return {
            "input_ids": self._pad(prompts, self.pad_id),
            "attention_mask": self._mask(prompts),
            "decoder_input_ids": self._pad(decoder, self.pad_id),
            "decoder_attention_mask": self._mask(decoder),
            "labels": self._pad(targets, IGNORE),
            "object_labels": self._pad([[IGNORE] + o[:-1] for o in objects], IGNORE),
        }

    def generate(self, rows: Sequence[dict]) -> dict[str, Any]:
        prompts, pixel_values, extra = self._prompts(rows)
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            **extra,
            "image_ids": [r["image_id"] for r in rows],
            "question_ids": [r.get("question_id", -1) for r in rows],
            "targets": [r["target"] for r in rows],
        }


def decoder_start_token_id(source: str) -> int | None:
    """The decoder start token if ``source`` (a processor's hub id or directory) holds an encoder-decoder
    backbone's config (BLIP-2 / InstructBLIP with Flan-T5); None for decoder-only or where there is no config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None  # a processor-only directory: GroundedVLM rejects the batch if its model is encoder-decoder
    text = config.get_text_config()
    if not getattr(text, "is_encoder_decoder", False):
        return None
    start = text.decoder_start_token_id if text.decoder_start_token_id is not None else text.pad_token_id
    if start is None:
        raise ValueError(f"{source}: encoder-decoder config without decoder_start_token_id or pad_token_id")
    return int(start)

