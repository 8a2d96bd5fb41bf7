"""POPE: the official answer rule on hand-written answers, metric formulas, joining, question sets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from metrics.pope import POPE, build_pope_questions, coco_objects_per_image, join_answers, parse_answer, pope, read_pope_questions

# (answer, label, official reads "yes"?, robust reads "yes"?)
CASES = [
    ("Yes, there is a dog in the image.", "yes", True, True),
    ("No", "no", False, False),
    ("no", "no", False, False),
    ("NO", "no", True, False),  # official: only "No"/"no"/"not" tokens count
    ("not", "no", False, False),
    ("Nope.", "no", True, False),
    ("There isn't a cat.", "no", True, False),
    ("", "yes", True, True),  # empty answer: no negation token -> yes
    ("", "no", True, True),
    ("Yes. There is no other animal.", "yes", True, True),  # two sentences: only the first counts
    ("No. But there is a cat.", "yes", False, False),
    ("There is a dog, not a cat.", "yes", False, False),  # comma dropped, "not" token
    ("No,there is none", "no", True, False),  # "No,there" -> "Nothere": no exact token
    ("There is no  dog", "no", False, False),
    ("Yes, it is not clear", "yes", False, True),
    ("I do not see a bench", "no", False, False),
]


@pytest.mark.parametrize(("answer", "label", "official", "robust"), CASES)
def test_answer_parsers(answer: str, label: str, official: bool, robust: bool) -> None:
    assert parse_answer(answer, "official") is official
    assert parse_answer(answer, "robust") is robust


def _expected(pred_yes: list[bool], labels: list[str]) -> dict[str, float]:
    gold = [lab == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(pred_yes, gold))
    fp = sum(p and not g for p, g in zip(pred_yes, gold))
    tn = sum(not p and not g for p, g in zip(pred_yes, gold))
    fn = sum(not p and g for p, g in zip(pred_yes, gold))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / len(gold), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall), "yes_ratio": sum(pred_yes) / len(gold)}


@pytest.mark.parametrize("parser", ["official", "robust"])
def test_metrics_equal_the_formulas_on_the_cases(parser: str) -> None:
    answers = [c[0] for c in CASES]
    labels = [c[1] for c in CASES]
    expected = _expected([c[2] if parser == "official" else c[3] for c in CASES], labels)
    got = pope(answers, labels, parser)  # type: ignore[arg-type]
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, abs=1e-12), key
    # The official script's numbers on these 16 answers, worked out by hand: TP 3, FP 5, TN 5, FN 3.
    if parser == "official":
        assert [got[k].item() for k in ("tp", "fp", "tn", "fn")] == [3, 5, 5, 3]
        assert got["accuracy"].item() == 8 / 16 and got["yes_ratio"].item() == 8 / 16
        assert got["precision"].item() == 3 / 8 and got["recall"].item() == 3 / 6
        assert got["f1"].item() == pytest.approx(2 * (3 / 8) * (3 / 6) / (3 / 8 + 3 / 6), abs=1e-15)


def test_metric_class_forward_and_accumulation() -> None:
    answers, labels = [c[0] for c in CASES], [c[1] for c in CASES]
    metric = POPE()
    first = metric(answers[:7], labels[:7])
    assert first["accuracy"].item() == pope(answers[:7], labels[:7])["accuracy"].item()
    metric.update(answers[7:], labels[7:])
    assert {k: v.item() for k, v in metric.compute().items()} == {k: v.item() for k, v in pope(answers, labels).items()}
    with pytest.raises(ValueError, match="unknown POPE parser"):
        POPE(parser="lenient")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope(["yes"], ["maybe"])
    assert pope(["yes", "no"], torch.tensor([1, 0]))["accuracy"].item() == 1.0


QUESTIONS = [{"question_id": i, "image": "x.jpg", "text": "Is there a dog in the image?", "label": lab}
             for i, lab in [(1, "yes"), (2, "no"), (3, "yes")]]


def test_join_by_question_id_in_any_order() -> None:
    answers = [{"question_id": 3, "text": "No"}, {"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "No"}]
    assert join_answers(QUESTIONS, answers) == (["Yes", "No", "No"], ["yes", "no", "yes"])
    pope_style = [{"question_id": q, "answer": "yes", "text": "ignored"} for q in (1, 2, 3)]
    assert join_answers(QUESTIONS, pope_style)[0] == ["yes"] * 3


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([{"question_id": 1, "text": "y"}, {"question_id": 2, "text": "n"}], "no answer for question id 3"),
        ([{"question_id": q, "text": "y"} for q in (1, 2, 3, 99)], "unknown question id 99"),
        ([{"question_id": q, "text": "y"} for q in (1, 2, 2, 3)], "duplicate answer for question id 2"),
        ([{"id": 1, "text": "y"}], "no key 'question_id'"),
    ],
)
def test_join_errors_name_the_id(answers: list[dict], message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        join_answers(QUESTIONS, answers, source="a.jsonl")


def test_read_official_question_file(tmp_path: Path) -> None:
    path = tmp_path / "coco_pope_random.json"  # official files are JSON Lines despite the name
    lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there an apple in the imange?", "label": "no"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    questions = read_pope_questions(path)
    assert [q["object"] for q in questions] == ["snowboard", "apple"]
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"coco_pope_random.json: malformed JSON on line 2"):
        read_pope_questions(path)


def _images() -> list[dict]:
    # 12 images over 8 categories; "person" is the most frequent, "dining table" co-occurs with "cup".
    objs = [["person", "dog", "frisbee"], ["person", "cup", "dining table"], ["cup", "dining table", "fork"],
            ["person", "car", "bus"], ["car", "bus", "truck"], ["person", "cup", "dining table", "fork"],
            ["dog", "frisbee", "car"], ["person", "bus", "truck"], ["cup", "fork", "dining table"],
            ["person", "dog", "car"], ["apple", "cup", "dining table"], ["person", "truck", "car"]]
    return [{"image": f"{i}.jpg", "objects": o} for i, o in enumerate(objs)]


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_builder_follows_published_rules(strategy: str) -> None:
    images = _images()
    questions = build_pope_questions(images, strategy, num_images=10, seed=3)  # type: ignore[arg-type]
    assert questions == build_pope_questions(images, strategy, num_images=10, seed=3)  # seeded
    assert [q["question_id"] for q in questions] == list(range(1, 61))
    by_image = {img["image"]: img["objects"] for img in images}
    for start in range(0, 60, 6):
        block = questions[start : start + 6]
        objects = by_image[block[0]["image"]]
        assert [q["label"] for q in block] == ["yes", "no"] * 3  # interleaved as in the official code
        assert [q["object"] for q in block[::2]] == objects[:3]  # positives: the first 3 objects
        negatives = [q["object"] for q in block[1::2]]
        assert len(set(negatives)) == 3 and not set(negatives) & set(objects)
    sampled = [questions[i]["image"] for i in range(0, 60, 6)]
    frequency = Counter(o for name in sampled for o in by_image[name])
    if strategy == "popular":
        for start in range(0, 60, 6):
            objects = by_image[questions[start]["image"]]
            ranked = [o for o, _ in sorted(frequency.items(), key=lambda kv: kv[1], reverse=True) if o not in objects]
            assert [q["object"] for q in questions[start + 1 : start + 6 : 2]] == ranked[:3]


HAND_MADE = [["person", "cup", "knife"], ["cup", "dining table", "fork", "knife"], ["cup", "dining table", "spoon"],
             ["person", "car", "bus"], ["person", "car", "truck"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adversarial_and_popular_negatives_by_hand(seed: int) -> None:
    images = [{"image": f"{i}.jpg", "objects": o} for i, o in enumerate(HAND_MADE)]
    adversarial = build_pope_questions(images, "adversarial", num_images=5, seed=seed)
    block = next(adversarial[i : i + 6] for i in range(0, 30, 6) if adversarial[i]["image"] == "0.jpg")
    # person co-occurs most with car (2); cup with knife/dining table (2; knife is in the image);
    # knife with cup (2, in the image) then person/dining table/fork (1; person in image, table used).
    assert [q["object"] for q in block[1::2]] == ["car", "dining table", "fork"]
    popular = build_pope_questions(images, "popular", num_images=5, seed=seed)
    block = next(popular[i : i + 6] for i in range(0, 30, 6) if popular[i]["image"] == "3.jpg")
    negatives = [q["object"] for q in block[1::2]]  # frequencies: person 3, cup 3, knife/table/car 2
    assert negatives[0] == "cup" and set(negatives[1:]) == {"knife", "dining table"}


def test_builder_template_and_errors() -> None:
    images = [{"image": "a.jpg", "objects": ["apple", "orange", "oven"]}, {"image": "b.jpg", "objects": ["dog", "cat", "bird"]}]
    official = build_pope_questions(images, "random", num_images=2, seed=0)
    assert {q["text"] for q in official if q["object"] == "apple"} == {"Is there an apple in the imange?"}
    fixed = build_pope_questions(images, "random", num_images=2, seed=0, an_template="Is there an {} in the image?")
    assert {q["text"] for q in fixed if q["object"] == "apple"} == {"Is there an apple in the image?"}
    with pytest.raises(ValueError, match="only 2 images"):
        build_pope_questions(images, "random", num_images=3)
    with pytest.raises(ValueError, match="unknown POPE strategy"):
        build_pope_questions(images, "hard", num_images=2)  # type: ignore[arg-type]


def test_coco_objects_per_image() -> None:
    instances = {"images": [{"id": 7, "file_name": "7.jpg"}, {"id": 8, "file_name": "8.jpg"}, {"id": 9, "file_name": "9.jpg"}],
                 "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
                 "annotations": [{"image_id": 7, "category_id": 18}, {"image_id": 7, "category_id": 1},
                                 {"image_id": 7, "category_id": 18}, {"image_id": 9, "category_id": 1}]}
    assert coco_objects_per_image(instances) == [{"image": "7.jpg", "image_id": 7, "objects": ["dog", "person"]},
                                                 {"image": "9.jpg", "image_id": 9, "objects": ["person"]}]
