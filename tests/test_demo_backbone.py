"""The tiny demo backbone: tokenizer offsets, processor expansion, save/load round trip, idempotence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.demo_backbone import TinyLlavaConfig, build_demo_backbone

TEXTS = ["two red cups and a small knife.", "a fork next to a knife.", "Is there a knife in the image?",
         "Describe the image.", "yes", "no", "a blue clock, three bananas and a fork."] * 10


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return build_demo_backbone(TEXTS, tmp_path_factory.mktemp("bb"), TinyLlavaConfig(vocab_size=160))


def test_tokenizer_offsets_cover_the_text(backbone: Path) -> None:
    tok = AutoProcessor.from_pretrained(backbone).tokenizer
    text = "Two red cups and a small knife."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    covered = set()
    for s, e in enc["offset_mapping"]:
        covered |= set(range(s, e))
    assert covered >= {i for i, c in enumerate(text) if c != " "}  # every character maps to a token
    knife = text.index("knife")
    knife_tokens = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < knife + 5 and knife < e]
    assert "".join(tok.convert_ids_to_tokens([enc["input_ids"][i] for i in knife_tokens])).strip("▁") == "knife"
    assert tok(text)["input_ids"][0] == tok.bos_token_id
    assert tok.decode(enc["input_ids"]) == text.lower()


def test_processor_expands_image_to_patch_tokens(backbone: Path) -> None:
    proc = AutoProcessor.from_pretrained(backbone)
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    enc = proc(images=[image], text=["<image>\nDescribe the image."], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == (32 // 4) ** 2
    assert enc["pixel_values"].shape == (1, 3, 32, 32)


def test_model_round_trip_and_runs(backbone: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(backbone).eval()
    proc = AutoProcessor.from_pretrained(backbone)
    image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    enc = proc(images=[image], text=["<image>\nDescribe the image."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == len(proc.tokenizer)
    again = LlavaForConditionalGeneration.from_pretrained(backbone).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, logits, atol=0, rtol=0)


def test_rebuild_is_idempotent_and_config_mismatch_is_an_error(backbone: Path) -> None:
    stamp = (backbone / "model.safetensors").stat().st_mtime_ns
    assert build_demo_backbone(TEXTS, backbone, TinyLlavaConfig(vocab_size=160)) == backbone
    assert (backbone / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds a demo backbone built with"):
        build_demo_backbone(TEXTS, backbone, TinyLlavaConfig(vocab_size=200))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="TinyLlavaConfig.image_size"):
        TinyLlavaConfig(image_size=30, patch_size=4)


def test_building_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    """The grounding head is initialised after the backbone is built: a run that builds the backbone must start
    from the same random state as one that finds it built (else its first run is not reproducible)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_demo_backbone(["a red cup and a fork", "a knife on a table"], tmp_path / "bb",
                        TinyLlavaConfig(text_hidden=32, text_layers=1, text_heads=2, vision_hidden=16, vision_layers=1))
    assert torch.equal(torch.rand(4), expected)
