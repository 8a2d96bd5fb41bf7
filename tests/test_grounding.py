"""The grounded attention function against explicit references (renormalised probabilities, naive scores)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import GroundingConfig, GroundingRecorder, GroundingState, add_grounding
from models.grounding import GATE_ATTR, grounded_attention_forward
from models.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

torch.set_default_dtype(torch.float32)


def _attention_call(score: str, feature: str = "value", seed: int = 0):
    """A grounded LlamaAttention of a tiny LLaVA with random q/k/v over a text-image-text sequence."""
    torch.manual_seed(seed)
    model = tiny_llava().eval()
    add_grounding(model, GroundingConfig(layers=[-1], score=score, feature=feature, init_scale=3.0, init_bias=0.5))
    attn = model.model.language_model.layers[-1].self_attn
    b, h, hkv, d, s = 2, 4, 2, 16, 12
    image = torch.zeros(b, s, dtype=torch.bool)
    image[0, 3:7] = True
    image[1, 2:8] = True
    q = torch.randn(b, h, s, d)
    k = torch.randn(b, hkv, s, d)
    v = torch.randn(b, hkv, s, d)
    return attn, q, k, v, image


def _explicit_probs(q, k, scaling):
    """(B, H, T, S) causal softmax probabilities, GQA keys repeated."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    logits = q @ k.transpose(-1, -2) * scaling
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _naive_similarity(f, image):
    """G[b, t] = max over image p <= t of cos(f[b, t], f[b, p]); NaN if t is an image token or sees none."""
    b, s, _ = f.shape
    out = torch.full((b, s), float("nan"))
    for i in range(b):
        for t in range(s):
            if image[i, t]:
                continue
            cands = [F.cosine_similarity(f[i, t], f[i, p], dim=0) for p in range(t + 1) if image[i, p]]
            if cands:
                out[i, t] = torch.stack(cands).max()
    return out


@pytest.mark.parametrize("score", ["similarity", "attention_weighted", "learnable"])
def test_bias_form_equals_renormalised_gate(score: str) -> None:
    attn, q, k, v, image = _attention_call(score)
    rec = GroundingRecorder()
    out, _ = grounded_attention_forward(
        attn, q, k, v, None, scaling=attn.scaling, grounding=GroundingState(image, rec)
    )  # (B, T, H, d)
    g_score = rec.forward_scores(attn._grounding_meta.layer)  # (B, T), NaN where undefined
    gate = getattr(attn, GATE_ATTR)
    logit = gate.scale * g_score.nan_to_num(0.0) + gate.bias
    torch.testing.assert_close(rec.forward_logits(attn._grounding_meta.layer), logit.masked_fill(g_score.isnan(), float("nan")), equal_nan=True)
    g = torch.where(g_score.isnan(), torch.ones_like(logit), torch.sigmoid(logit))  # (B, T)
    probs = _explicit_probs(q, k, attn.scaling)  # (B, H, T, S)
    column_gate = torch.where(image[:, None, None, :], g[:, None, :, None], torch.ones_like(probs))
    gated = probs * column_gate
    gated = gated / gated.sum(-1, keepdim=True)
    expected = gated @ v.repeat_interleave(2, dim=1)  # (B, H, T, d)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=0)
    assert (g < 1).any(), "the gate must act on some text rows"


def test_full_row_gate_is_noop() -> None:
    """The source design's gate (every key of row t times g[t], renormalised) cancels exactly."""
    torch.manual_seed(0)
    probs = torch.randn(2, 4, 10, 10, dtype=torch.float64).softmax(-1)
    g = torch.rand(2, 1, 10, 1, dtype=torch.float64)
    gated = probs * g
    assert torch.allclose(gated / gated.sum(-1, keepdim=True), probs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("feature", ["value", "qk"])
def test_similarity_score_equals_naive(feature: str) -> None:
    attn, q, k, v, image = _attention_call("similarity", feature)
    rec = GroundingRecorder()
    grounded_attention_forward(attn, q, k, v, None, scaling=attn.scaling, grounding=GroundingState(image, rec))
    got = rec.forward_scores(attn._grounding_meta.layer)
    if feature == "value":
        f_q = f_k = v.transpose(1, 2).reshape(2, 12, -1)
    else:
        f_q = q.transpose(1, 2).reshape(2, 12, -1)
        f_k = k.repeat_interleave(2, dim=1).transpose(1, 2).reshape(2, 12, -1)
    # naive with separate query/key features
    expected = torch.full((2, 12), float("nan"))
    for i in range(2):
        for t in range(12):
            cands = [F.cosine_similarity(f_q[i, t], f_k[i, p], dim=0) for p in range(t + 1) if image[i, p]]
            if not image[i, t] and cands:
                expected[i, t] = torch.stack(cands).max()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, equal_nan=True)
    if feature == "value":
        torch.testing.assert_close(got, _naive_similarity(f_q, image), atol=1e-5, rtol=0, equal_nan=True)


def test_attention_weighted_equals_naive() -> None:
    """Extra-pass identity: <n(f_t), mean_h sdpa(q, k, V')> == mean_h sum_p A[h,t,p] cos(f_t, f_p)."""
    attn, q, k, v, image = _attention_call("attention_weighted")
    rec = GroundingRecorder()
    grounded_attention_forward(attn, q, k, v, None, scaling=attn.scaling, grounding=GroundingState(image, rec))
    got = rec.forward_scores(attn._grounding_meta.layer)
    probs = _explicit_probs(q, k, attn.scaling)  # (B, H, T, S)
    f = F.normalize(v.transpose(1, 2).reshape(2, 12, -1), dim=-1)
    cos = f @ f.transpose(1, 2)  # (B, T, S)
    naive = (probs.mean(1) * cos * image[:, None, :]).sum(-1)
    has_image = (image[:, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()).any(-1)
    naive = torch.where(~image & has_image, naive, torch.full_like(naive, float("nan")))
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=0, equal_nan=True)


def test_learnable_score_uses_attended_image_feature() -> None:
    """learnable: MLP([n(f_t), n(sum_p A n(f_p) / sum_p A)]) over image keys p."""
    attn, q, k, v, image = _attention_call("learnable")
    rec = GroundingRecorder()
    grounded_attention_forward(attn, q, k, v, None, scaling=attn.scaling, grounding=GroundingState(image, rec))
    got = rec.forward_scores(attn._grounding_meta.layer)
    probs = _explicit_probs(q, k, attn.scaling).mean(1) * image[:, None, :]  # (B, T, S) mean-head image mass
    f = F.normalize(v.transpose(1, 2).reshape(2, 12, -1), dim=-1)
    attended = (probs @ f) / probs.sum(-1, keepdim=True).clamp_min(1e-6)
    gate = getattr(attn, GATE_ATTR)
    expected = gate.learned_score(F.normalize(f, dim=-1), F.normalize(attended, dim=-1))
    valid = ~got.isnan()
    assert valid.sum() > 0
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_scores_nan_exactly_where_undefined() -> None:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    add_grounding(model, GroundingConfig(layers=[0, -1]))
    inputs = tiny_inputs(model, text_before=3, text_after=4)
    rec = GroundingRecorder()
    with torch.no_grad():
        model(**inputs, grounding_scores=rec)
    assert rec.layers == [0, 3]
    scores = rec.forward_scores(3)
    undefined = inputs["input_ids"] == IMAGE_TOKEN_ID
    undefined[:, :3] = True  # text before the image sees no image key
    assert torch.equal(scores.isnan(), undefined)
    assert scores[~undefined].abs().max() <= 1.0 + 1e-6


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="GroundingConfig.score"):
        GroundingConfig(score="cosine")
    with pytest.raises(ValueError, match="GroundingConfig.feature"):
        GroundingConfig(feature="keys")
    with pytest.raises(ValueError, match="GroundingConfig.layers"):
        GroundingConfig(layers=[])
    with pytest.raises(ValueError, match="GroundingConfig.init_scale"):
        GroundingConfig(init_scale=float("inf"))
    with pytest.raises(ValueError, match="GroundingConfig.layers"):
        GroundingConfig(layers=[1.5])
