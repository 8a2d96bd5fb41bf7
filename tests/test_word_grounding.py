"""Candidate-word grounding: the score against an explicit loop over image keys, its loss, the object-word table,
the LM term on negatives, grounding-guided decoding (weight 0 == greedy, batch == rows alone) and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import GroundingConfig, GroundingRecorder, add_grounding
from models.decoding import METHODS, DecodingSettings
from models.decoding.settings import GreedySettings, GroundedSettings
from models.objective import ObjectiveConfig, check_objective, negative_lm_loss
from models.tiny import EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, TINY_FACTORIES, tiny_inputs
from models.word_grounding import ObjectWords, get_object_words, object_words, set_object_words, word_logits, word_loss
from tests.test_decoding import _lively

PADS = [0, 2, 1]
WORDS = ObjectWords(("fork", "knife", "cup"), (11, 12, 13, 14), (0, 1, 1, 2))


def _grounded(family: str = "llava", layers=(-1,), seed: int = 0):
    torch.manual_seed(seed)
    model = _lively(TINY_FACTORIES[family]().eval())
    add_grounding(model, GroundingConfig(layers=list(layers), word_score=True))
    with torch.no_grad():  # spread the gate logits so the decoding adjustment changes tokens
        for module in model.modules():
            if hasattr(module, "word_scale"):
                module.word_scale.fill_(8.0)
                module.word_bias.fill_(-1.0)
    set_object_words(model, WORDS)
    return model


def _inputs(model, pads=PADS) -> dict:
    inputs = tiny_inputs(model, batch=len(pads), left_pad=pads)
    inputs.pop("decoder_input_ids", None)
    return inputs


def test_word_logits_equal_an_explicit_loop_over_image_keys() -> None:
    """z[b, w] = mean_l (scale_l * max_{p image} cos(W_l e_w, v_p) + bias_l), v_p the layer's value vectors."""
    model = _grounded(layers=(0, -1))
    inputs = _inputs(model)
    layers = model.model.language_model.layers
    hidden: dict[int, torch.Tensor] = {}
    hooks = [layers[i].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i in (0, len(layers) - 1)]
    rec = GroundingRecorder()
    with torch.no_grad():
        model(**inputs, grounding_scores=rec)
        tokens = torch.tensor(WORDS.tokens)
        z = word_logits(model, rec, tokens)
    for h in hooks:
        h.remove()
    emb = model.get_input_embeddings().weight
    image = inputs["input_ids"] == IMAGE_TOKEN_ID
    expected = torch.zeros(len(PADS), len(tokens))
    with torch.no_grad():
        for i, h in hidden.items():
            attn = layers[i].self_attn
            gate = attn.grounding_gate
            for b in range(len(PADS)):
                values = attn.v_proj(h[b])[image[b]]  # (P, D)
                for k, t in enumerate(tokens):
                    query = gate.word_proj(emb[t])
                    cos = max(float(F.cosine_similarity(query, v, dim=0)) for v in values)
                    expected[b, k] += (float(gate.word_scale) * cos + float(gate.word_bias)) / len(hidden)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)


def test_word_loss_is_bce_over_known_rows() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [1.0, 1.0, -3.0, 4.0], [0.3, 0.2, 0.1, 0.0]])
    presence = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    category = torch.tensor(WORDS.category)
    known = torch.tensor([True, True, False])
    terms = []
    for b in range(2):
        for w, c in enumerate(WORDS.category):
            y = float(presence[b, c])
            p = 1 / (1 + math.exp(-float(z[b, w])))
            terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    assert float(word_loss(z, presence, category, known)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert float(word_loss(z, presence, category, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_object_words_of_a_trained_tokenizer() -> None:
    """Every noun that is one token of the demo tokenizer is in the table, with its category; pieces are not."""
    from models.demo_backbone import train_tokenizer

    texts = ["a fork and a knife.", "two forks, two knives and a cup.", "a pocketknife next to two cups."] * 50
    tokenizer = train_tokenizer(texts, 120)
    words = object_words(tokenizer, ["fork", "knife", "cup"])
    table = {tokenizer.convert_ids_to_tokens(t).lstrip("\u2581"): words.categories[c]
             for t, c in zip(words.tokens, words.category)}
    for noun, category in [("fork", "fork"), ("forks", "fork"), ("knife", "knife"), ("knives", "knife"),
                           ("cup", "cup"), ("cups", "cup"), ("pocketknife", "knife")]:
        assert table.get(noun) == category, (noun, table)
    assert all(len(piece) >= 2 for piece in table)
    with pytest.raises(ValueError, match="categories"):
        object_words(tokenizer, [])


def test_negative_lm_loss_equals_explicit_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9)
    pos = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 7, 7, 0, 0]])
    neg = torch.tensor([[1, 2, 8, 6, 3, 4], [1, 2, 7, 7, 6, 0]])
    labels = torch.full((2, 6), -100)
    labels[0, 3] = 0  # row 0: captions differ at 2 (3 vs 8), hallucinated token at 3
    labels[1, 4] = 0  # row 1: differ at 4 (0 vs 6), hallucinated token at 4
    log_p = torch.log_softmax(logits, -1)
    margin = [-F.logsigmoid(log_p[0, 2, 3] - log_p[0, 2, 8]), -F.logsigmoid(log_p[1, 4, 0] - log_p[1, 4, 6])]
    assert float(negative_lm_loss(logits, pos, neg, labels, "margin")) == pytest.approx(float(sum(margin) / 2), rel=1e-6)
    unlikely = [-torch.log(1 - log_p[0, 3, 6].exp()), -torch.log(1 - log_p[1, 4, 6].exp())]
    assert float(negative_lm_loss(logits, pos, neg, labels, "unlikelihood")) == pytest.approx(
        float(sum(unlikely) / 2), rel=1e-5)
    none = torch.full((2, 6), -100)
    assert float(negative_lm_loss(logits, pos, neg, none, "margin")) == 0.0


def test_grounded_decoding_weight_zero_is_greedy() -> None:
    model = _grounded()
    inputs = _inputs(model)
    greedy = METHODS["greedy"].fn(model, inputs, GreedySettings(), max_new_tokens=8, pad_token_id=PAD_TOKEN_ID,
                                  eos_token_id=EOS_TOKEN_ID)
    zero = METHODS["grounded"].fn(model, inputs, GroundedSettings(weight=0.0), max_new_tokens=8,
                                  pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    assert torch.equal(zero, greedy)


def test_grounded_decoding_moves_object_words_by_the_formula() -> None:
    """First token = argmax(logits + weight * logsigmoid(z)) at the object words; threshold 1 never names one."""
    model = _grounded()
    inputs = _inputs(model)
    tokens = torch.tensor(WORDS.tokens)
    rec = GroundingRecorder()
    with torch.no_grad():
        logits = model(**inputs, grounding_scores=rec).logits[:, -1]
        z = word_logits(model, rec, tokens)
    with torch.no_grad():  # make the object words the likeliest first tokens, so the adjustment decides
        model.lm_head.weight[tokens] = model.lm_head.weight[tokens] * 0 + model.lm_head.weight[logits.argmax(-1)[0]]
        logits = model(**inputs).logits[:, -1]
    weight = 3.0
    expected = logits.clone()
    expected[:, tokens] += weight * F.logsigmoid(z)
    assert not torch.equal(expected.argmax(-1), logits.argmax(-1))  # the adjustment changes some first token
    first = METHODS["grounded"].fn(model, inputs, GroundedSettings(weight=weight), max_new_tokens=1,
                                   pad_token_id=PAD_TOKEN_ID, eos_token_id=None)[:, 0]
    assert torch.equal(first, expected.argmax(-1))
    never = METHODS["grounded"].fn(model, inputs, GroundedSettings(weight=0.0, threshold=1.0), max_new_tokens=6,
                                   pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
    assert not torch.isin(never, tokens).any()


@pytest.mark.parametrize("family", ["llava", "blip2_t5", "instructblip_llama"])
def test_grounded_decoding_batch_equals_rows_alone(family: str) -> None:
    model = _grounded(family)
    inputs = _inputs(model)
    settings = GroundedSettings(weight=2.0, threshold=0.3)
    run = lambda x: METHODS["grounded"].fn(model, x, settings, max_new_tokens=8, pad_token_id=PAD_TOKEN_ID,  # noqa: E731
                                           eos_token_id=EOS_TOKEN_ID)
    batch = run(inputs)
    for i, pad in enumerate(PADS):
        row = {k: v[i:i + 1, pad:] if k in ("input_ids", "attention_mask") else v[i:i + 1] for k, v in inputs.items()}
        alone = run(row)[0]
        assert torch.equal(alone[alone != PAD_TOKEN_ID], batch[i][batch[i] != PAD_TOKEN_ID]), i


def test_word_loss_alone_trains_the_image_path() -> None:
    """L_word gives gradients to the word projection and to the vision tower that makes the image keys."""
    model = _grounded()
    model.train()
    inputs = _inputs(model)
    rec = GroundingRecorder()
    model(**inputs, grounding_scores=rec)
    presence = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])
    words = get_object_words(model)
    tokens, category = words.tensors()
    word_loss(word_logits(model, rec, tokens), presence, category).backward()
    gate = model.model.language_model.layers[-1].self_attn.grounding_gate
    assert gate.word_proj.weight.grad.abs().sum() > 0 and gate.word_bias.grad.abs().sum() > 0
    vision = [p.grad for n, p in model.named_parameters() if "vision_tower" in n and p.grad is not None]
    assert vision and sum(float(g.abs().sum()) for g in vision) > 0


def test_fixed_embeddings_stop_only_the_embedding_gradient() -> None:
    """``embedding_grad=False`` (objective.word_embedding_grad): the same z, no gradient into the LM's word embeddings,
    the same gradient everywhere else."""
    grads = []
    for embedding_grad in (True, False):
        model = _grounded()
        model.train()
        rec = GroundingRecorder()
        model(**_inputs(model), grounding_scores=rec)
        tokens, category = get_object_words(model).tensors()
        z = word_logits(model, rec, tokens, embedding_grad=embedding_grad)
        word_loss(z, torch.tensor([[True, False, True], [False, True, False], [True, True, False]]), category).backward()
        grads.append((z.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (z_on, on), (z_off, off) = grads
    assert torch.equal(z_on, z_off) and set(on) == set(off)
    embed = next(n for n in on if n.endswith("embed_tokens.weight"))
    assert all(torch.allclose(off[n], on[n]) for n in on if n != embed)  # the image path is the same
    words = torch.zeros(on[embed].shape[0], dtype=torch.bool)
    words[torch.tensor(WORDS.tokens)] = True
    assert torch.allclose(off[embed][~words], on[embed][~words])  # other tokens: only the input path
    direct = on[embed][words] - off[embed][words]  # the query W e_w's own gradient, gone when fixed
    assert bool((direct.abs().sum(-1) > 0).all())


def test_bad_input_names_the_setting() -> None:
    plain = _lively(TINY_FACTORIES["llava"]().eval())
    inputs = _inputs(plain)
    with pytest.raises(ValueError, match="grounding.word_score"):
        METHODS["grounded"].fn(plain, inputs, GroundedSettings(), max_new_tokens=2, pad_token_id=PAD_TOKEN_ID,
                               eos_token_id=EOS_TOKEN_ID)
    with pytest.raises(ValueError, match="lambda_word"):
        check_objective(GroundingConfig(enabled=False), ObjectiveConfig(lambda_grounding=0, lambda_contrastive=0,
                                                                        lambda_word=1.0))
    with pytest.raises(ValueError, match="word_score true"):
        check_objective(GroundingConfig(), ObjectiveConfig(lambda_word=1.0))
    with pytest.raises(ValueError, match="grounded.threshold"):
        GroundedSettings(threshold=2.0)
    with pytest.raises(ValueError, match="known methods"):
        DecodingSettings(method="groundd")
    untabled = _lively(TINY_FACTORIES["llava"]().eval())
    add_grounding(untabled, GroundingConfig(layers=[-1], word_score=True))
    with pytest.raises(ValueError, match="object-word table"):
        METHODS["grounded"].fn(untabled, inputs, GroundedSettings(), max_new_tokens=2, pad_token_id=PAD_TOKEN_ID,
                               eos_token_id=EOS_TOKEN_ID)
