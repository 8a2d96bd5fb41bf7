"""Training BLIP-2 / InstructBLIP with Flan-T5: the encoder-decoder batch layout and its losses.

References: T5's own ``_shift_right`` for the decoder inputs, Hugging Face's loss for the LM term, the
tokenizer for which decoder positions hold object words, and the recorder for where grounding scores land.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules import CaptionPairsDataModule, WorldConfig
from datamodules.collate import Collator, decoder_start_token_id
from datamodules.labels import IGNORE
from models import GroundedVLM, GroundingConfig
from models.grounding import GroundingRecorder
from models.objective import lm_loss
from models.tiny import write_tiny_backbone
from models.training import model_inputs


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("t5")
    world = WorldConfig(root=root / "world", num_train=24, num_val=6)
    probe = CaptionPairsDataModule(processor="unused", world=world)
    probe.prepare_data()  # generates the world (and its row cache)
    tiny = write_tiny_backbone("instructblip_t5", root / "tiny", probe._world_texts() + ["Describe the image."])
    dm = CaptionPairsDataModule(processor=str(tiny), world=world, caption_prompt="Describe the image.",
                                question_prompt="{question}", batch_size=8, val_batch_size=4)
    dm.setup("fit")
    rows = [r for r in dm.train_rows if r["neg_text"] and r["neg_hallucinated"]][:5]
    rows += [r for r in dm.train_rows if r["kind"] == "question"][:2]
    rows = [{**r, "pixels": Image.open(r["image"]).convert("RGB")} for r in rows]
    return {"root": root, "tiny": tiny, "dm": dm, "rows": rows, "batch": dm.train_dataloader().collate_fn(rows)}


def _module(tiny: Path, **kwargs) -> GroundedVLM:
    torch.manual_seed(0)
    module = GroundedVLM(backbone=str(tiny), grounding=GroundingConfig(layers=[-2, -1]), **kwargs)
    module.configure_model()
    return module


def test_decoder_start_is_read_from_the_backbone_config(t5: dict) -> None:
    assert decoder_start_token_id(str(t5["tiny"])) == 0  # T5: decoder starts with <pad>
    assert decoder_start_token_id(str(t5["root"] / "nowhere")) is None
    llava = write_tiny_backbone("llava", t5["root"] / "llava", ["a cat"])
    assert decoder_start_token_id(str(llava)) is None


def test_encoder_decoder_layout_matches_t5_shift_right(t5: dict) -> None:
    batch, rows, tok = t5["batch"], t5["rows"], t5["dm"].processor.tokenizer
    n_img = 8
    assert "neg_input_ids" not in batch and "neg_attention_mask" not in batch  # the encoder input is shared
    for i, row in enumerate(rows):
        prompt = batch["input_ids"][i][batch["attention_mask"][i] == 1]
        assert (prompt[:n_img] == 4).all() and "<image>" not in tok.decode(prompt[n_img:])  # queries, then the prompt
        target = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert tok.decode(target, skip_special_tokens=True) == row["target"].lower()
        assert target[-1].item() == tok.eos_token_id
        assert int(batch["decoder_attention_mask"][i].sum()) == len(target)
    model = _module(t5["tiny"]).model
    reference = model.language_model._shift_right(batch["labels"])  # (B, T) what T5 feeds its decoder
    valid = batch["labels"] != IGNORE
    assert torch.equal(batch["decoder_input_ids"][valid], reference[valid])
    assert torch.equal(batch["neg_index"], torch.arange(5))


def test_object_labels_sit_on_the_decoder_inputs_that_are_object_words(t5: dict) -> None:
    batch, rows, tok = t5["batch"], t5["rows"], t5["dm"].processor.tokenizer
    for i, row in enumerate(rows[:5]):
        words = tok.decode(batch["decoder_input_ids"][i][batch["object_labels"][i] == 1]).split()
        mentions = " ".join(row["target"][s:e].lower() for s, e in sorted(row["pos_spans"])).split()
        assert words == mentions
        neg = batch["neg_decoder_input_ids"][i][batch["neg_object_labels"][i] == 0]
        wrong = tok.decode(neg).split()
        expected = " ".join(row["neg_text"][s:e] for s, e in row["neg_hallucinated"]).lower()
        assert wrong and all(w.strip(".,") in expected for w in wrong), (wrong, expected)
    assert (batch["object_labels"][:, 0] == IGNORE).all()  # the start token is no word


def test_qformer_prompts_are_padded_with_their_mask(t5: dict) -> None:
    batch, rows, dm = t5["batch"], t5["rows"], t5["dm"]
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(rows)
    for i, row in enumerate(rows):
        expected = dm.processor.qformer_tokenizer(row["prompt"])["input_ids"]
        assert ids[i][mask[i] == 1].tolist() == expected
    assert mask.sum(1).unique().numel() > 1, "the test needs prompts of different lengths"


def test_lm_loss_matches_hugging_face_on_the_collated_batch(t5: dict) -> None:
    batch, module = t5["batch"], _module(t5["tiny"])
    module.model.eval()  # no dropout: the two forwards must see the same network
    inputs = model_inputs(batch)
    with torch.no_grad():
        ours = module.model(**inputs)
        hf = module.model(**{k: v for k, v in inputs.items() if not k.startswith("decoder_")}, labels=batch["labels"])
    assert lm_loss(ours.logits, batch["labels"], "token", shift=False).item() == pytest.approx(hf.loss.item(), rel=1e-5)
    per_row = [torch.nn.functional.cross_entropy(ours.logits[i][batch["labels"][i] != IGNORE],
                                                 batch["labels"][i][batch["labels"][i] != IGNORE]) for i in range(len(t5["rows"]))]
    assert lm_loss(ours.logits, batch["labels"], "sample", shift=False).item() == pytest.approx(
        torch.stack(per_row).mean().item(), rel=1e-5)


def test_grounding_scores_cover_the_decoder_positions_and_train_the_gates(t5: dict) -> None:
    batch, module = t5["batch"], _module(t5["tiny"], lm_loss_reduction="sample")
    rec = GroundingRecorder()
    module.model(**model_inputs(batch), grounding_scores=rec)
    assert rec.layers == [0, 1]
    for layer in rec.layers:  # cross-attention: every decoder query sees the image queries in the encoder
        assert rec.forward_scores(layer).shape == batch["decoder_input_ids"].shape
        assert not rec.forward_scores(layer).isnan().any()
    module.objective.lambda_grounding = 0.0  # the contrastive term alone must reach the gates
    loss = module.training_step(batch, 0)
    loss.backward()
    gates = [p for n, p in module.model.named_parameters() if "grounding_gate" in n]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_processor_without_config_is_rejected_for_an_encoder_decoder_backbone(t5: dict, tmp_path: Path) -> None:
    processor_only = tmp_path / "processor"
    shutil.copytree(t5["tiny"], processor_only, ignore=shutil.ignore_patterns("config.json", "*.safetensors",
                                                                               "generation_config.json"))
    dm = t5["dm"]
    batch = Collator(dm.processor, "train", decoder_start_token_id(str(processor_only)))(t5["rows"][:2])
    assert "decoder_input_ids" not in batch
    with pytest.raises(ValueError, match="encoder-decoder .* data.init_args.processor"):
        _module(t5["tiny"]).training_step(batch, 0)
