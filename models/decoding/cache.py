"""A KV cache layer that appends in place: ``DynamicLayer`` with spare capacity instead of a concatenation per call.

transformers' ``DynamicLayer.update`` concatenates the whole cache with each new token (``torch.cat``), so a decoding
step copies every cached key and value once more: at batch 32 on the CPU preset of benchmarks/overhead.py that
copy is about half of greedy decoding's time for 128-token captions. ``GrowingLayer`` keeps its keys and values in
buffers with room to spare and returns views of their filled part; a buffer is reallocated (growing by a quarter)
only when full. Everything else that transformers or ``Stream`` does to a layer (``crop``, ``reorder_cache``,
``batch_repeat_interleave``, writing into ``layer.keys``) keeps working: a crop leaves a shorter view of the same
buffer, which the next update appends to; any other replacement of ``keys`` is adopted into a fresh buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

GROWTH = 0.25  # spare capacity, as a share of the length, whenever a buffer is (re)allocated
MIN_SPARE = 32  # positions


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose ``keys``/``values`` are (B, H, S, d) views of (B, H, capacity, d) buffers."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> GrowingLayer:
        """A growing layer holding ``layer``'s keys and values (copied once into buffers)."""
        grown = cls()
        if layer.is_initialized:
            grown.device, grown.is_initialized = layer.device, True
            grown.keys, grown.values = layer.keys, layer.values
        return grown

    def _owns(self) -> bool:
        """Whether ``keys``/``values`` are still prefix views of this layer's buffers."""
        buffers = self._key_buffer, self._value_buffer
        if buffers[0] is None or self.keys is None or self.keys.dim() != 4:
            return False
        return all(view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
                   and view.shape[:2] == buffer.shape[:2] for view, buffer in zip((self.keys, self.values), buffers))

    def _allocate(self, length: int, like_keys: Tensor, like_values: Tensor) -> None:
        """Buffers for ``length`` positions plus spare room, holding the current keys and values."""
        capacity = length + max(MIN_SPARE, int(length * GROWTH))
        n, old_keys, old_values = self.get_seq_length(), self.keys, self.values
        b, h, _, dk = like_keys.shape
        self._key_buffer = like_keys.new_empty(b, h, capacity, dk)
        self._value_buffer = like_values.new_empty(b, h, capacity, like_values.shape[-1])
        if n:
            self._key_buffer[:, :, :n] = old_keys
            self._value_buffer[:, :, :n] = old_values
        self.keys, self.values = self._key_buffer[:, :, :n], self._value_buffer[:, :, :n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append (B, H, T, d) keys and values; returns the (B, H, S + T, d) cache (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        end = n + key_states.shape[-2]
        if not self._owns() or end > self._key_buffer.shape[2]:
            self._allocate(end, key_states, value_states)
        self._key_buffer[:, :, n:end] = key_states
        self._value_buffer[:, :, n:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def grow_in_place(cache: Cache | None) -> None:
    """Make every plain ``DynamicLayer`` of ``cache`` (a decoder-only model's self-attention cache) a
    ``GrowingLayer`` holding the same keys and values; sliding-window and other layer kinds are left as they are."""
    if cache is None or not hasattr(cache, "layers"):
        return
    cache.layers = [GrowingLayer.adopt(layer) if type(layer) is DynamicLayer else layer for layer in cache.layers]
