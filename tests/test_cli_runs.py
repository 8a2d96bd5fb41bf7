"""The CLI on the demo configs with a small world: every config parses, fit runs, a killed fit resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _small(tmp: Path, name: str, steps: int = 10, every: int = 4) -> list[str]:
    """Overrides that shrink a demo config to seconds, everything under ``tmp``."""
    return [
        "--data.init_args.world.root", str(tmp / "world"),
        "--data.init_args.world.num_train", "48",
        "--data.init_args.world.num_val", "10",
        "--data.init_args.batch_size", "8",
        "--data.init_args.val_batch_size", "16",
        "--data.init_args.max_val_questions", "24",
        "--model.init_args.backbone", str(tmp / "backbone"),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.default_root_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.callbacks.init_args.dirpath", str(tmp / "ckpt" / name),
        "--trainer.callbacks.init_args.every_n_train_steps", str(every),
        "--trainer.enable_progress_bar", "false",
    ]


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "lightning_app", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _report(tmp: Path, name: str) -> dict:
    reports = sorted((tmp / "runs" / name).glob("version_*/report.json"))
    assert reports, f"no report under {tmp / 'runs' / name}"
    return json.loads(reports[-1].read_text())


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_against_the_cli(config: Path) -> None:
    proc = _run(["fit", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["class_path"] == "models.GroundedVLM"
    assert printed["data"]["class_path"] == "datamodules.CaptionPairsDataModule"


def test_demo_fit_then_validate_from_checkpoint(tmp_path: Path) -> None:
    proc = _run(["fit", "--config", "configs/demo.yaml", *_small(tmp_path, "grounded", steps=6)])
    assert "report:" in proc.stdout and "CHAIRs" in proc.stdout
    report = _report(tmp_path, "grounded")
    assert report["step"] == 6 and report["settings"]["grounding"]["enabled"] is True
    assert set(report["chair"]) >= {"CHAIRs", "CHAIRi", "Recall"} and "accuracy" in report["pope"]["pope"]
    assert "fork->knife" in report["probes"]
    assert (tmp_path / "runs" / "grounded" / "version_0" / "grounding" / "grounding.safetensors").is_file()
    last = tmp_path / "ckpt" / "grounded" / "last.ckpt"
    val = _run(["validate", "--config", "configs/demo.yaml", *_small(tmp_path, "grounded", steps=6), "--ckpt_path", str(last)])
    assert "report:" in val.stdout
    again = _report(tmp_path, "grounded")
    assert again["chair"] == report["chair"] and again["pope"] == report["pope"]
    test = _run(["test", "--config", "configs/demo.yaml", *_small(tmp_path, "grounded", steps=6), "--ckpt_path", str(last)])
    assert "# Test report" in test.stdout
    assert _report(tmp_path, "grounded")["chair"] == report["chair"]  # the test split defaults to val
    _run(["predict", "--config", "configs/demo.yaml", *_small(tmp_path, "grounded", steps=6), "--ckpt_path", str(last)])
    predictions = sorted((tmp_path / "runs" / "grounded").glob("version_*/predictions.jsonl"))
    rows = [json.loads(line) for line in predictions[-1].read_text().splitlines()]
    assert len(rows) == 10 and [r["caption"] for r in rows[:6]] == [e["caption"] for e in report["examples"]]


def test_baseline_fit_runs_with_grounding_off(tmp_path: Path) -> None:
    _run(["fit", "--config", "configs/demo_baseline.yaml", *_small(tmp_path, "baseline", steps=3)])
    report = _report(tmp_path, "baseline")
    assert report["settings"]["grounding"]["enabled"] is False and report["step"] == 3


def test_killed_fit_resumes_with_identical_final_metrics(tmp_path: Path) -> None:
    base = ["fit", "--config", "configs/demo.yaml"]
    _run(base + _small(tmp_path / "a", "grounded", steps=10, every=5))
    uninterrupted = _report(tmp_path / "a", "grounded")
    crashed = base + _small(tmp_path / "b", "grounded", steps=10, every=5) + [
        "--trainer.callbacks+=tests.cli_helpers.KillAtStep", "--trainer.callbacks.step=7"]
    proc = _run(crashed, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "b" / "ckpt" / "grounded" / "last.ckpt").is_file()
    assert not list((tmp_path / "b" / "runs" / "grounded").glob("version_*/report.json"))
    killed_at = torch.load(tmp_path / "b" / "ckpt" / "grounded" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at == 5  # resumes mid-epoch from step 5; steps 6-7 were lost with the crash
    _run(base + _small(tmp_path / "b", "grounded", steps=10, every=5) + ["--ckpt_path", "last"])
    resumed = _report(tmp_path / "b", "grounded")
    final = [torch.load(tmp_path / run / "ckpt" / "grounded" / "last.ckpt", weights_only=True) for run in ("a", "b")]
    assert final[0]["global_step"] == final[1]["global_step"] == 10
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), f"{name} differs after resume"
    assert resumed["step"] == uninterrupted["step"] == 10
    assert resumed["chair"] == uninterrupted["chair"]
    assert resumed["pope"] == uninterrupted["pope"]
    assert [e["caption"] for e in resumed["examples"]] == [e["caption"] for e in uninterrupted["examples"]]


@pytest.mark.parametrize("config", ["demo.yaml", "demo_baseline.yaml"])
def test_fast_dev_run_of_each_demo_config(config: str, tmp_path: Path) -> None:
    proc = _run(["fit", "--config", f"configs/{config}", *_small(tmp_path, "dev"), "--trainer.fast_dev_run", "true"])
    reports = list((tmp_path / "runs").rglob("report.json"))
    assert len(reports) == 1, proc.stdout[-2000:]
    report = json.loads(reports[0].read_text())
    assert report["step"] == 1 and report["settings"]["grounding"]["enabled"] is (config == "demo.yaml")
    assert len(report["examples"]) > 0  # one validation batch of captions was generated and scored


def test_lora_run_saves_small_checkpoints_and_validates_from_either(tmp_path: Path) -> None:
    lora = ["--model.init_args.lora", json.dumps({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})]
    _run(["fit", "--config", "configs/demo.yaml", *_small(tmp_path, "lora", steps=4), *lora])
    report = _report(tmp_path, "lora")
    ckpt = torch.load(tmp_path / "ckpt" / "lora" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k or "grounding_gate" in k for k in keys), keys[:5]  # trainable only
    adapter = tmp_path / "runs" / "lora" / "version_0" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    from_ckpt = _run(["validate", "--config", "configs/demo.yaml", *_small(tmp_path, "lora", steps=4), *lora,
                      "--ckpt_path", str(tmp_path / "ckpt" / "lora" / "last.ckpt")])
    assert "report:" in from_ckpt.stdout
    assert _report(tmp_path, "lora")["chair"] == report["chair"]
    _run(["validate", "--config", "configs/demo.yaml", *_small(tmp_path, "lora", steps=4),
          "--model.init_args.adapter", str(adapter)])
    again = _report(tmp_path, "lora")
    assert again["chair"] == report["chair"] and again["pope"] == report["pope"]
    assert [e["caption"] for e in again["examples"]] == [e["caption"] for e in report["examples"]]
    from models import GroundedVLM, GroundingConfig

    loaded = GroundedVLM(backbone=str(tmp_path / "backbone"), grounding=GroundingConfig(layers=[-1]), adapter=str(adapter))
    loaded.configure_model()
    state = loaded.state_dict()
    assert any(("lora_B" in k) and ckpt["state_dict"][k].abs().sum() > 0 for k in keys)  # the adapters did train
    for key in keys:  # the adapter directory holds exactly the checkpoint's trained tensors
        assert torch.equal(state[key], ckpt["state_dict"][key]), key


def test_in_training_chair_lemma_equals_score_chair_lemma(tmp_path: Path) -> None:
    """``model.chair_mode: lemma`` scores validation captions exactly as ``score chair --mode lemma`` scores them."""
    from datamodules.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(root=tmp_path / "world", num_train=48, num_val=10), progress=False)
    captions_file = world / "annotations" / "captions_val.json"
    captions = json.loads(captions_file.read_text())  # a human caption whose object only lemma mode reads
    captions["annotations"].append({"id": 10**6, "image_id": captions["images"][0]["id"], "caption": "A bus."})
    captions_file.write_text(json.dumps(captions))
    args = ["--config", "configs/demo.yaml", *_small(tmp_path, "lemma"), "--model.init_args.chair_mode", "lemma"]
    _run(["validate", *args])
    in_training = _report(tmp_path, "lemma")["chair"]
    _run(["predict", *args])
    predictions = sorted((tmp_path / "runs" / "lemma").glob("version_*/predictions.jsonl"))[-1]
    scored = {}
    for mode in ("lemma", "reference"):
        out = tmp_path / f"chair_{mode}.json"
        _run(["score", "chair", "--captions", str(predictions), "--coco-dir", str(world / "annotations"),
              "--mode", mode, "--no-cache", "--output", str(out)])
        scored[mode] = json.loads(out.read_text())["metrics"]
    assert {k: in_training[k] for k in ("CHAIRs", "CHAIRi", "Recall")} == {
        k: scored["lemma"][k] for k in ("CHAIRs", "CHAIRi", "Recall")}
    assert scored["lemma"]["Recall"] != scored["reference"]["Recall"]  # the modes' ground truths differ
