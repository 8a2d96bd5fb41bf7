"""The grounding objective's terms against explicit per-token formulas."""

from __future__ import annotations

import math

import pytest
import torch

from models.training import lr_factor
from models.objective import IGNORE, ObjectiveConfig, contrastive_loss, grounding_loss, lm_loss, masked_mean
from models.report import probe_rates

NAN = float("nan")


def _batch():
    # 2 rows x 5 positions; NaN = undefined score (image token / before image)
    scores = torch.tensor([[NAN, 0.5, 0.2, 0.9, 0.1], [NAN, NAN, 0.4, 0.8, 0.3]])
    logits = 2.0 * scores + 1.0
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7], [IGNORE, IGNORE, IGNORE, 8, 9]])
    objects = torch.tensor([[IGNORE, IGNORE, IGNORE, 1, IGNORE], [IGNORE, IGNORE, IGNORE, 1, 1]])
    neg_scores = torch.tensor([[NAN, 0.5, 0.6, 0.1, 0.7]])
    neg_labels = torch.tensor([[IGNORE, IGNORE, 1, 0, IGNORE]])  # one grounded, one hallucinated word
    return scores, logits, labels, objects, neg_scores, 2.0 * neg_scores + 1.0, neg_labels


def test_direct_and_object_losses() -> None:
    scores, logits, labels, objects, *_ = _batch()
    direct = grounding_loss("direct", scores, logits, labels, objects, None, None)
    assert direct.item() == pytest.approx(-(0.2 + 0.9 + 0.1 + 0.8 + 0.3) / 5)
    obj = grounding_loss("object", scores, logits, labels, objects, None, None)
    assert obj.item() == pytest.approx(-(0.9 + 0.8 + 0.3) / 3)


def test_bce_loss_uses_gate_logits_and_negative_labels() -> None:
    scores, logits, labels, objects, neg_scores, neg_logits, neg_labels = _batch()
    got = grounding_loss("bce", scores, logits, labels, objects, neg_logits, neg_labels)
    z = [2 * 0.9 + 1, 2 * 0.8 + 1, 2 * 0.3 + 1, 2 * 0.6 + 1, 2 * 0.1 + 1]
    y = [1, 1, 1, 1, 0]
    expected = sum(-(t * math.log(1 / (1 + math.exp(-v))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-v)))) for v, t in zip(z, y)) / 5
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_margin_formula() -> None:
    scores, _, _, objects, neg_scores, _, neg_labels = _batch()
    got = contrastive_loss(scores, objects, neg_scores, neg_labels, torch.tensor([1]), margin=0.6)
    pos = (0.8 + 0.3) / 2  # row 1's object words
    neg = 0.1  # the hallucinated word of the negative
    assert got.item() == pytest.approx(max(0.0, 0.6 - (pos - neg)))
    zero = contrastive_loss(scores, objects, neg_scores, neg_labels, torch.tensor([1]), margin=0.1)
    assert zero.item() == 0.0


def test_losses_are_differentiable_and_zero_without_tokens() -> None:
    scores = torch.tensor([[NAN, 0.5]], requires_grad=True)
    none = torch.full((1, 2), IGNORE)
    loss = masked_mean(scores, none == 1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(scores.grad, torch.zeros(1, 2))


def test_objective_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="ObjectiveConfig.grounding_loss"):
        ObjectiveConfig(grounding_loss="hinge")
    with pytest.raises(ValueError, match="ObjectiveConfig.margin"):
        ObjectiveConfig(margin=-1.0)


def test_probe_rates_count_companion_mentions() -> None:
    gt = {1: {"fork"}, 2: {"fork"}, 3: {"cup"}, 4: {"fork", "knife"}}
    details = [
        {"image_id": 1, "mentioned_objects": ["fork", "knife"]},
        {"image_id": 2, "mentioned_objects": ["fork"]},
        {"image_id": 3, "mentioned_objects": ["cup"]},
        {"image_id": 4, "mentioned_objects": ["knife", "fork"]},
    ]
    rates = probe_rates(details, gt, [("fork", "knife")])["fork->knife"]
    assert rates["rate_absent_with_anchor"] == 0.5 and rates["n_absent_with_anchor"] == 2
    assert rates["rate_absent_elsewhere"] == 0.0 and rates["n_absent_elsewhere"] == 1
    assert rates["recall_when_present"] == 1.0 and rates["n_present"] == 1


def test_lr_schedules() -> None:
    assert lr_factor(0, warmup=4, total=100, schedule="linear") == pytest.approx(1 / 5)
    assert lr_factor(4, warmup=4, total=100, schedule="linear") == 1.0
    assert lr_factor(52, warmup=4, total=100, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(100, warmup=4, total=100, schedule="linear") == 0.0
    assert lr_factor(52, warmup=4, total=100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(76, warmup=4, total=100, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(90, warmup=4, total=100, schedule="constant") == 1.0


def test_lm_loss_token_matches_hugging_face_and_sample_matches_row_loop() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[0, :7] = IGNORE  # a two-token answer
    labels[1, :2] = IGNORE  # a long caption
    labels[2, :] = IGNORE  # no target: drops out of the sample mean
    out = model(input_ids=ids, labels=labels)
    assert lm_loss(out.logits, labels, "token").item() == pytest.approx(out.loss.item(), abs=1e-6)
    rows = []
    for row in range(2):
        terms = [-torch.log_softmax(out.logits[row, t - 1], -1)[labels[row, t]] for t in range(1, 9) if labels[row, t] != IGNORE]
        rows.append(torch.stack(terms).mean())
    assert lm_loss(out.logits, labels, "sample").item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-6)
    assert lm_loss(out.logits, torch.full_like(labels, IGNORE), "sample").item() == 0.0
