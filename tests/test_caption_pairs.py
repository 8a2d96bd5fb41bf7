"""CaptionPairsDataModule on a small synthetic world: labels, negatives, bad input, the pair-file format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from datamodules import CaptionPairsDataModule, WorldConfig
from datamodules.evaluation import EvaluationSource
from datamodules.labels import IGNORE
from metrics.chair_gt import load_ground_truth
from models.demo_backbone import TinyLlavaConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pairs")
    dm = CaptionPairsDataModule(
        processor=str(root / "backbone"),
        world=WorldConfig(root=root / "world", num_train=24, num_val=8),
        demo_backbone=TinyLlavaConfig(),
        batch_size=16,
        val_batch_size=8,
    )
    dm.prepare_data()
    dm.setup("fit")
    return {"root": root, "dm": dm}


def _copy_world(prepared: dict, tmp_path: Path) -> Path:
    world = tmp_path / "world"
    shutil.copytree(prepared["root"] / "world", world, ignore=shutil.ignore_patterns(".cache"))
    return world


def _dm(prepared: dict, coco_dir: Path, **kwargs) -> CaptionPairsDataModule:
    return CaptionPairsDataModule(processor=str(prepared["root"] / "backbone"), coco_dir=str(coco_dir), **kwargs)


def test_lm_labels_cover_exactly_the_positive_caption(prepared: dict) -> None:
    dm = prepared["dm"]
    tok = dm.processor.tokenizer
    rows = [r for r in dm.train_rows if r["neg_text"]][:6] + [r for r in dm.train_rows if r["kind"] == "question"][:2]
    batch = dm.train_dataloader().collate_fn([{**r, "pixels": __import__("PIL.Image").Image.open(r["image"]).convert("RGB")} for r in rows])
    for i, row in enumerate(rows):
        target = batch["input_ids"][i][batch["labels"][i] != IGNORE]
        assert tok.decode(target, skip_special_tokens=True) == row["target"].lower()
        assert target[-1].item() == tok.eos_token_id
        negative = tok.decode(target, skip_special_tokens=True)
        if row["neg_text"]:
            assert negative != row["neg_text"].lower(), "LM labels must never hold the negative caption"
    assert "labels" in batch and "neg_labels" not in batch  # negatives carry object labels only
    assert batch["neg_index"].tolist() == list(range(6))


def test_negative_token_labels_match_changed_spans(prepared: dict) -> None:
    dm = prepared["dm"]
    tok = dm.processor.tokenizer
    rows = [r for r in dm.train_rows if r["neg_text"] and r["neg_hallucinated"]][:8]
    assert rows
    from PIL import Image

    batch = dm.train_dataloader().collate_fn([{**r, "pixels": Image.open(r["image"]).convert("RGB")} for r in rows])
    for i, row in enumerate(rows):
        labels, ids = batch["neg_object_labels"][i], batch["neg_input_ids"][i]
        wrong = tok.decode(ids[labels == 0]).replace("▁", " ").split()
        expected = " ".join(row["neg_text"][s:e] for s, e in row["neg_hallucinated"]).lower().split()
        assert all(word.strip(".,") in expected or any(word in e for e in expected) for word in wrong), (wrong, expected)
        assert (labels == 0).any()
        # positive object labels sit on the mentioned object words only
        pos = tok.decode(batch["input_ids"][i][batch["object_labels"][i] == 1]).split()
        mentions = [row["target"][s:e].lower() for s, e in row["pos_spans"]]
        assert pos and all(any(p in m for m in mentions) for p in pos)


def test_validation_loaders_hold_prompts_only(prepared: dict) -> None:
    dm = prepared["dm"]
    captions, questions = dm.val_dataloader()
    batch = next(iter(captions))
    tok = dm.processor.tokenizer
    assert batch["attention_mask"][:, -1].all(), "generation prompts are left-padded"
    text = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text.strip().endswith("describe the image.")
    qbatch = next(iter(questions))
    assert set(qbatch["targets"]) <= {"yes", "no"}
    assert len(dm.val_captions) == 8


def test_missing_image_names_file_and_annotation(prepared: dict, tmp_path: Path, caplog) -> None:
    world = _copy_world(prepared, tmp_path)
    victim = sorted((world / "images" / "train").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{victim.name}.*referenced by captions_train.json annotation"):
        _dm(prepared, world, questions=False).prepare_data()
    with caplog.at_level(logging.WARNING):
        dm = _dm(prepared, world, questions=False, skip_missing=True)
        rows = dm._train_rows()
    assert "skipped 3" in caplog.text  # the image's 3 captions
    assert all(Path(r["image"]) != victim for r in rows)


def test_corrupt_image_names_the_file(prepared: dict, tmp_path: Path) -> None:
    world = _copy_world(prepared, tmp_path)
    victim = sorted((world / "images" / "train").iterdir())[1]
    victim.write_bytes(b"not a png")
    with pytest.raises(FileNotFoundError, match=rf"{victim.name}.*missing or corrupt"):
        _dm(prepared, world, questions=False).prepare_data()


def test_malformed_json_names_file_and_line(prepared: dict, tmp_path: Path) -> None:
    world = _copy_world(prepared, tmp_path)
    path = world / "annotations" / "captions_train.json"
    path.write_text('{\n "images": [\n  {"id": 1,,}\n ]\n}')
    with pytest.raises(ValueError, match=r"captions_train.json: malformed JSON at line 3"):
        _dm(prepared, world).prepare_data()


def test_empty_dataset_is_an_error(prepared: dict, tmp_path: Path) -> None:
    world = _copy_world(prepared, tmp_path)
    path = world / "annotations" / "captions_train.json"
    data = json.loads(path.read_text())
    data["annotations"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nothing to train on"):
        _dm(prepared, world, questions=False).prepare_data()


def test_pair_file_format(prepared: dict, tmp_path: Path) -> None:
    image = sorted((prepared["root"] / "world" / "images" / "train").iterdir())[0]
    pairs = [
        {"image_id": 7, "image_path": str(image), "positive_caption": "a red cup and a fork.",
         "negative_caption": "a red cup and a knife.", "hallucinated_objects": ["knife"], "grounding_labels": []},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    dm = CaptionPairsDataModule(processor=str(prepared["root"] / "backbone"), pairs_file=str(path), cache_dir=str(tmp_path / "c"))
    rows = dm._train_rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["target"] == "a red cup and a fork."
    assert [row["neg_text"][s:e] for s, e in row["neg_hallucinated"]] == ["knife"]
    assert [row["neg_text"][s:e] for s, e in row["neg_grounded"]] == ["cup"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(ValueError, match=r"bad.json: record 0 lacks"):
        CaptionPairsDataModule(processor=str(prepared["root"] / "backbone"), pairs_file=str(bad))._train_rows()


def test_prepared_rows_are_cached(prepared: dict, caplog) -> None:
    dm = prepared["dm"]
    with caplog.at_level(logging.INFO):
        rows = dm._train_rows()
    assert "loaded from cache" in caplog.text
    assert rows == dm.train_rows


def test_conflicting_world_and_coco_dir() -> None:
    with pytest.raises(ValueError, match="data.coco_dir .* and data.world.root .* disagree"):
        CaptionPairsDataModule(processor="x", coco_dir="a", world=WorldConfig(root="b"))


def test_train_questions_subset_is_balanced(prepared: dict, tmp_path: Path) -> None:
    dm = _dm(prepared, prepared["root"] / "world", train_questions_per_image=2, cache_dir=str(tmp_path))
    rows = [r for r in dm._train_rows() if r["kind"] == "question"]
    per_image: dict[str, list[str]] = {}
    for r in rows:
        per_image.setdefault(r["image"], []).append(r["target"])
    assert len(per_image) == 24
    assert all(sorted(answers) == ["no", "yes"] for answers in per_image.values())
    with pytest.raises(ValueError, match="train_questions_per_image must be an even number"):
        _dm(prepared, prepared["root"] / "world", train_questions_per_image=3)


def test_negative_fraction_keeps_a_share_of_the_negatives(prepared: dict, tmp_path: Path) -> None:
    world = prepared["root"] / "world"
    every = [r for r in prepared["dm"].train_rows if r["kind"] == "caption"]
    none = [r for r in _dm(prepared, world, negative_fraction=0.0, cache_dir=str(tmp_path / "a"))._train_rows() if r["kind"] == "caption"]
    half = [r for r in _dm(prepared, world, negative_fraction=0.5, cache_dir=str(tmp_path / "b"))._train_rows() if r["kind"] == "caption"]
    assert [r["target"] for r in none] == [r["target"] for r in every] == [r["target"] for r in half]
    assert not any(r["neg_text"] for r in none)
    with_neg = sum(bool(r["neg_text"]) for r in every)
    kept = sum(bool(r["neg_text"]) for r in half)
    assert with_neg >= 60 and 0.25 * with_neg < kept < 0.75 * with_neg  # binomial(72, 0.5): far inside
    for row in half:  # a kept negative still has its labels, a dropped one has none
        assert bool(row["neg_text"]) == bool(row["neg_grounded"] or row["neg_hallucinated"])
    dm = _dm(prepared, world, negative_fraction=0.0, cache_dir=str(tmp_path / "a"), batch_size=8)
    dm.setup("fit")
    assert "neg_input_ids" not in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match=r"data.negative_fraction must be in \[0, 1\], got 1.5"):
        _dm(prepared, world, negative_fraction=1.5)


def test_val_image_ids_and_question_files(prepared: dict, tmp_path: Path) -> None:
    world = prepared["root"] / "world"
    val_ids = sorted(prepared["dm"].evaluation("validate").ground_truth)[-8:]  # the val split's ids (train ids first)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"# a fixed list\n{val_ids[5]}\n{val_ids[2]}\n")
    questions = [json.loads(line) for line in (world / "annotations" / "questions_val.jsonl").read_text().splitlines()]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(json.dumps(q) for q in questions[:6]))
    (tmp_path / "coco_pope_adversarial.json").write_text("\n".join(json.dumps(q) for q in questions[6:10]))
    dm = _dm(prepared, world, val_image_ids=str(ids_file), val_caption_prompt="<image>\nDescribe it in detail.",
             val_question_files=[str(tmp_path / "coco_pope_random.json"), str(tmp_path / "coco_pope_adversarial.json")])
    dm.setup("validate")
    assert [r["image_id"] for r in dm.val_captions] == [val_ids[5], val_ids[2]]  # the file's order
    assert {r["prompt"] for r in dm.val_captions} == {"<image>\nDescribe it in detail."}
    assert dm.evaluation("validate").question_sets == ("random", "adversarial")
    assert [len(rows) for rows in dm.val_questions.values()] == [6, 4]
    assert len(dm.val_dataloader()) == 3
    ids_file.write_text(f"{val_ids[0]}\n12x\n")
    with pytest.raises(ValueError, match=r"ids.txt:2: expected an integer image id, got '12x'"):
        dm.setup("validate")
    ids_file.write_text("[424242]")
    with pytest.raises(ValueError, match=r"val_image_ids .*ids.txt.*: 1 ids are not images of instances_val.json"):
        dm.setup("validate")
    with pytest.raises(FileNotFoundError, match=r"data.val_question_files: no such file .*missing.json"):
        _dm(prepared, world, val_question_files=[str(tmp_path / "missing.json")])


def test_report_has_one_pope_row_per_question_set() -> None:
    from models.report import report_markdown

    pope = {"random": {"accuracy": 0.9, "precision": 0.8, "recall": 1.0, "f1": 0.88, "yes_ratio": 0.6},
            "adversarial": {"accuracy": 0.7, "precision": 0.6, "recall": 1.0, "f1": 0.75, "yes_ratio": 0.8}}
    report = {"stage": "val", "epoch": 0, "step": 1, "chair": {"CHAIRs": 0.5, "CHAIRi": 0.1, "Recall": 0.9},
              "pope": pope, "probes": {}, "settings": {"backbone": "b", "grounding": {"enabled": True}}, "examples": []}
    text = report_markdown(report)
    assert "| 50.0 | 10.0 | 90.0 | 80.0 | 81.5 | 70.0 |" in text  # POPE columns: the mean of the 2 sets
    assert "| random | 90.0 | 80.0 | 100.0 | 88.0 | 60.0 |" in text
    assert "| adversarial | 70.0 | 60.0 | 100.0 | 75.0 | 80.0 |" in text


def test_evaluation_ground_truth_is_parsed_in_the_chair_mode_asked_for(prepared: dict, tmp_path: Path) -> None:
    """``chair_mode: lemma`` reaches the ground-truth parser: each mode's spec equals ``score chair``'s ground truth."""
    world = _copy_world(prepared, tmp_path)
    captions_file = world / "annotations" / "captions_val.json"
    captions = json.loads(captions_file.read_text())
    image_id = captions["annotations"][0]["image_id"]
    captions["annotations"].append({"id": 10**6, "image_id": image_id, "caption": "A bus parked by the road."})
    captions_file.write_text(json.dumps(captions))
    dm = _dm(prepared, world, cache_dir=str(tmp_path / "cache"))
    assert isinstance(dm, EvaluationSource)
    dm.setup("validate")
    reference, lemma = dm.evaluation("validate", "reference"), dm.evaluation("validate", chair_mode="lemma")
    assert "bus" in lemma.ground_truth[image_id] and "bus" not in reference.ground_truth[image_id]  # "bu" there
    for mode, spec in (("reference", reference), ("lemma", lemma)):
        assert spec.ground_truth == load_ground_truth(coco_dir=world, mode=mode, use_cache=False)
    assert lemma.question_sets == ("pope",) and lemma.question_set(0) is None and lemma.question_set(1) == "pope"
    assert lemma.probes == ()  # a plain COCO folder has no bias rules; the world's datamodule has them
    assert prepared["dm"].evaluation("validate").probes == (("fork", "knife"),)


def test_cache_is_written_atomically(tmp_path: Path) -> None:
    """The cache appears whole under its name; a second writer of the same cache leaves the first copy and no
    staging directory behind (two runs preparing the same rows at once)."""
    import datasets

    from datamodules.caption_pairs import save_atomically

    cache = tmp_path / "pairs_x"
    save_atomically(datasets.Dataset.from_list([{"a": 1}]), cache)
    save_atomically(datasets.Dataset.from_list([{"a": 2}]), cache)
    assert datasets.load_from_disk(str(cache)).to_list() == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["pairs_x"]
