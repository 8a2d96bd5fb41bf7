"""The presence-head control (``objective.lambda_presence``): it reads exactly the image tokens the language model
receives, pools them as an explicit mean, and its loss is the explicit BCE; a demo fit trains it with grounding off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.presence import PresenceHead, capture_lm_inputs, image_token_max, image_token_mean, lm_input_image_mask
from models.tiny import IMAGE_TOKEN_ID, TINY_FACTORIES, tiny_inputs
from tests.test_cli_runs import _run, _small


@pytest.mark.parametrize("family", ["llava", "blip2_opt", "blip2_t5", "instructblip_llama"])
def test_captured_inputs_hold_the_image_features_where_the_placeholders_were(family: str) -> None:
    torch.manual_seed(0)
    model = TINY_FACTORIES[family]().eval()
    inputs = tiny_inputs(model, batch=2)
    with torch.no_grad(), capture_lm_inputs(model) as captured:
        model(**inputs)
        model(**inputs)  # a second forward does not replace the first capture
    embeds = captured["embeds"]  # (B, T, D)
    mask = lm_input_image_mask(model, inputs["input_ids"])
    assert embeds.shape[:2] == inputs["input_ids"].shape and int(mask.sum()) > 0
    text = model.get_input_embeddings()(inputs["input_ids"])
    assert torch.equal(embeds[~mask], text[~mask])  # text positions: the token embeddings
    if family == "llava":
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, -2)
        assert torch.allclose(embeds[mask], features, atol=1e-6)
    else:  # the Q-Former's projected queries, not the placeholder's embedding
        assert not torch.allclose(embeds[mask], text[mask])
    assert IMAGE_TOKEN_ID in inputs["input_ids"]


def test_pooled_mean_and_loss_against_explicit_loops() -> None:
    torch.manual_seed(0)
    embeds, mask = torch.randn(3, 7, 5), torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 1:4], mask[1, 2], mask[2, :] = True, True, True
    pooled = image_token_mean(embeds, mask)
    for b in range(3):
        assert torch.allclose(pooled[b], embeds[b][mask[b]].mean(0), atol=1e-6)
    head = PresenceHead(5, 4)
    logits = head(embeds, mask)
    presence = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    expected = sum(-(p * torch.log(torch.sigmoid(z)) + (1 - p) * torch.log(1 - torch.sigmoid(z)))
                   for zs, ps in zip(logits, presence.float()) for z, p in zip(zs, ps)) / 12
    from models.word_grounding import word_loss

    assert torch.allclose(word_loss(logits, presence, torch.arange(4)), expected, atol=1e-6)
    assert torch.allclose(F.binary_cross_entropy_with_logits(logits, presence.float()), expected, atol=1e-6)
    with pytest.raises(ValueError, match="object categories"):
        PresenceHead(5, 0)


def test_max_pool_is_the_best_image_token_per_category() -> None:
    torch.manual_seed(0)
    embeds, mask = torch.randn(3, 7, 5), torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 1:4], mask[1, 6] = True, True  # row 2: no image token
    head = PresenceHead(5, 4, pool="max")
    logits = head(embeds, mask)  # (3, 4)
    for b in range(2):
        per_token = [head.proj(embeds[b, t]) for t in range(7) if mask[b, t]]
        assert torch.allclose(logits[b], torch.stack(per_token).max(0).values, atol=1e-6)
    assert torch.equal(logits[2], torch.zeros(4))
    assert torch.equal(image_token_max(torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool)), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="mean or max"):
        PresenceHead(5, 4, pool="sum")
    from models.objective import ObjectiveConfig

    with pytest.raises(ValueError, match="presence_pool"):
        ObjectiveConfig(presence_pool="sum")


def test_demo_fit_trains_the_presence_head_with_grounding_off(tmp_path: Path) -> None:
    off = ["--model.init_args.grounding.enabled", "false", "--model.init_args.grounding.word_score", "false",
           "--model.init_args.objective.lambda_word", "0", "--model.init_args.objective.lambda_presence", "1.0"]
    _run(["fit", "--config", "configs/demo.yaml", *_small(tmp_path, "presence", steps=3), *off,
          "--trainer.log_every_n_steps", "1"])
    ckpt = torch.load(tmp_path / "runs" / "presence" / "checkpoints" / "last.ckpt", weights_only=True)
    weight = ckpt["state_dict"]["presence_head.proj.weight"]
    assert weight.shape[0] == 8  # the world's categories
    metrics = (next((tmp_path / "runs" / "presence").glob("version_*")) / "metrics.csv").read_text()
    assert "train/presence" in metrics.splitlines()[0]
    report = json.loads((next((tmp_path / "runs" / "presence").glob("version_*")) / "report.json").read_text())
    assert "grounding_diagnostics" not in report  # grounding off: no gate score to diagnose


def test_grounded_site_reads_the_grounded_layers_image_keys() -> None:
    from models import GroundingConfig, GroundingRecorder, add_grounding
    from models.objective import ObjectiveConfig, check_objective
    from models.presence import grounded_feature_dim, grounded_presence_logits

    torch.manual_seed(0)
    model = TINY_FACTORIES["llava"]().eval()
    add_grounding(model, GroundingConfig(layers=[-2, -1]))
    inputs = tiny_inputs(model, batch=2)
    rec = GroundingRecorder()
    with torch.no_grad():
        model(**inputs, grounding_scores=rec)
    deepest = max(rec.images)
    f_img, valid = rec.images[deepest][0]  # (B, P, D), (B, P)
    assert grounded_feature_dim(model) == f_img.shape[-1]
    head = PresenceHead(f_img.shape[-1], 3, pool="max")
    logits = grounded_presence_logits(head, rec)
    for b in range(2):
        expected = torch.stack([head.proj(f_img[b, p]) for p in range(f_img.shape[1]) if valid[b, p]]).max(0).values
        assert torch.allclose(logits[b], expected, atol=1e-6)
    with pytest.raises(ValueError, match="presence_site"):
        check_objective(GroundingConfig(enabled=False),
                        ObjectiveConfig(lambda_grounding=0, lambda_contrastive=0, lambda_presence=1.0,
                                        presence_site="grounded"))
    with pytest.raises(ValueError, match="grounded model"):
        grounded_feature_dim(TINY_FACTORIES["llava"]())


def test_demo_fit_trains_a_presence_head_on_the_grounded_layer(tmp_path: Path) -> None:
    args = ["--config", "configs/experiments/presence_grounded_max.yaml", *_small(tmp_path, "pg", steps=3),
            "--trainer.log_every_n_steps", "1"]
    _run(["fit", *args])
    ckpt = torch.load(tmp_path / "runs" / "pg" / "checkpoints" / "last.ckpt", weights_only=True)
    weight = ckpt["state_dict"]["presence_head.proj.weight"]  # (categories, feature width of the grounded layer)
    assert weight.shape[0] == 8 and not any("word_proj" in k for k in ckpt["state_dict"])
    metrics = (next((tmp_path / "runs" / "pg").glob("version_*")) / "metrics.csv").read_text()
    assert "train/presence" in metrics.splitlines()[0] and "train/word" not in metrics.splitlines()[0]
