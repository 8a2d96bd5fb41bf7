"""The measurements of ``analyze`` against explicit references: AUROC vs a pairwise count, mention-to-token alignment
vs the known words of a caption, the probe's folds vs the images they hold, and the teacher-forced signals and the
attention read-out vs each row decoded alone and vs eager attention."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from lightning_app.analysis import summarize_mentions
from metrics.coco_objects import get_parser
from models import GroundingConfig, GroundingRecorder, add_grounding, set_grounding_enabled
from models.backbones import backbone_spec
from models.decoding import DecodingSettings, decode
from models.demo_backbone import train_tokenizer
from models.diagnostics import auroc, forced_pass, generated_tokens
from models.mention_tokens import align_mentions, caption_mentions, token_spans
from models.probes import probe_auroc, probe_folds
from models.tiny import EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, TINY_FACTORIES, tiny_inputs
from models.word_grounding import ObjectWords, set_object_words
from tests.test_decoding import _lively

CAPTION = "Two men ride motor bikes past 3 wine glasses, a doughnut, forks and a café's pocketknife."
CORPUS = ["a man and a dog.", "two cats on a sofa", "a cup of coffee", "the table is red"] * 5 + [CAPTION]


def _pairwise(scores: list[float], present: list[bool]) -> float:
    """P(score of a present mention > score of a hallucinated one), ties counted half: the explicit count."""
    pos = [s for s, p in zip(scores, present) if p and not math.isnan(s)]
    neg = [s for s, p in zip(scores, present) if not p and not math.isnan(s)]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_equals_an_explicit_pairwise_count_with_ties_half() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):  # a hand-made set: two categories, repeated values (ties), a few unscored mentions
        present = bool(i % 3)
        score = float(rng.integers(0, 5)) + (0.5 if present else 0.0) * (i % 2)
        rows.append({"mode": "lemma", "category": "knife" if i % 4 else "fork", "image_id": i // 2,
                     "present": present, "word_z": math.nan if i % 13 == 0 else score, "lm_logprob": -score})
    rows.append({"mode": "reference", "category": "cup", "image_id": 0, "present": True, "word_z": 9.0,
                 "lm_logprob": 0.0})
    summary = summarize_mentions(rows, "lemma", ["word_z", "lm_logprob"])
    lemma = [r for r in rows if r["mode"] == "lemma"]
    for signal in ("word_z", "lm_logprob"):
        expected = _pairwise([r[signal] for r in lemma], [r["present"] for r in lemma])
        assert summary["auroc"][signal] == pytest.approx(expected, abs=1e-6)  # torchmetrics: float32
        knives = [r for r in lemma if r["category"] == "knife"]
        assert summary["by_category"]["knife"]["auroc"][signal] == pytest.approx(
            _pairwise([r[signal] for r in knives], [r["present"] for r in knives]), abs=1e-6)
    assert summary["n_present"] + summary["n_hallucinated"] == len(lemma)
    assert auroc([3.0, 1e9, 2e9], [False, True, True]) == 1.0  # large logits are not squashed into ties
    assert auroc([1.0, 2.0], [True, True]) is None and auroc([math.nan, 1.0], [True, False]) is None


def _byte_level(texts: list[str]) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (OPT's kind): multi-byte characters can split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("kind", ["metaspace", "byte_level"])
def test_alignment_recovers_the_object_words_of_a_known_caption(kind: str) -> None:
    tokenizer = train_tokenizer(CORPUS, 80) if kind == "metaspace" else _byte_level(CORPUS)
    caption = CAPTION.lower() if kind == "metaspace" else CAPTION  # the demo tokenizer lower-cases
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    decoded, spans = token_spans(tokenizer, ids)
    assert decoded == caption and spans[-1] is None  # EOS produces no character
    expected = {  # (words, category) of each mode: the reference misses "motor bikes" (its table's " motor bike")
        "reference": [("men", "person"), ("wine glasses", "wine glass"), ("doughnut", "donut"), ("forks", "fork"),
                      ("pocketknife", "knife")],
        "lemma": [("men", "person"), ("motor bikes", "motorcycle"), ("wine glasses", "wine glass"),
                  ("doughnut", "donut"), ("forks", "fork"), ("pocketknife", "knife")],
    }
    for mode, words in expected.items():
        mentions = align_mentions(caption_mentions(decoded, mode), spans)
        assert [(m.text.lower(), m.category) for m in mentions] == words
        assert [m.category for m in mentions] == list(get_parser(mode)(caption).objects)  # CHAIR's own reading
        for m in mentions:  # the mention's tokens decode to exactly its words
            assert tokenizer.decode([ids[k] for k in m.tokens]).strip() == m.text
            assert m.tokens == tuple(range(m.tokens[0], m.tokens[-1] + 1))
    multi = [m for m in align_mentions(caption_mentions(decoded, "lemma"), spans) if len(m.tokens) > 1]
    assert {m.category for m in multi} >= {"motorcycle", "knife"}  # multi-token words are covered


def test_probe_folds_never_put_one_image_on_both_sides() -> None:
    from sklearn.model_selection import StratifiedKFold

    images = np.repeat(np.arange(30), 3)  # every image three times (e.g. three prompts per image)
    labels = np.repeat(np.arange(30) % 3 == 0, 3)
    folds = probe_folds(labels, images, folds=5)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(images)))  # every row tested once
    for train, test in folds:
        assert not set(images[train]) & set(images[test])
        assert labels[test].any() and (~labels[test]).any()
    naive = StratifiedKFold(5, shuffle=True, random_state=0).split(images, labels)  # what the grouping prevents
    assert any(set(images[tr]) & set(images[te]) for tr, te in naive)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(images), 6))
    assert probe_auroc(x + 3.0 * labels[:, None], labels, images) > 0.95
    assert 0.25 < probe_auroc(x, labels, images) < 0.75
    assert probe_folds(labels[:6], images[:6], folds=5) == []  # one present image: nothing to cross-validate


WORDS = ObjectWords(("fork", "knife", "cup"), (11, 12, 13, 14), (0, 1, 1, 2))
FAMILIES = ["llava", "blip2_opt", "blip2_t5", "instructblip_llama", "instructblip_t5"]


def _grounded(family: str):
    torch.manual_seed(0)
    model = _lively(TINY_FACTORIES[family]().eval())
    add_grounding(model, GroundingConfig(layers=[0, -1], word_score=True))
    set_object_words(model, WORDS)
    return model


def _generated(model, pads=(0, 2, 1)):
    inputs = tiny_inputs(model, batch=len(pads), left_pad=list(pads))
    inputs.pop("decoder_input_ids", None)
    new = decode(model, inputs, DecodingSettings(), max_new_tokens=6, pad_token_id=PAD_TOKEN_ID,
                 eos_token_id=EOS_TOKEN_ID)
    return inputs, generated_tokens(new, EOS_TOKEN_ID, IMAGE_TOKEN_ID)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_signals_equal_each_row_alone(family: str) -> None:
    """Batched with left padding == each row unpadded; the greedy token is the argmax where its log-prob is read."""
    model = _grounded(family)
    inputs, tokens = _generated(model)
    forced = forced_pass(model, inputs, tokens, PAD_TOKEN_ID)
    encoder_decoder = family.endswith("t5")
    for b, (pad, row) in enumerate(zip((0, 2, 1), tokens)):
        alone = {k: v[b: b + 1, pad:] if k in ("input_ids", "attention_mask") else v[b: b + 1]
                 for k, v in inputs.items()}
        gen = torch.tensor([row])
        rec = GroundingRecorder()
        with torch.no_grad():
            if encoder_decoder:
                start = torch.full((1, 1), model.config.text_config.decoder_start_token_id)
                out = model(**alone, decoder_input_ids=torch.cat([start, gen], 1), grounding_scores=rec)
                offset = 1
            else:
                ids = torch.cat([alone["input_ids"], gen], 1)
                out = model(**{**alone, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, grounding_scores=rec)
                offset = alone["input_ids"].shape[1]
        logp = F.log_softmax(out.logits[0, offset - 1: offset - 1 + len(row)].float(), -1)
        assert logp.argmax(-1).tolist() == row  # greedy picked what the predicting position prefers
        assert torch.allclose(forced.signals["lm_logprob"][b, : len(row)], logp[torch.arange(len(row)), row], atol=1e-4)
        for layer in rec.layers:
            scores = rec.forward_scores(layer)[0]
            own, pred = slice(offset, offset + len(row)), slice(offset - 1, offset - 1 + len(row))
            assert torch.allclose(forced.signals[f"G_own/L{layer}"][b, : len(row)], scores[own], atol=1e-5)
            assert torch.allclose(forced.signals[f"G_pred/L{layer}"][b, : len(row)], scores[pred], atol=1e-5)
        assert forced.signals["lm_logprob"][b, len(row):].isnan().all()
    assert forced.word_z.shape == (3, len(WORDS.tokens))
    assert set(forced.features) == {"lm_input", "L0", f"L{max(forced.attention)}"}


def _eager_copy(model, family: str):
    """The untouched architecture with the same weights, on eager attention (which returns probabilities)."""
    torch.manual_seed(0)
    eager = TINY_FACTORIES[family]().eval()
    eager.load_state_dict({k: v for k, v in model.state_dict().items() if "grounding_gate" not in k})
    for module in backbone_spec(eager).language_model(eager).modules():  # T5's stacks hold their own configs
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config._attn_implementation = "eager"
    return eager


@pytest.mark.parametrize("family", ["llava", "blip2_t5"])
def test_attention_readout_equals_eager_attention_and_the_gate_formula(family: str) -> None:
    model = _grounded(family)
    inputs, tokens = _generated(model)
    eager = _eager_copy(model, family)
    ungrounded = copy.deepcopy(model)
    set_grounding_enabled(ungrounded, False)
    plain = forced_pass(ungrounded, inputs, tokens, PAD_TOKEN_ID)
    gated = forced_pass(model, inputs, tokens, PAD_TOKEN_ID, chunk=2)  # rows read two at a time
    for b, row in enumerate(tokens):
        gen = torch.tensor([row])
        with torch.no_grad():
            if family.endswith("t5"):
                start = torch.full((1, 1), model.config.text_config.decoder_start_token_id)
                out = eager(**{k: v[b: b + 1] for k, v in inputs.items()}, decoder_input_ids=torch.cat([start, gen], 1),
                            output_attentions=True)
                attn, rows = out.language_model_outputs.cross_attentions, slice(0, len(row))  # (encoder keys)
            else:
                mask = torch.cat([inputs["attention_mask"][b: b + 1], torch.ones_like(gen)], 1)
                ids = torch.cat([inputs["input_ids"][b: b + 1], gen], 1)
                out = eager(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"][b: b + 1],
                            position_ids=(mask.cumsum(-1) - 1).clamp_min(0), output_attentions=True)
                p = inputs["input_ids"].shape[1]
                attn, rows = out.attentions, slice(p - 1, p - 1 + len(row))
        for layer, on_image in plain.attention.items():
            reference = attn[layer][0, :, rows].mean(0)  # (N, S) mean over heads
            image = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten()
            assert torch.allclose(on_image[b, : len(row)], reference[:, image], atol=1e-5)
            if layer != min(plain.attention):  # deeper layers read states an earlier gate has changed
                continue
            # grounding on: image columns of each head scaled by g and renormalised (DESIGN.md section 3)
            g = torch.sigmoid(gated.signals[f"gate_pred/L{layer}"][b, : len(row)])[:, None, None]
            heads = attn[layer][0, :, rows].transpose(0, 1)  # (N, H, S)
            scaled = heads.clone()
            scaled[..., image] *= g
            expected = (scaled / scaled.sum(-1, keepdim=True)).mean(1)[:, image]
            assert torch.allclose(gated.attention[layer][b, : len(row)], expected, atol=1e-5)


def test_probed_categories_are_the_most_hallucinated_then_the_most_frequent() -> None:
    from lightning_app.analysis import Collected, probe_categories

    presence = {1: frozenset({"cup", "fork"}), 2: frozenset({"fork"}), 3: frozenset({"bowl", "fork", "cup"})}
    rows = [{"mode": "lemma", "category": c, "present": False} for c in ("bowl", "knife", "knife")]
    rows += [{"mode": "reference", "category": "cup", "present": False}]  # another mode: not counted
    collected = Collected(layers=[0], words=None, presence=presence, rows=rows, image_ids=[1, 2, 3])
    assert probe_categories(collected, "lemma", 3) == ["bowl", "fork", "cup"]  # knife is in no image: no probe


def test_report_diagnostics_of_a_single_mention() -> None:
    """One mention in the whole validation set: torchmetrics hands it back as 0-d tensors, the block still counts it."""
    from models.diagnostics import MentionScores
    from models.report import grounding_diagnostics

    metric = MentionScores()
    metric.update(torch.tensor([0.7], dtype=torch.float64), torch.tensor([True]))
    metric.update(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool))
    block = grounding_diagnostics(*metric.compute(), "word_z", "reference", None)
    assert (block["n_present"], block["n_hallucinated"], block["n_unscored"]) == (1, 0, 0)
    assert block["auroc"] is None or block["auroc"] != block["auroc"]  # one class only: undefined
