"""Decoding methods on tiny backbones: neutral settings equal greedy / Hugging Face beam search token for token,
a batch equals its rows decoded alone (left padding), methods compose with grounding, registry and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import GroundingConfig, add_grounding
from models.decoding import METHODS, DecodingSettings, decode
from models.decoding.settings import (
    AAISettings,
    BeamSettings,
    DeCoSettings,
    DoLaSettings,
    EAHSettings,
    GreedySettings,
    M3IDSettings,
    OPERASettings,
    PAISettings,
    VAFSettings,
    VCDSettings,
)
from models.tiny import EOS_TOKEN_ID, PAD_TOKEN_ID, TINY_FACTORIES, tiny_inputs

FAMILIES = ["llava", "blip2_opt", "blip2_t5", "instructblip_llama", "instructblip_t5"]
PEERS = {name: m for name, m in METHODS.items() if not m.word_score}  # run on any model (grounded: test_word_grounding)
PADS = [0, 2, 1]
NEW = 8
NEUTRAL = {
    "vcd": VCDSettings(alpha=0.0),
    "pai": PAISettings(alpha=0.0, gamma=1.0),
    "dola": DoLaSettings(layers=[]),
    "eah": EAHSettings(threshold=1e9),  # no head has a sink: the detection runs, nothing is lent
    "aai": AAISettings(alpha=0.0),
    "vaf": VAFSettings(enhance=1.0, suppress=1.0),  # keys scaled by 1: the edited path runs
    "deco": DeCoSettings(alpha=0.0),
    "m3id": M3IDSettings(lam=0.0),
}
# settings strong enough to change tokens of random tiny models (rollback forced: threshold 1, no warm-up)
ACTIVE = {
    "beam": BeamSettings(num_beams=3),
    "opera": OPERASettings(num_beams=3, num_candidates=3, warmup=0, threshold=1, scale_factor=1000.0),
    "pai": PAISettings(alpha=2.0, gamma=2.0),
    "vaf": VAFSettings(enhance=3.0, suppress=0.5),
    "eah": EAHSettings(threshold=0.0),
    "aai": AAISettings(alpha=1.0, beta=3.0, warmup=1),
}


def _lively(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Redraw every weight matrix with std 0.2: default-initialised tiny models (std 0.02) attend almost uniformly
    and repeat one token, which would hide what a method changes."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=g) * std)
    return model


def _model(family: str, grounded: bool = False, seed: int = 0, **grounding):
    torch.manual_seed(seed)
    model = _lively(TINY_FACTORIES[family]().eval())
    if grounded:
        add_grounding(model, GroundingConfig(**{"layers": [-1], **grounding}))
    return model


def _inputs(model) -> dict:
    inputs = tiny_inputs(model, batch=len(PADS), left_pad=PADS)
    inputs.pop("decoder_input_ids", None)  # decoding starts the decoder from decoder_start_token_id
    return inputs


def _run(model, inputs, name: str, settings, eos=EOS_TOKEN_ID, new: int = NEW) -> torch.Tensor:
    return METHODS[name].fn(model, inputs, settings, max_new_tokens=new, pad_token_id=PAD_TOKEN_ID, eos_token_id=eos)


def _trim(row: torch.Tensor, eos: int) -> list[int]:
    """Tokens up to and including the first EOS (Hugging Face and we fill what follows differently)."""
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else row


def _hf(model, inputs, num_beams: int, eos: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, num_beams=num_beams,
                             pad_token_id=PAD_TOKEN_ID, eos_token_id=eos)
    encoder_decoder = model.config.get_text_config().is_encoder_decoder
    return out[:, 1:] if encoder_decoder else out[:, inputs["input_ids"].shape[1]:]


def _same(a: torch.Tensor, b: torch.Tensor, eos: int) -> bool:
    return len(a) == len(b) and all(_trim(x, eos) == _trim(y, eos) for x, y in zip(a, b))


@pytest.mark.parametrize("grounded", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_beam_and_neutral_opera_equal_hugging_face(family: str, grounded: bool) -> None:
    model = _model(family, grounded)
    inputs = _inputs(model)
    eos = int(_hf(model, inputs, 1, EOS_TOKEN_ID)[0, 3])  # an EOS that row 0 emits early, so rows end apart
    greedy_ref, beam_ref = _hf(model, inputs, 1, eos), _hf(model, inputs, 3, eos)
    assert _same(_run(model, inputs, "greedy", GreedySettings(), eos), greedy_ref, eos)
    assert _same(_run(model, inputs, "beam", BeamSettings(num_beams=3), eos), beam_ref, eos)
    # candidates >= 2 beams: the candidate restriction never binds; penalty 0 and no rollback leave beam search
    neutral = OPERASettings(num_beams=3, num_candidates=6, penalty_weight=0.0, rollback=False)
    assert _same(_run(model, inputs, "opera", neutral, eos), beam_ref, eos)
    assert not _same(beam_ref, greedy_ref, eos), "beam search must differ from greedy here, or the test is blind"


def test_peft_wrapped_model_decodes_with_its_adapters() -> None:
    """A LoRA-wrapped grounded model (what training leaves) decodes like its generate(), adapters included."""
    from peft import LoraConfig, get_peft_model

    model = _model("llava", grounded=True)
    inputs = _inputs(model)
    before = _run(model, inputs, "greedy", GreedySettings())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["grounding_gate"])
    wrapped = get_peft_model(model, lora).eval()
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:  # as if trained: LoRA starts as the identity
            torch.nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        ref = wrapped.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD_TOKEN_ID,
                               eos_token_id=EOS_TOKEN_ID)[:, inputs["input_ids"].shape[1]:]
    ours = _run(wrapped, inputs, "greedy", GreedySettings())
    assert _same(ours, ref, EOS_TOKEN_ID) and not torch.equal(ours, before)
    assert _run(wrapped, inputs, "pai", ACTIVE["pai"]).shape[0] == len(PADS)


def test_flan_t5_decoder_prompt_is_continued_like_generate() -> None:
    model = _model("blip2_t5")
    inputs = _inputs(model)
    prompt = torch.tensor([[0, 7, 9]] * len(PADS))  # decoder start + two given tokens
    with torch.no_grad():
        ref = model.generate(**inputs, decoder_input_ids=prompt, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)[:, prompt.shape[1]:]
    ours = _run(model, {**inputs, "decoder_input_ids": prompt}, "greedy", GreedySettings())
    assert _same(ours, ref, EOS_TOKEN_ID)
    assert not _same(ours, _run(model, inputs, "greedy", GreedySettings()), EOS_TOKEN_ID)


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_settings_equal_greedy(family: str) -> None:
    model = _model(family)
    inputs = _inputs(model)
    greedy = _run(model, inputs, "greedy", GreedySettings())
    for name, settings in NEUTRAL.items():
        assert torch.equal(_run(model, inputs, name, settings), greedy), name


def test_every_method_changes_the_tokens_at_its_defaults() -> None:
    model = _model("llava")
    inputs = _inputs(model)
    greedy = _run(model, inputs, "greedy", GreedySettings())
    for name, method in PEERS.items():
        if name != "greedy":
            assert not torch.equal(_run(model, inputs, name, method.settings()), greedy), name


def _row(inputs: dict, i: int) -> dict:
    """Row ``i`` alone, without its left padding."""
    return {k: v[i:i + 1, PADS[i]:] if k in ("input_ids", "attention_mask") else v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("family", ["llava", "blip2_t5", "instructblip_llama"])
def test_batch_equals_rows_alone(family: str) -> None:
    model = _model(family)
    inputs = _inputs(model)
    for name, method in PEERS.items():
        settings = ACTIVE.get(name, method.settings())
        batch = _run(model, inputs, name, settings)
        for i in range(len(PADS)):
            assert _trim(_run(model, _row(inputs, i), name, settings)[0], EOS_TOKEN_ID) == \
                _trim(batch[i], EOS_TOKEN_ID), (name, i)


def test_opera_rollback_changes_the_search() -> None:
    """Forced rollbacks (threshold 1, no warm-up) give other tokens than the same search without rollback."""
    model = _model("llava")
    inputs = _inputs(model)
    with_rollback = _run(model, inputs, "opera", ACTIVE["opera"])
    without = _run(model, inputs, "opera", dataclasses.replace(ACTIVE["opera"], rollback=False))
    assert not torch.equal(with_rollback, without)


@pytest.mark.parametrize("grounded", [False, True])
@pytest.mark.parametrize("family", ["llava", "blip2_opt", "instructblip_llama"])
def test_folded_beams_equal_expanded_rows(family: str, grounded: bool) -> None:
    """Beams folded into one cache row per sample (the default on decoder-only models) decode exactly like K
    expanded cache rows: plain beam search, and OPERA with forced rollbacks (whose refills rebuild the folded row)."""
    from models.decoding.attention import routed
    from models.decoding.opera import Opera, OperaReadout, _targets
    from models.decoding.search import beam_search
    from models.decoding.stream import Stream, prompt_image_mask

    model = _model(family, grounded)
    inputs = _inputs(model)
    image_mask = prompt_image_mask(model, inputs)
    with torch.no_grad():
        beams = [beam_search(Stream(model, inputs, image_mask), 3, 1.0, max_new_tokens=NEW, pad_token_id=PAD_TOKEN_ID,
                             eos_token_id=EOS_TOKEN_ID, fold=fold) for fold in (True, False)]
    assert torch.equal(*beams)
    runs = []
    for fold in (True, False):
        readout = OperaReadout(_targets(model)[0], encoder_decoder=False)
        search = Opera(Stream(model, inputs, image_mask, readout), readout, ACTIVE["opera"], NEW, PAD_TOKEN_ID,
                       EOS_TOKEN_ID, fold=fold)
        with torch.no_grad(), routed(model):
            runs.append((search.run(), search.stream.beams, int(search.rollbacks.sum())))
    (folded, beams_folded, rollbacks), (expanded, beams_expanded, rollbacks_expanded) = runs
    assert (beams_folded, beams_expanded) == (3, 1)  # the two layouts really ran
    assert rollbacks > 0 and rollbacks == rollbacks_expanded
    assert torch.equal(folded, expanded)


@pytest.mark.parametrize("family", ["llava", "blip2_t5"])
def test_methods_compose_with_grounding(family: str) -> None:
    """A grounded model decodes with every method; its neutral settings equal its greedy, and the gate acts."""
    model = _model(family, grounded=True, init_scale=-6.0, init_bias=-6.0)  # strong gate: image keys damped
    plain = _model(family)
    inputs = _inputs(model)
    greedy = _run(model, inputs, "greedy", GreedySettings())
    assert torch.equal(greedy, _hf(model, inputs, 1, EOS_TOKEN_ID))
    for name, settings in NEUTRAL.items():
        assert torch.equal(_run(model, inputs, name, settings), greedy), name
    for name, method in PEERS.items():
        settings = ACTIVE.get(name, method.settings())
        grounded, untouched = _run(model, inputs, name, settings), _run(plain, inputs, name, settings)
        assert grounded.shape[0] == len(PADS)
        if name in ("greedy", "vcd", "pai", "opera"):
            assert not torch.equal(grounded, untouched), f"{name}: grounding had no effect"


def test_stream_records_grounding_scores_like_generate() -> None:
    """A stream's recorder sees the same grounding scores as generate() (what a grounding-guided method reads)."""
    from models import GroundingRecorder
    from models.decoding.search import greedy_search
    from models.decoding.stream import Stream, prompt_image_mask

    model = _model("llava", grounded=True)
    inputs = _inputs(model)
    reference = GroundingRecorder()
    with reference, torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
    ours = GroundingRecorder()
    stream = Stream(model, inputs, prompt_image_mask(model, inputs), recorder=ours)
    with torch.no_grad():
        greedy_search([stream], lambda outs, step: outs[0].logits, max_new_tokens=NEW, pad_token_id=PAD_TOKEN_ID,
                      eos_token_id=None)
    layer = reference.layers[0]
    torch.testing.assert_close(ours.sequence_scores(layer), reference.sequence_scores(layer), equal_nan=True)


# ------------------------------------------------------------------------------------------ registry and errors
def test_registry_and_settings_blocks_match() -> None:
    blocks = {f.name for f in dataclasses.fields(DecodingSettings)} - {"method"}
    assert blocks == {name for name, method in METHODS.items() if dataclasses.fields(method.settings)}
    settings = DecodingSettings()
    for name in blocks:
        assert isinstance(getattr(settings, name), METHODS[name].settings)
    assert DecodingSettings().selected == GreedySettings()
    assert list(METHODS)[:8] == ["greedy", "beam", "vcd", "pai", "opera", "dola", "eah", "aai"]


def test_cli_style_parsing_builds_the_settings() -> None:
    """``--generation.method vcd --generation.vcd.alpha 0.5`` as LightningCLI (jsonargparse) parses it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--generation", type=DecodingSettings, default=DecodingSettings())
    config = parser.parse_args(["--generation.method", "vcd", "--generation.vcd.alpha", "0.5",
                                "--generation.dola.layers", "[0, 2]"])
    settings = parser.instantiate(config).generation
    assert settings.method == "vcd" and settings.selected == VCDSettings(alpha=0.5)
    assert settings.dola.layers == [0, 2]
    assert settings.describe() == {"method": "vcd", "vcd": dataclasses.asdict(VCDSettings(alpha=0.5))}


def test_decode_dispatches_to_the_chosen_method() -> None:
    model = _model("llava")
    inputs = _inputs(model)
    settings = DecodingSettings(method="pai", pai=PAISettings(alpha=2.0, gamma=2.0))
    out = decode(model, inputs, settings, max_new_tokens=NEW, pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    assert torch.equal(out, _run(model, inputs, "pai", settings.pai))


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="generation.method 'contrastive'.*greedy, beam, vcd, pai, opera, dola"):
        DecodingSettings(method="contrastive")
    settings = DecodingSettings()
    settings.method = "nope"
    with pytest.raises(ValueError, match="known methods: greedy"):
        decode(None, {}, settings, max_new_tokens=1, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("make, message", [
    (lambda: VCDSettings(alpha=-1.0), "vcd.alpha must be >= 0"),
    (lambda: VCDSettings(noise_step=1000), "vcd.noise_step must be < 1000"),
    (lambda: PAISettings(start_layer=5, end_layer=5), "pai.start_layer must be < end_layer"),
    (lambda: OPERASettings(num_beams=1), "opera.num_beams must be >= 2"),
    (lambda: DoLaSettings(layers="middle"), "dola.layers must be 'low', 'high'"),
    (lambda: AAISettings(alpha=1.5), "aai.alpha must be <= 1"),
    (lambda: DeCoSettings(top_p=0.0), "deco.top_p must be > 0"),
])
def test_bad_settings_name_the_setting(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_missing_backbone_feature_names_the_setting_to_change() -> None:
    llava_next = TINY_FACTORIES["llava_next"]().eval()
    with pytest.raises(ValueError, match="aai needs one vision-encoder attention column.*generation.method"):
        _run(llava_next, tiny_inputs(llava_next, batch=1), "aai", AAISettings())
    model = _model("llava")
    inputs = _inputs(model)
    with pytest.raises(ValueError, match=r"dola.layers \[9\] are not premature layers of a 4-layer"):
        _run(model, inputs, "dola", DoLaSettings(layers=[9]))
    with pytest.raises(ValueError, match="vcd contrasts the image with a noised copy: inputs need pixel_values"):
        _run(model, {k: v for k, v in inputs.items() if k != "pixel_values"}, "vcd", VCDSettings())
    image_only = {k: v[:, 3:3 + 16] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="hold nothing but the image"):
        _run(model, image_only, "pai", PAISettings())
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        _run(model, inputs, "greedy", GreedySettings(), new=0)
