"""``python -m lightning_app score ...``: output contract, tables, and errors naming file / line / id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_app.score import main
from tests.test_metrics_chair import write_coco
from tests.reference_data import GT_OBJECTS, read_log
from tests.reference_data import expected as reference_results
from tests.test_metrics_mme_amber import write_amber, write_mme_folder

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_chair_coco_dir_output_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = write_coco(tmp_path / "coco")
    caps = write_jsonl(tmp_path / "caps.jsonl", [
        {"image_id": 1, "caption": "A man throws a frisbee to two dogs near a bench."},
        {"image_id": 2, "caption": ""},
        {"image_id": 3, "caption": "A bus and a car."},
    ])
    out = tmp_path / "out.json"
    main(["chair", "--captions", str(caps), "--coco-dir", str(coco), "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    table = capsys.readouterr().out
    assert "CHAIRs" in table and "0.6667" in table
    result = json.loads(out.read_text())
    assert set(result) >= {"metrics", "counts", "captions"}
    assert result["metrics"]["CHAIRs"] == pytest.approx(2 / 3) and result["metrics"]["CHAIRi"] == pytest.approx(2 / 5)
    assert result["counts"]["num_captions"] == 3 and result["counts"]["num_object_mentions"] == 5
    assert result["captions"][0] == {
        "image_id": 1, "caption": "A man throws a frisbee to two dogs near a bench.",
        "mentioned_objects": ["person", "frisbee", "dog", "bench"], "hallucinated_objects": ["bench"],
        "gt_objects": ["dog", "frisbee", "person"],
    }
    assert result["captions"][1]["mentioned_objects"] == []  # empty caption: no mentions, still counted
    assert result["captions"][2]["hallucinated_objects"] == ["car"]  # "bus" -> "bu" in reference mode

    main(["chair", "--captions", str(caps), "--coco-dir", str(coco), "--cache-dir", str(tmp_path / "cache"),
          "--mode", "lemma", "--output", str(out)])
    lemma = json.loads(out.read_text())["captions"][2]  # gt is parsed in lemma mode too: "A bus on a street."
    assert (lemma["mentioned_objects"], lemma["hallucinated_objects"], lemma["gt_objects"]) == (["bus", "car"], ["car"], ["bus"])


def test_chair_keys_json_list_and_unknown_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1": ["dog"], "2": ["cat"]}))
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([{"id": "1", "text": "A dog."}, {"id": "777", "text": "A cat."}, {"id": "2", "text": "A cat."}]))
    out = tmp_path / "out.json"
    base = ["chair", "--captions", str(caps), "--gt-objects", str(gt), "--image-id-key", "id", "--caption-key", "text", "--output", str(out)]
    err = run_error(base, capsys)
    assert "image id '777' is not in the CHAIR ground truth" in err and not out.exists()
    main(base + ["--skip-unknown"])
    result = json.loads(out.read_text())
    assert [c["image_id"] for c in result["captions"]] == ["1", "2"]
    assert result["skipped_image_ids"] == ["777"] and result["counts"]["num_skipped_unknown"] == 1
    assert "missing" not in capsys.readouterr().err
    err = run_error(["chair", "--captions", str(caps), "--gt-objects", str(gt), "--output", str(out)], capsys)
    assert "record 0 has no key 'image_id'" in err


def test_malformed_json_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1": ["dog"]}))
    caps = tmp_path / "broken.jsonl"
    caps.write_text('{"image_id": 1, "caption": "A dog."}\n\n{"image_id": 1, "caption": "A cat."\n')
    err = run_error(["chair", "--captions", str(caps), "--gt-objects", str(gt), "--output", str(tmp_path / "o.json")], capsys)
    assert "broken.jsonl: malformed JSON on line 3" in err


def test_pope_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    questions = [{"question_id": i, "image": "x.jpg", "text": "Is there a dog in the image?", "label": lab}
                 for i, lab in enumerate(["yes", "no", "yes", "no"], start=1)]
    q1 = write_jsonl(tmp_path / "coco_pope_random.json", questions)
    q2 = write_jsonl(tmp_path / "coco_pope_popular.json", questions)
    a1 = write_jsonl(tmp_path / "a1.jsonl", [{"question_id": i, "text": t} for i, t in [(4, "NO"), (1, "Yes"), (2, "No."), (3, "Nope.")]])
    a2 = write_jsonl(tmp_path / "a2.jsonl", [{"question_id": i, "text": "No"} for i in (1, 2, 3, 4)])
    out = tmp_path / "pope.json"
    main(["pope", "--questions", str(q1), "--answers", str(a1), "--output", str(out)])
    result = json.loads(out.read_text())
    # official: NO -> yes (FP), Yes (TP), No. (TN), Nope. -> yes (TP)
    assert {k: result[k] for k in ("tp", "fp", "tn", "fn")} == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}
    assert result["accuracy"] == 0.75 and result["precision"] == pytest.approx(2 / 3) and result["recall"] == 1.0
    assert result["f1"] == pytest.approx(0.8) and result["yes_ratio"] == 0.75
    assert "accuracy" in capsys.readouterr().out
    main(["pope", "--questions", str(q1), "--answers", str(a1), "--parser", "robust", "--output", str(out)])
    assert json.loads(out.read_text())["tn"] == 2
    main(["pope", "--questions", str(q1), str(q2), "--answers", str(a1), str(a2), "--output", str(out)])
    result = json.loads(out.read_text())
    assert set(result["splits"]) == {"coco_pope_random", "coco_pope_popular"}
    assert result["splits"]["coco_pope_popular"]["yes_ratio"] == 0.0 and result["tp"] == 2 and result["tn"] == 3
    write_jsonl(a1, [{"question_id": i, "text": "yes"} for i in (1, 2, 3)])
    assert "no answer for question id 4" in run_error(["pope", "--questions", str(q1), "--answers", str(a1), "--output", str(out)], capsys)


def test_pope_questions_mme_amber_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    instances = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(6)],
                 "categories": [{"id": c, "name": n} for c, n in enumerate(["person", "dog", "cat", "car", "bus", "cup", "fork"])],
                 "annotations": [{"image_id": i, "category_id": (i + k) % 7} for i in range(6) for k in range(3)]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    main(["pope-questions", "--instances", str(tmp_path / "instances.json"), "--num-images", "4", "--seed", "1",
          "--output-dir", str(tmp_path / "pope")])
    built = sorted(p.name for p in (tmp_path / "pope").iterdir())
    assert built == ["coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random.json"]
    assert len((tmp_path / "pope" / "coco_pope_random.json").read_text().splitlines()) == 24

    main(["mme", "--results", str(write_mme_folder(tmp_path / "mme")), "--output", str(tmp_path / "mme.json")])
    assert json.loads((tmp_path / "mme.json").read_text())["total"] == 375.0

    ann, rel, safe = write_amber(tmp_path / "amber")
    (tmp_path / "responses.json").write_text(json.dumps([{"id": 3, "response": "A car and a man."}]))
    main(["amber", "--responses", str(tmp_path / "responses.json"), "--annotations", str(ann), "--relation", str(rel),
          "--safe-words", str(safe), "--output", str(tmp_path / "amber.json")])
    assert json.loads((tmp_path / "amber.json").read_text())["metrics"] == {"CHAIR": 0.5, "Cover": 1.0, "Hal": 1.0, "Cog": 0.5}
    assert "Cover" in capsys.readouterr().out


def test_module_entry_point_on_a_reference_log(tmp_path: Path) -> None:
    """The real command line, in a subprocess, through ``python -m lightning_app``."""
    out = tmp_path / "out.json"
    log = write_jsonl(tmp_path / "shikra_ours.jsonl", read_log("shikra_ours"))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_app", "score", "chair", "--captions", str(log),
         "--gt-objects", str(GT_OBJECTS), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = reference_results()["logs"]["shikra_ours"]
    result = json.loads(out.read_text())
    assert {k: result["metrics"][k] for k in expected["overall_metrics"]} == expected["overall_metrics"]
    assert [c["hallucinated_objects"] for c in result["captions"]] == [s["hallucinated_objects"] for s in expected["sentences"]]
    assert [c["mentioned_objects"] for c in result["captions"]] == [s["mscoco_generated_words"] for s in expected["sentences"]]
    assert "CHAIRs" in proc.stdout


def test_cli_dispatches_score_and_keeps_lightning_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_app.cli import main as cli_main

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1": ["dog"]}))
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "A dog and a cat."}])
    cli_main(["score", "chair", "--captions", str(caps), "--gt-objects", str(gt), "--output", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text())["metrics"]["CHAIRi"] == 0.5
    for sub in ("fit", "validate"):
        with pytest.raises(SystemExit) as exc:
            cli_main([sub, "--help"])
        assert exc.value.code == 0
        assert "--ckpt_path" in capsys.readouterr().out


def test_empty_inputs_are_errors_not_zeros(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = write_coco(tmp_path / "coco")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = str(tmp_path / "out.json")
    err = run_error(["chair", "--captions", str(empty), "--coco-dir", str(coco), "--no-cache", "--output", out], capsys)
    assert "empty.jsonl: no captions to score" in err
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "1.jpg", "text": "Is there a dog?", "label": "yes"}])
    err = run_error(["pope", "--questions", str(empty), "--answers", str(questions), "--output", out], capsys)
    assert "empty.jsonl: no questions to score" in err
    err = run_error(["pope", "--questions", str(questions), "--answers", str(empty), "--output", out], capsys)
    assert "empty.jsonl: no answers to score" in err
    assert not Path(out).exists()
