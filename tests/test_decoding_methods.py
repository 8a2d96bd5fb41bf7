"""Each method's formula against an explicit reference: VCD's noise schedule, DoLa's layer choice (JSD loop),
DeCo's re-scoring, the PAI/VAF/EAH/AAI attention edits on one attention call, OPERA's column products."""

from __future__ import annotations

import math

import pytest
import torch

from models import GroundingConfig, GroundingRecorder, GroundingState, add_grounding
from models.decoding.attention import AAIEdit, EAHEdit, PAIEdit, VAFEdit
from models.decoding.logits import (
    add_diffusion_noise,
    deco_scores,
    diffusion_alpha_bar,
    dola_candidate_layers,
    dola_scores,
)
from models.decoding.opera import Window
from models.decoding.settings import DeCoSettings, layer_range
from models.decoding.stream import Stream, activated
from models.grounding import ATTENTION_EDIT, grounded_attention_forward
from models.tiny import tiny_inputs, tiny_llava

B, H, HKV, D, S = 2, 4, 2, 16, 12


# ---------------------------------------------------------------------------------------------------- VCD
def test_vcd_noise_schedule_equals_the_published_formula() -> None:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5."""
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (0.5e-2 - 1e-5) + 1e-5 for i in range(1000)]
    for t in (0, 1, 250, 500, 999):
        expected = math.prod(1 - b for b in betas[: t + 1])
        assert diffusion_alpha_bar(t) == pytest.approx(expected, rel=1e-5)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noisy = add_diffusion_noise(images, 500, seed=0)
    a = diffusion_alpha_bar(500)
    eps = (noisy - math.sqrt(a) * images) / math.sqrt(1 - a)  # the Gaussian noise that was added
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    # a row's noise depends on its own pixels and the seed, not on its batch neighbours
    assert torch.equal(add_diffusion_noise(images[1:2], 500, seed=0)[0], noisy[1])
    assert not torch.equal(add_diffusion_noise(images, 500, seed=1), noisy)


# ---------------------------------------------------------------------------------------------------- DoLa
def test_dola_buckets_follow_hugging_face() -> None:
    assert dola_candidate_layers("low", 32, False) == list(range(0, 16, 2))
    assert dola_candidate_layers("low", 32, True) == list(range(2, 16, 2))  # tied embeddings skip 0
    assert dola_candidate_layers("high", 32, False) == list(range(16, 32, 2))
    assert dola_candidate_layers("low", 48, False) == list(range(0, 20, 2))
    assert dola_candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert dola_candidate_layers("low", 2, False) == [0] and dola_candidate_layers("high", 2, False) == [1]
    assert dola_candidate_layers("low", 4, True) == [2]  # start meets the middle: one candidate, as there


def test_dola_layer_choice_equals_an_explicit_jsd_loop() -> None:
    g = torch.Generator().manual_seed(0)
    final = torch.randn(5, 30, generator=g) * 3
    premature = torch.randn(4, 5, 30, generator=g) * 3
    scores, chosen = dola_scores(final, premature, relative_top=0.1)
    for row in range(5):
        p = final[row].double().softmax(-1)
        divergences = []
        for layer in range(4):
            q = premature[layer, row].double().softmax(-1)
            m = (p + q) / 2
            divergences.append(float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()))
        best = max(range(4), key=divergences.__getitem__)
        assert int(chosen[row]) == best
        log_p, log_q = final[row].log_softmax(-1), premature[best, row].log_softmax(-1)
        keep = log_p >= log_p.max() + math.log(0.1)
        expected = torch.where(keep, log_p - log_q, torch.tensor(float("-inf")))
        torch.testing.assert_close(scores[row], expected)


# ---------------------------------------------------------------------------------------------------- DeCo
def test_deco_scores_equal_an_explicit_loop() -> None:
    g = torch.Generator().manual_seed(1)
    final, early = torch.randn(3, 40, generator=g) * 2, torch.randn(5, 3, 40, generator=g) * 2
    settings = DeCoSettings(alpha=0.6, top_k=6, top_p=0.7)
    scores = deco_scores(final, early, settings)
    for row in range(3):
        probs = final[row].softmax(-1)
        order = probs.argsort(descending=True).tolist()[:6]
        candidates, total = [], 0.0
        for token in order:  # nucleus inside the top k: add tokens until the mass reaches top_p
            if total >= 0.7:
                break
            candidates.append(token)
            total += float(probs[token])
        best = max(((float(early[l, row].softmax(-1)[t]), l) for l in range(5) for t in candidates))
        p_star, layer = best
        expected = torch.full((40,), float("-inf"))
        expected[candidates] = final[row, candidates] + 0.6 * p_star * early[layer, row, candidates]
        torch.testing.assert_close(scores[row], expected)


def test_layer_ranges_are_clamped_to_the_model() -> None:
    assert layer_range(2, 32, 2) == range(1, 2)  # the demo's 2 layers keep their last one
    assert layer_range(9, 15, 8) == range(7, 8)
    assert layer_range(2, 32, 8) == range(2, 8)
    assert layer_range(2, 32, 40) == range(2, 32)


# ---------------------------------------------------------------------------------------------------- edits
def _call(seed: int = 0, t: int = S):
    """A real LlamaAttention module, random post-RoPE q/k/v (GQA), image keys 3..6 (row 0) and 2..7 (row 1)."""
    torch.manual_seed(seed)
    attn = tiny_llava().model.language_model.layers[1].self_attn
    image = torch.zeros(B, S, dtype=torch.bool)
    image[0, 3:7], image[1, 2:8] = True, True
    q = torch.randn(B, H, t, D) * 2
    k, v = torch.randn(B, HKV, S, D) * 2, torch.randn(B, HKV, S, D)
    return attn, q, k, v, image


def _logits(q, k, causal: bool = True):
    """(B, H, T, S) explicit scaled logits, GQA keys repeated, causal (queries at the last T positions)."""
    logits = q @ k.repeat_interleave(H // HKV, dim=1).transpose(-1, -2) * D ** -0.5
    t = q.shape[2]
    if causal and t > 1:
        visible = torch.arange(S)[None, :] <= torch.arange(S - t, S)[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits


def _out(probs, v):
    return (probs @ v.repeat_interleave(H // HKV, dim=1)).transpose(1, 2)


def _edited(edit, attn, q, k, v, image, **kwargs):
    with activated(GroundingState(image), None):
        return edit(attn, q, k, v, None, scaling=attn.scaling, **kwargs)[0]


def test_pai_edit_equals_the_explicit_formula() -> None:
    attn, q, k, v, image = _call()
    out = _edited(PAIEdit({id(attn): (1, False)}, alpha=0.5), attn, q, k, v, image)
    logits = _logits(q, k)
    last = logits[:, :, -1]
    logits[:, :, -1] = torch.where(image[:, None, :], last + 0.5 * last.abs(), last)  # a + alpha |a|
    torch.testing.assert_close(out, _out(logits.softmax(-1), v), atol=1e-5, rtol=0)
    untouched = _out(_logits(q, k).softmax(-1), v)
    torch.testing.assert_close(out[:, :-1], untouched[:, :-1], atol=1e-5, rtol=0)  # only the last query row
    assert (out[:, -1] - untouched[:, -1]).abs().max() > 1e-3


def test_pai_edit_sees_the_grounding_gate() -> None:
    """On a grounded layer the edit gets the gate's bias with the logits: a = qk + log g[t] 1[key in image]."""
    torch.manual_seed(0)
    model = tiny_llava().eval()
    add_grounding(model, GroundingConfig(layers=[1], init_scale=3.0, init_bias=-1.0))
    attn = model.model.language_model.layers[1].self_attn
    _, q, k, v, image = _call()
    rec = GroundingRecorder()
    token = ATTENTION_EDIT.set(PAIEdit({id(attn): (1, False)}, alpha=0.5))
    try:
        with activated(GroundingState(image), ATTENTION_EDIT.get()):
            out, _ = grounded_attention_forward(attn, q, k, v, None, scaling=attn.scaling,
                                                grounding=GroundingState(image, rec))
    finally:
        ATTENTION_EDIT.reset(token)
    log_g = torch.nn.functional.logsigmoid(rec.forward_logits(1).nan_to_num(float("inf")))  # (B, T), 0 if undefined
    logits = _logits(q, k) + log_g[:, None, :, None] * image[:, None, None, :]
    last = logits[:, :, -1]
    logits[:, :, -1] = torch.where(image[:, None, :], last + 0.5 * last.abs(), last)
    torch.testing.assert_close(out, _out(logits.softmax(-1), v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [S, 1])
def test_vaf_edit_equals_the_explicit_formula(t: int) -> None:
    attn, q, k, v, image = _call(t=t)
    out = _edited(VAFEdit({id(attn): (1, False)}, enhance=1.5, suppress=0.5), attn, q, k, v, image)
    first = torch.tensor([3, 2])
    last = torch.tensor([6, 7])
    scale = torch.ones(B, S)
    scale[image] = 1.5
    scale[torch.arange(S)[None, :] < first[:, None]] = 0.5  # keys before the image ("system prompt")
    logits = _logits(q, k)
    scaled = logits * scale[:, None, None, :]
    after = torch.arange(S - t, S)[None, :] > last[:, None]  # (B, T) prefill: only rows after the image
    expected = torch.where(after[:, None, :, None] | (t == 1), scaled, logits)
    torch.testing.assert_close(out, _out(expected.softmax(-1), v), atol=1e-5, rtol=0)


def test_eah_edit_equals_an_explicit_loop() -> None:
    attn, q, k, v, image = _call(seed=3)
    threshold = 0.09
    out = _edited(EAHEdit({id(attn): (1, False)}, threshold), attn, q, k, v, image)
    probs = _logits(q, k).softmax(-1)
    expected = probs.clone()
    lent = 0
    for b in range(B):
        counts = []
        for h in range(H):
            n = 0
            for col in range(S):
                if not image[b, col]:
                    continue
                others = [row for row in range(S) if row > col]  # later queries see it (causal), itself excluded
                if others and float(probs[b, h, others, col].sum()) / len(others) > threshold:
                    n += 1
            counts.append(n)
        if max(counts) > 0:
            expected[b] = probs[b, counts.index(max(counts))].expand(H, -1, -1)
            lent += 1
    assert lent == 2, "the threshold must select a head in both rows, or the test is blind"
    torch.testing.assert_close(out, _out(expected, v), atol=1e-5, rtol=0)


def test_aai_edit_equals_the_explicit_formula() -> None:
    attn, q, k, v, image = _call(t=1)
    model = tiny_llava().eval()
    reference = torch.rand(B, S) * image  # any distribution over each row's image tokens
    reference = reference / reference.sum(-1, keepdim=True)
    edit = AAIEdit({id(attn): (1, False)}, alpha=0.4, beta=1.5, warmup=2, reference=reference)
    stream = Stream(model, tiny_inputs(model, batch=B), image, edit)
    stream.generated = 1  # still warming up: untouched
    untouched = _out(_logits(q, k).softmax(-1), v)
    torch.testing.assert_close(_edited(edit, attn, q, k, v, image), untouched, atol=1e-5, rtol=0)
    stream.generated = 2
    out = _edited(edit, attn, q, k, v, image)
    probs = _logits(q, k).softmax(-1)  # (B, H, 1, S)
    img = image[:, None, None, :].float()
    mass = (probs * img).sum(-1, keepdim=True)
    pulled = 1.5 * mass * (0.6 * probs * img / mass + 0.4 * reference[:, None, None, :])
    expected = probs * (1 - img) + pulled
    torch.testing.assert_close(out, _out(expected / expected.sum(-1, keepdim=True), v), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- OPERA
def test_opera_column_scores_equal_explicit_products() -> None:
    """score_j = 1e-7 prod_{i >= j} scale * A[i, j] over the window rows and the candidate's row."""
    g = torch.Generator().manual_seed(0)
    rows, width, scale = 2, 6, 50.0
    window = Window(rows, width, scale, torch.device("cpu"))
    positions = [4, 5, 6, 7]  # cache positions of the window rows (prompt's last token first)
    matrix = []
    for step, position in enumerate(positions):
        attn = torch.rand(rows, position + 1, generator=g)
        attn = attn / attn.sum(-1, keepdim=True)
        matrix.append(attn)
        window.append(attn, position)
    candidate = torch.rand(rows, 9, generator=g)
    candidate = candidate / candidate.sum(-1, keepdim=True)
    scores = window.scores(candidate, 8)
    all_rows = matrix + [candidate]
    cols = positions + [8]
    for r in range(rows):
        for j, col in enumerate(cols):
            product = 1e-7 * math.prod(scale * float(all_rows[i][r, col]) for i in range(j, len(all_rows)))
            assert float(scores[r, j].exp()) == pytest.approx(product, rel=1e-4)
        assert torch.isinf(scores[r, len(cols):]).all()
    rebuilt = Window(rows, width, scale, torch.device("cpu"))
    stacked = torch.stack([torch.nn.functional.pad(m, (0, 8 - m.shape[1])) for m in matrix], dim=1)  # (rows, 4, 8)
    rebuilt.rebuild(torch.arange(rows), stacked, torch.tensor(positions))
    torch.testing.assert_close(rebuilt.scores(candidate, 8), scores)


@pytest.mark.parametrize("family", ["llava", "blip2_opt"])
def test_opera_candidates_in_one_pass_equal_one_pass_each(family: str) -> None:
    """The block-diagonal candidate pass reads the same attention rows as one single-token pass per candidate."""
    from models.decoding.attention import routed
    from models.decoding.opera import OperaReadout, _targets
    from models.decoding.stream import prompt_image_mask
    from models.tiny import TINY_FACTORIES

    torch.manual_seed(0)
    model = TINY_FACTORIES[family]().eval()
    add_grounding(model, GroundingConfig(layers=[-1]))  # the read-out layer is grounded too
    inputs = tiny_inputs(model, batch=3, left_pad=[0, 2, 1])
    readout = OperaReadout(_targets(model)[0], encoder_decoder=False)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs), readout)
    with torch.no_grad(), routed(model):
        candidates = stream.prefill().logits.topk(3, dim=-1).indices  # (N, 3)
        s = stream.mask.shape[1]
        readout.rows = 3
        stream.peek_all(candidates)
        together, mass = readout.window, readout.image  # (N, 3, S + 3), (N, 3)
        readout.rows = 1
        for i in range(3):
            stream.peek(candidates[:, i])
            alone = readout.window[:, -1]  # (N, S + 1)
            torch.testing.assert_close(together[:, i, :s], alone[:, :s], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(together[:, i, s + i], alone[:, s], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mass[:, i], readout.image[:, -1], atol=1e-5, rtol=1e-4)
        assert stream.cache.get_seq_length() == s  # every candidate was dropped again
