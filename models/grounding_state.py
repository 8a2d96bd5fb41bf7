"""Per-call data of the grounded attention layers (:mod:`models.grounding`).

``GroundingState`` carries one forward call's image positions (and what the layers share within the call: the
image-key index, cached image features); ``GroundingRecorder`` collects what the layers compute (scores, gate
logits, image-key features). Both reach the layers as forward keyword arguments or, inside ``generate()``,
through the context variables defined here.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GroundingRecorder", "GroundingState"]


class GroundingRecorder:
    """Collects grounding scores: per grounded layer, one (batch, query length) tensor per attention call.

    Scores are NaN where undefined (image tokens, text before any image). Use it as a forward keyword
    argument (``model(**inputs, grounding_scores=rec)``, safe under gradient checkpointing) or as a context
    manager around ``generate()`` (``with rec: model.generate(...)``).
    """

    def __init__(self) -> None:
        self.calls: dict[int, list[Tensor]] = {}
        self.logits: dict[int, list[Tensor]] = {}  # gate logits scale * G + bias, NaN where undefined
        self.images: dict[int, list[tuple[Tensor, Tensor]]] = {}  # per call: (B, P, D) image-key features, (B, P) valid
        self._token: contextvars.Token | None = None

    def add(self, layer: int, scores: Tensor, logits: Tensor) -> None:
        self.calls.setdefault(layer, []).append(scores)
        self.logits.setdefault(layer, []).append(logits)

    @property
    def layers(self) -> list[int]:
        return sorted(self.calls)

    def __getitem__(self, layer: int) -> list[Tensor]:
        return self.calls[layer]

    def clear(self) -> None:
        self.calls.clear()
        self.logits.clear()
        self.images.clear()

    def forward_scores(self, layer: int) -> Tensor:
        """The (B, T) scores of a single forward pass."""
        return self._single(self.calls, layer)

    def forward_logits(self, layer: int) -> Tensor:
        """The (B, T) gate logits of a single forward pass."""
        return self._single(self.logits, layer)

    @staticmethod
    def _single(store: dict[int, list[Tensor]], layer: int) -> Tensor:
        calls = store[layer]
        if len(calls) != 1:
            raise RuntimeError(f"layer {layer} was called {len(calls)} times; use sequence_scores() for generate()")
        return calls[0]

    def sequence_scores(self, layer: int, beam_indices: Tensor | None = None) -> Tensor:
        """Scores of every position fed to the model during ``generate()``: (N, prompt + new tokens - 1).

        Position ``j`` is the score of token ``j`` of the returned sequence as a query. With beam search pass
        ``generate(..., return_dict_in_generate=True).beam_indices`` to follow each returned beam's ancestry.
        """
        steps = self.calls[layer]
        if beam_indices is None:
            return torch.cat(steps, dim=1)
        prefill, decode = steps[0], steps[1:]
        n, width = beam_indices.shape
        out = torch.full((n, prefill.shape[1] + len(decode)), float("nan"), dtype=prefill.dtype, device=prefill.device)
        first = beam_indices[:, 0].clamp_min(0)
        out[:, : prefill.shape[1]] = prefill[first]
        for s, step in enumerate(decode, start=1):
            if s >= width:
                break
            slot = beam_indices[:, s]
            alive = slot >= 0
            out[alive, prefill.shape[1] + s - 1] = step[slot[alive], 0]
        return out

    def __enter__(self) -> "GroundingRecorder":
        self._token = _ACTIVE_RECORDER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_RECORDER.reset(self._token)
        self._token = None


@dataclass
class GroundingState:
    """Per-call inputs of the grounded layers, and what they share within the call.

    ``image_mask`` is (B0, L) bool over the sequence the language model attends to (for encoder-decoder models:
    the encoder sequence). ``B`` may be a multiple of ``B0`` (beams / returned sequences, expanded with
    repeat_interleave as ``generate()`` does) and keys may extend past ``L`` (generated tokens are text).
    """

    image_mask: Tensor | None
    recorder: GroundingRecorder | None = None
    recording: bool = True
    _index: dict = field(default_factory=dict, repr=False)  # batch -> (positions, valid)
    _features: dict = field(default_factory=dict, repr=False)  # layer -> normalised image features (inference)

    def _mask(self, batch: int, device: torch.device) -> Tensor:
        mask = self.image_mask
        if mask is None:
            raise RuntimeError(
                "a grounded attention layer ran without image positions: call the model through its forward/"
                "generate with input_ids (image placeholder tokens locate the image), or pass grounding=GroundingState"
            )
        mask = mask.to(device)
        if mask.shape[0] != batch:
            if batch % mask.shape[0]:
                raise RuntimeError(f"grounding image mask has batch {mask.shape[0]}, attention has batch {batch}")
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        return mask

    def key_mask(self, batch: int, key_len: int, device: torch.device) -> Tensor:
        """(B, S) bool image keys: expanded to the call's batch, generated positions padded with False."""
        mask = self._mask(batch, device)
        if mask.shape[1] > key_len:
            raise RuntimeError(
                f"grounding image mask covers {mask.shape[1]} positions but attention sees only {key_len} keys "
                "(sliding-window or truncated caches are not supported by grounded layers)"
            )
        return F.pad(mask, (0, key_len - mask.shape[1]), value=False)

    def image_index(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, P) positions of each row's image keys in order (padded to the longest row) and (B, P) validity."""
        if batch not in self._index:
            mask = self._mask(batch, device)
            counts = mask.sum(dim=1)
            p = int(counts.max())
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :p]
            self._index[batch] = (order, torch.arange(p, device=device)[None, :] < counts[:, None])
        return self._index[batch]


_ACTIVE_STATE: contextvars.ContextVar[GroundingState | None] = contextvars.ContextVar("grounding_state", default=None)
_ACTIVE_RECORDER: contextvars.ContextVar[GroundingRecorder | None] = contextvars.ContextVar(
    "grounding_recorder", default=None
)
