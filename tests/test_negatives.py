"""Negative captions: exact change spans, agreement, determinism, CHAIR-consistent mentions, token labels."""

from __future__ import annotations

import random
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from datamodules.labels import char_labels, token_labels
from datamodules.mentions import Mention, find_object_mentions
from datamodules.negatives import ALL_KINDS, Negative, make_negative, negative_label_spans, positive_label_spans
from metrics.coco_objects import COCO_CATEGORIES, get_parser
from metrics.english import pluralize
from tests.reference_data import read_log

NUMBER_WORDS = ["a", "two", "three", "four", "five"]

# Real COCO captions (val2014) and their object mentions.
COCO_CAPTIONS = {
    "A man riding a motorcycle down a street.": [("man", "person"), ("motorcycle", "motorcycle")],
    "Two dogs playing with a frisbee in the park.": [("dogs", "dog"), ("frisbee", "frisbee")],
    "A woman sitting on a bench next to a red fire hydrant.": [("woman", "person"), ("bench", "bench"), ("fire hydrant", "fire hydrant")],
    "A bathroom with a toilet seat up and a sink.": [("toilet seat", "toilet"), ("sink", "sink")],
    "Two giraffes standing next to each other in a field.": [("giraffes", "giraffe")],
    "A plate with a hot dog and a glass of wine.": [("hot dog", "hot dog")],
    "A teddy bear sitting on a couch next to wine glasses.": [("teddy bear", "teddy bear"), ("couch", "couch"), ("wine glasses", "wine glass")],
    "Three people on skis standing in the snow.": [("people", "person"), ("skis", "skis")],
    "A baby elephant walking behind its mother.": [("baby elephant", "elephant"), ("mother", "person")],
    "A kitchen with a stove, a microwave and a refrigerator.": [("stove", "oven"), ("microwave", "microwave"), ("refrigerator", "refrigerator")],
}
SYNTHETIC = ["two red cups and a small knife.", "a green apple next to three blue bowls.", "one large dog and a small cat."]


def present_of(caption: str) -> set[str]:
    return {m.category for m in find_object_mentions(caption)}


def negatives_for(caption: str, kind: str, seeds: range = range(40), **kwargs) -> list[Negative]:
    out = [make_negative(caption, present_of(caption), random.Random(s), kinds=[kind], **kwargs) for s in seeds]
    return [n for n in out if n is not None]


def check_negative(neg: Negative, present: set[str]) -> None:
    """What every negative must satisfy (see the module docstring)."""
    assert neg.text != neg.source
    assert neg.undo() == neg.source
    assert len(neg.spans) == len(neg.replaced) >= 1
    ends = [0]
    for (start, end), original in zip(neg.spans, neg.replaced):
        assert ends[-1] <= start <= end <= len(neg.text)
        assert neg.text[start:end] != original
        ends.append(end)
    before = [m.category for m in find_object_mentions(neg.source)]
    after = find_object_mentions(neg.text)
    if neg.kind in ("object_swap", "object_insertion"):
        (new,) = neg.hallucinated_objects
        assert new not in present and new not in before and new in COCO_CATEGORIES
        introduced = [m for m in after if m.category == new]
        assert len(introduced) == 1
        assert len(after) == len(before) + (neg.kind == "object_insertion")
        if neg.kind == "object_swap":  # the recorded object span is exactly the new mention
            assert (introduced[0].start, introduced[0].end) == neg.spans[-1]
        else:
            (start, end), = neg.spans
            assert start <= introduced[0].start and introduced[0].end <= end
    else:
        assert neg.hallucinated_objects == ()
        assert [m.category for m in after] == before


# ---------------------------------------------------------------------------------------------------
# Object mentions
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption", list(COCO_CAPTIONS))
def test_mentions_of_real_coco_captions(caption: str) -> None:
    mentions = find_object_mentions(caption)
    assert [(m.text, m.category) for m in mentions] == COCO_CAPTIONS[caption]
    assert all(caption[m.start : m.end] == m.text for m in mentions)


def test_mention_offsets_plural_and_case() -> None:
    text = "Two  Dogs and a hot-dog stand,\nthree sheep and a mouse; MICE (cups)."
    got = find_object_mentions(text)
    assert got == [
        Mention(5, 9, "Dogs", "dog", True),
        Mention(37, 42, "sheep", "sheep", True),  # plural from the count
        Mention(49, 54, "mouse", "mouse", False),
        Mention(56, 60, "MICE", "mouse", True),
        Mention(62, 66, "cups", "cup", True),
    ]  # "hot-dog" is one word, as in CHAIR


def test_mentions_equal_chair_lemma_mode_on_real_llava_captions() -> None:
    captions = [r["caption"] for r in read_log("llava-1.5_greedy")]
    assert len(captions) == 500
    parser = get_parser("lemma")
    differing = [c for c in captions if [m.category for m in find_object_mentions(c)] != list(parser(c).objects)]
    assert differing == []
    assert sum(len(find_object_mentions(c)) for c in captions) > 2000


@pytest.mark.parametrize(
    "caption",
    [
        "a hot-dog stand next to cats/dogs.",  # Treebank keeps hyphen and slash words whole
        "a clock at 3 o’clock and a dog at o'clock.",
        "the dogs' bowls and the girls' cup(s).",
        "a man--with a dog--and 'men' on a bench…",
        "a teddy bear, a toilet seat and a seat; two wine glasses? the dog's bed!",
        "cats don't like dogs; a cat isn't a dog_ or =dog.",
        "A MAN WITH TWO DOGS.\n\nA  woman  with a  hot  dog.",
    ],
)
def test_punctuation_edge_cases_agree_with_chair(caption: str) -> None:
    assert [m.category for m in find_object_mentions(caption)] == list(get_parser("lemma")(caption).objects)


@pytest.mark.parametrize("category", COCO_CATEGORIES)
def test_every_category_form_parses_back(category: str) -> None:
    written = {"sports ball": "ball", "dining table": "table"}.get(category, category)
    plural_form = "skis" if category == "skis" else pluralize(written)
    (mention,) = find_object_mentions(f"two {plural_form} on the grass.")
    assert (mention.category, mention.plural, mention.text) == (category, True, plural_form)


# ---------------------------------------------------------------------------------------------------
# Object swap and insertion
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "vocabulary", "expected", "spans"),
    [
        ("a knife on the grass.", ["apple"], "an apple on the grass.", [(0, 2), (3, 8)]),
        ("A knife on the grass.", ["orange"], "An orange on the grass.", [(0, 2), (3, 9)]),
        ("two knives on the grass.", ["apple"], "two apples on the grass.", [(4, 10)]),
        ("an apple on the grass.", ["knife"], "a knife on the grass.", [(0, 1), (2, 7)]),
        ("an apple on the grass.", ["umbrella"], "an umbrella on the grass.", [(3, 11)]),
        ("two men on the grass.", ["mouse"], "two mice on the grass.", [(4, 8)]),
        ("a dog on the grass.", ["person"], "a person on the grass.", [(2, 8)]),
        ("three dogs on the grass.", ["person"], "three people on the grass.", [(6, 12)]),
        ("Dogs on the grass.", ["wine glass"], "Wine glasses on the grass.", [(0, 12)]),
        ("a cup on the grass.", ["skis"], "a ski on the grass.", [(2, 5)]),
        ("two cups on the grass.", ["scissors"], "two scissors on the grass.", [(4, 12)]),
        ("a cup on the grass.", ["sports ball"], "a ball on the grass.", [(2, 6)]),
    ],
)
def test_object_swap_number_and_article(caption: str, vocabulary: list[str], expected: str, spans: list) -> None:
    neg = make_negative(caption, present_of(caption), random.Random(0), kinds=["object_swap"], vocabulary=vocabulary)
    assert neg is not None
    assert (neg.text, list(neg.spans), neg.hallucinated_objects) == (expected, spans, tuple(vocabulary))
    check_negative(neg, present_of(caption))


def test_object_swap_without_a_singular_form_or_absent_object_gives_none() -> None:
    assert make_negative("a cup.", {"cup"}, random.Random(0), kinds=["object_swap"], vocabulary=["scissors"]) is None
    assert make_negative("a cup.", {"cup", "cat"}, random.Random(0), kinds=["object_swap"], vocabulary=["cat", "cup"]) is None
    # a category the caption already mentions is not swapped in, even when it is not present
    assert make_negative("a cup and a cat.", {"cup"}, random.Random(0), kinds=["object_swap"], vocabulary=["cat"]) is None


def test_object_swap_never_builds_a_double_word() -> None:
    # "hot" + "dog" would read as "hot dog": the only possible swap is rejected on re-parsing.
    assert make_negative("a hot cup.", {"cup"}, random.Random(0), kinds=["object_swap"], vocabulary=["dog"]) is None
    neg = make_negative("a hot cup.", {"cup"}, random.Random(0), kinds=["object_swap"], vocabulary=["dog", "cat"])
    assert neg is not None and neg.text == "a hot cat."


def test_object_insertion_places_and_spans() -> None:
    caption = "A man riding a motorcycle down a street."
    negs = negatives_for(caption, "object_insertion", vocabulary=["cat"])
    expected = {
        "A man and a cat riding a motorcycle down a street.": " and a cat",
        "A man riding a cat and a motorcycle down a street.": "a cat and ",
        "A man riding a motorcycle and a cat down a street.": " and a cat",
    }
    assert {n.text for n in negs} == set(expected)  # every place occurs over 40 seeds, nothing else
    for neg in negs:
        ((start, end),) = neg.spans
        assert neg.text[start:end] == expected[neg.text] and neg.replaced == ("",)
        check_negative(neg, {"person", "motorcycle"})


def test_object_insertion_article_and_modifier_words() -> None:
    negs = negatives_for("a dog house in the yard.", "object_insertion", vocabulary=["apple"])
    # "dog" is a modifier here: nothing is inserted after it, only in front of the phrase
    assert {n.text for n in negs} == {"an apple and a dog house in the yard."}
    # a sentence-initial capitalised determiner and "is" after the noun rule both places out
    assert make_negative("A dog is asleep.", {"dog"}, random.Random(0), kinds=["object_insertion"]) is None


# ---------------------------------------------------------------------------------------------------
# Attribute swap and count change
# ---------------------------------------------------------------------------------------------------

COLOURS = {"red", "blue", "green", "yellow", "white", "black", "brown", "pink", "purple", "gray", "grey"}


def test_attribute_swap_colour() -> None:
    negs = negatives_for("a red cup on a table.", "attribute_swap")
    assert len(negs) == 40
    for neg in negs:
        ((start, end),) = neg.spans
        assert neg.replaced == ("red",) and neg.text[start:end] in COLOURS - {"red"}
        assert neg.text == f"a {neg.text[start:end]} cup on a table."
        check_negative(neg, {"cup", "dining table"})
    assert len({n.text for n in negs}) > 4


def test_attribute_swap_size_changes_class_and_article() -> None:
    negs = negatives_for("A small apple and two big cups.", "attribute_swap")
    texts = {n.text for n in negs}
    larger = {"large", "big", "huge", "giant"}
    assert texts <= {f"A {w} apple and two big cups." for w in larger} | {"An enormous apple and two big cups."} | {
        f"A small apple and two {w} cups." for w in ("small", "little", "tiny")
    }
    assert "An enormous apple and two big cups." in texts
    enormous = next(n for n in negs if n.text.startswith("An enormous"))
    assert [enormous.text[s:e] for s, e in enormous.spans] == ["An", "enormous"] and enormous.replaced == ("A", "small")


def test_attribute_swap_needs_an_attribute_in_front_of_an_object() -> None:
    assert make_negative("a red sky over a cup.", {"cup"}, random.Random(0), kinds=["attribute_swap"]) is None
    assert make_negative("an orange cat.", {"cat", "orange"}, random.Random(0), kinds=["attribute_swap"]) is None


@pytest.mark.parametrize(
    ("caption", "forms"),
    [
        ("a cup on the table.", {1: "a cup", 2: "two cups"}),
        ("A man riding.", {1: "A man", 2: "Two men"}),
        ("two knives on a plate.", {1: "a knife", 2: "two knives"}),
        ("two apples on a plate.", {1: "an apple", 2: "two apples"}),
        ("three people near the buses.", {1: "a person", 2: "two people"}),
        ("three buses near the people.", {1: "a bus", 2: "two buses"}),
        ("two red cups.", {1: "a red cup", 2: "two red cups"}),
        ("a wine glass.", {1: "a wine glass", 2: "two wine glasses"}),
        ("an orange.", {1: "an orange", 2: "two oranges"}),
        ("a sheep on the hill.", {1: "a sheep", 2: "two sheep"}),
        ("5 dogs on the beach.", {1: "1 dog", 2: "2 dogs"}),
    ],
)
def test_count_change_pluralises_and_singularises(caption: str, forms: dict[int, str]) -> None:
    negs = negatives_for(caption, "count_change")
    assert negs
    singular, plural = forms[1], forms[2]
    number = plural.split()[0]

    def phrase(n: int) -> str:  # the expected phrase for count n
        if n == 1:
            return singular
        word = str(n) if number.isdigit() else NUMBER_WORDS[n - 1]
        return " ".join([word[:1].upper() + word[1:] if number[0].isupper() else word, *plural.split()[1:]])

    (old,) = [n for n in range(1, 6) if phrase(n) in caption]
    allowed = {caption.replace(phrase(old), phrase(n), 1) for n in range(1, 6) if n != old}
    texts = {n.text for n in negs}
    assert texts <= allowed and len(texts) >= 3
    for neg in negs:
        check_negative(neg, present_of(caption))


def test_count_change_fixes_the_verb_and_determiners() -> None:
    negs = negatives_for("the two dogs are asleep and there is a cat.", "count_change")
    texts = {n.text for n in negs}
    assert "the one dog is asleep and there is a cat." in texts
    assert "the two dogs are asleep and there are two cats." in texts
    neg = next(n for n in negs if n.text == "the one dog is asleep and there is a cat.")
    assert [neg.text[s:e] for s, e in neg.spans] == ["one", "dog", "is"] and neg.replaced == ("two", "dogs", "are")
    for neg in negs:
        check_negative(neg, {"dog", "cat"})


def test_count_change_leaves_modifiers_and_uncounted_objects() -> None:
    for caption in ("a dog bowl on the floor.", "dogs in a group of people.", "a pair of scissors."):
        assert make_negative(caption, present_of(caption), random.Random(0), kinds=["count_change"]) is None


# ---------------------------------------------------------------------------------------------------
# All kinds on real captions, determinism, errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption", [*COCO_CAPTIONS, *SYNTHETIC])
def test_every_kind_on_real_and_synthetic_captions(caption: str) -> None:
    present = present_of(caption)
    made = set()
    for seed in range(5):
        for kind in ALL_KINDS:
            neg = make_negative(caption, present, random.Random(seed), kinds=[kind])
            if neg is not None:
                assert neg.kind == kind and neg.source == caption
                check_negative(neg, present)
                made.add(kind)
    assert {"object_swap", "object_insertion"} <= made


def test_invariants_on_real_llava_captions() -> None:
    captions = [r["caption"] for r in read_log("llava-1.5_greedy")][:120]
    rng = random.Random(7)
    counts = dict.fromkeys(ALL_KINDS, 0)
    for caption in captions:
        present = present_of(caption)
        for kind in ALL_KINDS:
            neg = make_negative(caption, present, rng, kinds=[kind])
            if neg is not None:
                check_negative(neg, present)
                counts[neg.kind] += 1
    assert counts["object_swap"] >= 110 and counts["object_insertion"] >= 110
    assert counts["count_change"] >= 50 and counts["attribute_swap"] >= 20


def test_seeded_rng_is_deterministic() -> None:
    captions = [*COCO_CAPTIONS, *SYNTHETIC]
    run = lambda seed: [make_negative(c, present_of(c), random.Random(seed)) for c in captions]  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)
    rng = random.Random(5)
    kinds = {make_negative("two red cups and a small knife.", {"cup", "knife"}, rng).kind for _ in range(60)}
    assert kinds == set(ALL_KINDS)


def test_none_when_no_kind_applies() -> None:
    assert make_negative("A sunny day at the beach.", set(), random.Random(0)) is None
    assert make_negative("", set(), random.Random(0)) is None


def test_invalid_arguments_name_the_argument() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="kinds"):
        make_negative("a cup.", {"cup"}, rng, kinds=["object_swap", "colour_swap"])
    with pytest.raises(ValueError, match="kinds"):
        make_negative("a cup.", {"cup"}, rng, kinds=[])
    with pytest.raises(ValueError, match="vocabulary"):
        make_negative("a cup.", {"cup"}, rng, vocabulary=[])
    with pytest.raises(ValueError, match="vocabulary"):
        make_negative("a cup.", {"cup"}, rng, vocabulary=["cat", "lamp"])
    with pytest.raises(ValueError, match="present"):
        make_negative("a cup.", {"mug"}, rng)
    with pytest.raises(TypeError, match="rng"):
        make_negative("a cup.", {"cup"}, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------


def test_label_spans_of_positive_and_negatives() -> None:
    caption = "A man riding a motorcycle next to a dog."
    # the dog is not annotated: left unlabelled
    assert positive_label_spans(caption, {"person", "motorcycle"}) == ([(2, 5), (15, 25)], [])
    swap = make_negative(caption, {"person", "motorcycle"}, random.Random(0), kinds=["object_swap"], vocabulary=["apple"])
    assert swap is not None
    grounded, hallucinated = negative_label_spans(swap, {"person", "motorcycle"})
    assert [swap.text[s:e] for s, e in hallucinated] == ["apple"]
    assert all(swap.text[s:e] in ("man", "motorcycle") for s, e in grounded) and len(grounded) == 1
    count = Negative("Two men riding a motorcycle.", "count_change", ((0, 3), (4, 7)), (), "A man riding a motorcycle.", ("A", "man"))
    assert negative_label_spans(count, {"person", "motorcycle"}) == ([(17, 27)], [(0, 3), (4, 7)])
    insert = Negative("A man and a cat riding.", "object_insertion", ((5, 15),), ("cat",), "A man riding.", ("",))
    assert insert.undo() == "A man riding."
    assert negative_label_spans(insert, {"person"}) == ([(2, 5)], [(12, 15)])


def test_char_labels_and_errors() -> None:
    assert char_labels("a cat.", [(2, 5)], []) == [-100, -100, 1, 1, 1, -100]
    assert char_labels("a cat.", [], [(0, 1)]) == [0, -100, -100, -100, -100, -100]
    with pytest.raises(ValueError, match="overlaps"):
        char_labels("a cat.", [(2, 5)], [(4, 6)])
    with pytest.raises(ValueError, match="grounded"):
        char_labels("a cat.", [(2, 9)], [])
    with pytest.raises(ValueError, match="hallucinated"):
        char_labels("a cat.", [], [(3, 2)])


def train_wordpiece(texts: list[str]) -> Tokenizer:
    """A small WordPiece tokenizer: rare words like 'motorcycle' split into several pieces."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def train_byte_bpe(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    return tokenizer


@pytest.mark.parametrize("train", [train_wordpiece, train_byte_bpe])
def test_token_labels_with_trained_tokenizers(train) -> None:
    texts = [*COCO_CAPTIONS, *SYNTHETIC] * 3
    tokenizer = train(texts)
    caption = "A man riding a motorcycle down a street."
    neg = make_negative(caption, {"person", "motorcycle"}, random.Random(0), kinds=["object_swap"], vocabulary=["giraffe"])
    assert neg is not None and neg.text == "A man riding a giraffe down a street."
    grounded, hallucinated = negative_label_spans(neg, {"person", "motorcycle"})
    encoding = tokenizer.encode(neg.text)
    labels = token_labels(encoding.offsets, grounded, hallucinated)
    assert len(labels) == len(encoding.ids)
    assert labels[0] == labels[-1] == -100 and encoding.special_tokens_mask[0] == encoding.special_tokens_mask[-1] == 1

    def word_of(offset: tuple[int, int]) -> str:
        match = [m for m in re.finditer(r"\w+|[^\w\s]", neg.text) if m.start() < offset[1] and offset[0] < m.end()]
        return match[0].group() if match and offset[1] > offset[0] else ""

    pieces = {"man": [], "giraffe": []}
    for offset, label, special in zip(encoding.offsets, labels, encoding.special_tokens_mask):
        word = "" if special else word_of(offset)
        assert label == {"man": 1, "giraffe": 0}.get(word, -100), (word, offset)
        if word in pieces:
            pieces[word].append(label)
    assert len(pieces["giraffe"]) >= 2  # an unseen word: several pieces, every one labelled 0
    assert pieces["man"] and set(pieces["man"]) == {1}


def test_token_labels_with_a_transformers_offset_mapping() -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_wordpiece(list(COCO_CAPTIONS) * 3))
    text = "two dogs and a motorcycle"
    offsets = fast(text, return_offsets_mapping=True)["offset_mapping"]
    grounded, _ = positive_label_spans(text, {"dog", "motorcycle"})
    labels = token_labels(offsets, grounded, [])
    assert labels[0] == labels[-1] == -100
    tokens_of_motorcycle = [l for (s, e), l in zip(offsets, labels) if s >= 15 and e > s]
    assert tokens_of_motorcycle == [1] * len(tokens_of_motorcycle) and len(tokens_of_motorcycle) >= 2
    assert [l for (s, e), l in zip(offsets, labels) if 4 <= s < 8] == [1] * sum(1 for s, _ in offsets if 4 <= s < 8)
    assert {l for (s, e), l in zip(offsets, labels) if 0 < e <= 3 or 9 <= s < 14} == {-100}  # "two", "and a"


def test_token_labels_edge_cases() -> None:
    # a token covering a grounded and a hallucinated word is ambiguous; empty offsets are ignored
    assert token_labels([(0, 0), (0, 5), (0, 1), (4, 5)], [(0, 1)], [(2, 5)]) == [-100, -100, 1, 0]
    with pytest.raises(ValueError, match="offsets"):
        token_labels([(3, 1)], [], [])
    with pytest.raises(ValueError, match="overlaps"):
        token_labels([(0, 3)], [(0, 3)], [(1, 2)])
