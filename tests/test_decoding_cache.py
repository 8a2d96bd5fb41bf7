"""``GrowingLayer`` (models/decoding/cache.py) against transformers' ``DynamicLayer``: the same keys and values after
any sequence of what decoding does to a cache layer, appended in place while there is room."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from models.decoding.cache import GrowingLayer, grow_in_place
from models.tiny import tiny_inputs, tiny_llava


def _kv(g: torch.Generator, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, tokens, 4, generator=g), torch.randn(batch, 2, tokens, 3, generator=g)


def test_growing_layer_equals_dynamic_layer_under_every_operation() -> None:
    g = torch.Generator().manual_seed(0)
    ref, ours = DynamicLayer(), GrowingLayer()
    batch = 3
    steps = [("update", 40), ("update", 1), ("update", 3), ("crop", 3), ("update", 1), ("write", None),
             ("reorder", None), ("update", 1), ("repeat", 2), ("update", 2), ("crop", 1)] + [("update", 1)] * 60
    for op, arg in steps:
        if op == "update":
            keys, values = _kv(g, batch, arg)
            out_ref, out = ref.update(keys, values), ours.update(keys, values)
            torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        elif op == "crop":
            ref.crop(-arg), ours.crop(-arg)
        elif op == "write":  # what Stream._write_rows does to a rolled-back row
            for layer in (ref, ours):
                layer.keys[1] = 0.5
                layer.values[1, :, :7] = -1.0
        elif op == "reorder":
            index = torch.tensor([2, 0, 0])
            ref.reorder_cache(index), ours.reorder_cache(index)
        else:
            ref.batch_repeat_interleave(arg), ours.batch_repeat_interleave(arg)
            batch *= arg
        assert ours.get_seq_length() == ref.get_seq_length(), (op, arg)
        torch.testing.assert_close((ours.keys, ours.values), (ref.keys, ref.values), rtol=0, atol=0)


def test_growing_layer_appends_without_copying_while_it_has_room() -> None:
    g = torch.Generator().manual_seed(0)
    layer = GrowingLayer()
    layer.update(*_kv(g, 2, 100))  # room for max(32, 100 / 4) more
    buffer = layer.keys.data_ptr()
    for _ in range(32):
        layer.update(*_kv(g, 2, 1))
        assert layer.keys.data_ptr() == buffer  # the same storage: no reallocation, no concatenation
    layer.update(*_kv(g, 2, 1))
    assert layer.keys.data_ptr() != buffer and layer.get_seq_length() == 133


def test_grow_in_place_keeps_a_models_cache_and_its_outputs() -> None:
    """A prefill's DynamicCache made growing decodes the next token exactly like the untouched cache."""
    torch.manual_seed(0)
    model = tiny_llava().eval()
    inputs = tiny_inputs(model, batch=2)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        assert isinstance(cache, DynamicCache)
        plain = DynamicCache(config=model.config)
        for layer, source in zip(plain.layers, cache.layers):
            layer.update(source.keys.clone(), source.values.clone())
        grow_in_place(cache)
        assert all(type(layer) is GrowingLayer for layer in cache.layers)
        token = torch.full((2, 1), 7)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        for _ in range(3):
            ours = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            ref = model(input_ids=token, attention_mask=mask, cache=plain, use_cache=True)
            torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=0)
            token, mask = ours.logits[:, -1:].argmax(-1), torch.cat([mask, torch.ones_like(token)], dim=1)
