"""add_grounding on every supported backbone: identity when disabled, generation, padding, errors, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import (
    GroundingConfig,
    GroundingRecorder,
    add_grounding,
    load_grounding,
    save_grounding,
    set_grounding_enabled,
)
from models.tiny import IMAGE_TOKEN_ID, TINY_FACTORIES, tiny_inputs

BACKBONES = list(TINY_FACTORIES)
DECODER_ONLY = ["llava", "llava_next", "blip2_opt", "instructblip_llama"]
ENC_DEC = ["blip2_t5", "instructblip_t5"]


def _build(name: str, seed: int = 0, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(untouched, grounded) copies of the same random model."""
    torch.manual_seed(seed)
    plain = TINY_FACTORIES[name]().eval()
    torch.manual_seed(seed)
    grounded = TINY_FACTORIES[name]().eval()
    grounded.load_state_dict(plain.state_dict())
    add_grounding(grounded, GroundingConfig(**config))
    return plain, grounded


@pytest.mark.parametrize("name", BACKBONES)
def test_disabled_equals_untouched_enabled_differs(name: str) -> None:
    plain, grounded = _build(name, layers=[-2, -1], enabled=False)
    inputs = tiny_inputs(plain)
    with torch.no_grad():
        ref = plain(**inputs).logits
        off = grounded(**inputs).logits
        set_grounding_enabled(grounded, True)
        on = grounded(**inputs).logits
    assert (off - ref).abs().max() <= 1e-6
    assert (on - ref).abs().max() > 1e-4


def _expand(inputs: dict, n: int) -> dict:
    return {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}


def _forward_scores(model, inputs: dict, sequences: torch.Tensor, layer: int) -> torch.Tensor:
    """Scores of an uncached forward pass over the generated sequences."""
    rec = GroundingRecorder()
    n = sequences.shape[0] // inputs["input_ids"].shape[0]
    full = _expand({k: v for k, v in inputs.items() if k != "decoder_input_ids"}, n)
    if model.config.is_encoder_decoder or getattr(model.config.text_config, "is_encoder_decoder", False):
        full["decoder_input_ids"] = sequences
    else:
        extra = sequences.shape[1] - full["input_ids"].shape[1]
        full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones(sequences.shape[0], extra).long()], 1)
        full["input_ids"] = sequences
    with torch.no_grad():
        model(**full, grounding_scores=rec)
    return rec.forward_scores(layer)


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, num_return_sequences=2),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", list(GENERATION_MODES))
@pytest.mark.parametrize("name", ["llava", "blip2_opt", "instructblip_t5"])
def test_cached_generate_scores_equal_uncached_forward(name: str, mode: str) -> None:
    _, model = _build(name, layers=[-1], score="attention_weighted")
    inputs = tiny_inputs(model, left_pad=[0, 2])
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    rec = GroundingRecorder()
    torch.manual_seed(1)
    with rec, torch.no_grad():
        out = model.generate(
            **gen_inputs, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
            return_dict_in_generate=True, **GENERATION_MODES[mode],
        )
    layer = rec.layers[0]
    beam_indices = out.beam_indices if mode == "beam" else None
    cached = rec.sequence_scores(layer, beam_indices)  # (N, len - 1)
    reference = _forward_scores(model, inputs, out.sequences, layer)[:, :-1]
    assert cached.shape == reference.shape
    assert (~reference.isnan()).sum() >= out.sequences.shape[0] * 6
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["llava", "blip2_opt", "instructblip_llama"])
@pytest.mark.parametrize("feature", ["value", "hidden"])
def test_left_padded_row_equals_unpadded(name: str, feature: str) -> None:
    _, model = _build(name, layers=[-2, -1], feature=feature)
    pad = 2
    inputs = tiny_inputs(model, left_pad=[0, pad])
    single = {k: v[1:2] for k, v in inputs.items()}
    single["input_ids"] = single["input_ids"][:, pad:]
    single["attention_mask"] = single["attention_mask"][:, pad:]
    rec_b, rec_1 = GroundingRecorder(), GroundingRecorder()
    with torch.no_grad():
        batched = model(**inputs, grounding_scores=rec_b).logits[1, pad:]
        alone = model(**single, grounding_scores=rec_1).logits[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    for layer in rec_b.layers:
        torch.testing.assert_close(
            rec_b.forward_scores(layer)[1, pad:], rec_1.forward_scores(layer)[0], atol=1e-5, rtol=0, equal_nan=True
        )


def test_hidden_feature_cached_generation_matches_forward() -> None:
    _, model = _build("llava", layers=[-1], feature="hidden")
    inputs = tiny_inputs(model)
    rec = GroundingRecorder()
    with rec, torch.no_grad():
        seqs = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = _forward_scores(model, inputs, seqs, 3)[:, :-1]
    torch.testing.assert_close(rec.sequence_scores(3), reference, atol=1e-5, rtol=0, equal_nan=True)


def test_no_image_placeholder_is_an_error() -> None:
    _, model = _build("blip2_opt")
    inputs = tiny_inputs(model)
    inputs["input_ids"] = torch.where(inputs["input_ids"] == IMAGE_TOKEN_ID, 5, inputs["input_ids"])
    with pytest.raises(ValueError, match="no image placeholder"):
        model(**inputs)
    with pytest.raises(ValueError, match="no image placeholder"):
        model.generate(**inputs, max_new_tokens=2)


@pytest.mark.parametrize("name", ["llava", "blip2_opt"])
def test_image_token_count_mismatch_is_an_error(name: str) -> None:
    _, model = _build(name)
    inputs = tiny_inputs(model)
    ids = inputs["input_ids"].clone()
    first_image = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    ids[:, first_image] = 5  # one placeholder fewer than the image has features
    inputs["input_ids"] = ids
    with pytest.raises(ValueError, match="(?i)image"):
        model(**inputs)


def test_layer_out_of_range_is_an_error() -> None:
    torch.manual_seed(0)
    model = TINY_FACTORIES["llava"]()
    with pytest.raises(ValueError, match="index 4 out of range for a language model of 4 layers"):
        add_grounding(model, GroundingConfig(layers=[4]))
    with pytest.raises(ValueError, match="index -5 out of range"):
        add_grounding(model, GroundingConfig(layers=[-5]))


def test_unsupported_model_names_supported_ones() -> None:
    from transformers import LlamaForCausalLM

    from models.tiny import llama_config

    with pytest.raises(ValueError, match=r"supported model types: \['blip-2', 'instructblip', 'llava', 'llava_next'\]"):
        add_grounding(LlamaForCausalLM(llama_config()))


def test_kv_cache_outside_generate_is_an_error() -> None:
    _, model = _build("llava")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(RuntimeError, match="non-empty KV cache outside generate"):
            model(input_ids=inputs["input_ids"][:, -1:], past_key_values=out.past_key_values)


@pytest.mark.parametrize("name", ["llava", "instructblip_t5"])
@pytest.mark.parametrize("score", ["similarity", "learnable"])
def test_save_pretrained_round_trip_restores_outputs(name: str, score: str, tmp_path: Path) -> None:
    _, model = _build(name, layers=[-1], score=score)
    with torch.no_grad():  # move the gates off their init so loading is observable
        for name_, p in model.named_parameters():
            if "grounding_gate" in name_:
                p.add_(0.3)
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "base")
    save_grounding(model, tmp_path / "grounding")
    loaded = type(model).from_pretrained(tmp_path / "base").eval()
    load_grounding(loaded, tmp_path / "grounding")
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_load_grounding_names_missing_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TINY_FACTORIES["llava"]()
    with pytest.raises(FileNotFoundError, match="grounding_config.json"):
        load_grounding(model, tmp_path)


def test_blip2_generate_default_prompt_is_grounded() -> None:
    """BLIP-2 builds `<image>*n + BOS` itself when input_ids is None; grounding must follow it."""
    plain, model = _build("blip2_opt", layers=[-1])
    pixels = tiny_inputs(model)["pixel_values"]
    rec = GroundingRecorder()
    with rec, torch.no_grad():
        grounded = model.generate(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        reference = plain.generate(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    steps = rec[3]
    assert steps[0].shape == (2, 9) and steps[0][:, :8].isnan().all() and not steps[0][:, 8].isnan().any()
    assert len(steps) == 4 and grounded.shape == reference.shape


def test_fixed_gate_is_not_trainable() -> None:
    _, model = _build("llava", layers=[-1], learnable_gate=False, init_scale=1.5, init_bias=0.25)
    gate = model.model.language_model.layers[-1].self_attn.grounding_gate
    assert list(gate.parameters()) == []
    assert float(gate.scale) == 1.5 and float(gate.bias) == 0.25


def test_explicit_grounding_state_matches_automatic() -> None:
    from models import GroundingState

    _, model = _build("llava", layers=[-1])
    inputs = tiny_inputs(model)
    state = GroundingState(inputs["input_ids"] == IMAGE_TOKEN_ID)
    with torch.no_grad():
        auto = model(**inputs).logits
        explicit = model(**inputs, grounding=state).logits
        empty = model(**inputs, grounding=GroundingState(torch.zeros_like(state.image_mask))).logits
    torch.testing.assert_close(explicit, auto, atol=0, rtol=0)
    assert (empty - auto).abs().max() > 1e-4  # the state really drives the gate


def test_text_only_batch_equals_untouched() -> None:
    plain, model = _build("llava", layers=[-2, -1])
    ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 7))
    rec = GroundingRecorder()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = model(input_ids=ids, grounding_scores=rec).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert rec.forward_scores(3).isnan().all()


def test_static_cache_generation_is_an_error() -> None:
    _, model = _build("llava", layers=[-1])
    inputs = tiny_inputs(model)
    with pytest.raises(ValueError, match="dynamic KV cache only, got cache_implementation='static'"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
