"""MME (acc, acc+, perception/cognition totals) and AMBER generative metrics on hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metrics.amber import AMBER, AmberAnnotations, amber, load_amber_annotations, read_amber_responses
from metrics.mme import MME, mme, parse_mme_answer, read_mme_results


@pytest.mark.parametrize(
    ("prediction", "parsed"),
    [("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("Yes.", "yes"), ("yes\n", "yes"),
     ("There is no dog.", "other"), ("Not sure", "no"), ("I think yes", "other"), ("", "other")],
)
def test_mme_answer_rule(prediction: str, parsed: str) -> None:
    assert parse_mme_answer(prediction) == parsed


def write_mme_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "existence.txt").write_text(
        "a.jpg\tIs there a dog?\tYes\tYes\n"
        "a.jpg\tIs there a cat?\tNo\tNo\n"
        "b.jpg\tIs there a car?\tYes\tYes, there is.\n"
        "b.jpg\tIs there a bus?\tNo\tYes\n"
    )
    (folder / "OCR.txt").write_text("c.jpg\tDoes it say STOP?\tYes\tNo\nc.jpg\tDoes it say GO?\tNo\tNo\n")
    (folder / "code_reasoning.txt").write_text("d.jpg\tIs the output 3?\tYes\tyes\nd.jpg\tIs the output 4?\tNo\tno\n")
    (folder / "notes.txt").write_text("not a subtask file: ignored\n")
    return folder


def test_mme_scores_by_hand(tmp_path: Path) -> None:
    out = mme(*read_mme_results(write_mme_folder(tmp_path / "results")))
    # existence: 3/4 correct, 1/2 images all correct -> 75 + 50; OCR: 1/2, 0/1 -> 50; code: 200
    assert out["existence/acc"].item() == 0.75 and out["existence/acc_plus"].item() == 0.5
    assert out["existence/score"].item() == 125.0 and out["OCR/score"].item() == 50.0
    assert out["perception"].item() == 175.0 and out["cognition"].item() == 200.0 and out["total"].item() == 375.0
    assert "count/acc" not in out


def test_mme_metric_groups_images_across_batches(tmp_path: Path) -> None:
    subtasks, images, labels, predictions = read_mme_results(write_mme_folder(tmp_path / "results"))
    metric = MME()
    order = [1, 4, 0, 6, 3, 7, 2, 5]  # an image's two questions land in different batches
    for start in range(0, 8, 3):
        idx = order[start : start + 3]
        metric.update([subtasks[i] for i in idx], [images[i] for i in idx], [labels[i] for i in idx], [predictions[i] for i in idx])
    expected = mme(subtasks, images, labels, predictions)
    assert {k: v.item() for k, v in metric.compute().items()} == {k: v.item() for k, v in expected.items()}


def test_mme_records_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mme.jsonl"
    rows = [{"category": "count", "image": "x.jpg", "answer": "Yes", "prediction": "Yes"},
            {"category": "count", "image": "x.jpg", "answer": "No", "prediction": "Yes"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = mme(*read_mme_results(path))
    assert out["count/score"].item() == 50.0
    with pytest.raises(ValueError, match="unknown MME subtask 'counting'"):
        mme(["counting"], ["x"], ["yes"], ["yes"])
    with pytest.raises(ValueError, match="yes/no"):
        mme(["count"], ["x"], ["maybe"], ["yes"])


ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "grass", "frisbee"], "hallu": ["cat", "ball"]},
    {"id": 2, "type": "discriminative-hallucination", "truth": "no", "query": "Is there a cat?"},
    {"id": 3, "type": "generative", "truth": ["car"], "hallu": ["truck", "person"]},
]
RELATION = {"dog": ["puppy"], "grass": ["lawn"], "frisbee": ["disc"], "cat": ["kitten"], "ball": [],
            "car": ["vehicle"], "truck": ["lorry"], "person": ["man", "woman"], "tree": [], "image": []}
SAFE = "image\n"


def write_amber(folder: Path) -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.json").write_text(json.dumps(ANNOTATIONS))
    (folder / "relation.json").write_text(json.dumps(RELATION))
    (folder / "safe_words.txt").write_text(SAFE)
    return folder / "annotations.json", folder / "relation.json", folder / "safe_words.txt"


def test_amber_by_hand(tmp_path: Path) -> None:
    annotations = load_amber_annotations(*write_amber(tmp_path))
    assert set(annotations.truth) == {1, 3}
    responses = [
        # nouns: image (safe), puppy (dog), lawn (grass), kitten (hallucinated; hits "cat"), tree (hallucinated)
        "The image shows a puppy on the lawn with a kitten under a tree.",
        # nouns: car, men -> man (hallucinated; hits "person"), car (repeat)
        "A car and two men next to another car.",
    ]
    out = amber([1, 3], responses, annotations)
    assert out["CHAIR"].item() == pytest.approx(3 / 8)  # 3 hallucinated of 8 vocabulary nouns
    assert out["Cover"].item() == pytest.approx(3 / 4)  # dog, grass | car  of  3 + 1 truth objects
    assert out["Hal"].item() == 1.0
    assert out["Cog"].item() == pytest.approx(2 / 4)  # cat | person  of  2 + 2 hallu objects
    metric = AMBER(annotations)
    metric.update([1], responses[:1])
    metric.update([3], responses[1:])
    assert {k: v.item() for k, v in metric.compute().items()} == {k: v.item() for k, v in out.items()}
    similar = amber([1], ["A kitten."], annotations, similar=lambda a, b: {a, b} == {"kitten", "dog"})
    assert similar["CHAIR"].item() == 0.0 and similar["Cog"].item() == 0.5  # similar to truth: covered, still a Cog hit
    with pytest.raises(KeyError, match="query id 2"):
        amber([2], ["Yes"], annotations)


def test_amber_reads_responses(tmp_path: Path) -> None:
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{"id": 1, "response": "A dog."}, {"id": 3, "response": "A car."}]))
    assert read_amber_responses(path) == ([1, 3], ["A dog.", "A car."])
    assert isinstance(load_amber_annotations(*write_amber(tmp_path / "a")), AmberAnnotations)


def test_forward_returns_the_batch_value_and_accumulates(tmp_path: Path) -> None:
    subtasks, images, labels, predictions = read_mme_results(write_mme_folder(tmp_path / "results"))
    metric = MME()
    batch = metric(subtasks[:4], images[:4], labels[:4], predictions[:4])
    assert {k: v.item() for k, v in batch.items()} == {k: v.item() for k, v in mme(subtasks[:4], images[:4], labels[:4], predictions[:4]).items()}
    metric(subtasks[4:], images[4:], labels[4:], predictions[4:])
    assert metric.compute()["total"].item() == mme(subtasks, images, labels, predictions)["total"].item()

    annotations = load_amber_annotations(*write_amber(tmp_path / "amber"))
    responses = ["A puppy under a tree.", "A car and a man."]
    metric = AMBER(annotations)
    assert metric([1], responses[:1])["CHAIR"].item() == amber([1], responses[:1], annotations)["CHAIR"].item()
    metric([3], responses[1:])
    assert {k: v.item() for k, v in metric.compute().items()} == {k: v.item() for k, v in amber([1, 3], responses, annotations).items()}
