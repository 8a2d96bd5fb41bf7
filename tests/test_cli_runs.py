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
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.default_root_dir", str(tmp / "runs"),
        "--run_name", name,
        "--trainer.callbacks.init_args.every_n_train_steps", str(every),
        "--trainer.enable_progress_bar", "false",
    ]


def _backbone(tmp: Path) -> Path:
    """The demo backbone the runs under ``tmp`` built (the layout's cache: runs/demo_backbone/KEY)."""
    (found,) = (tmp / "runs" / "demo_backbone").iterdir()
    return found


def _run(args: list[str], check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lightning_app", *args], cwd=cwd, capture_output=True, text=True,
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
    last = tmp_path / "runs" / "grounded" / "checkpoints" / "last.ckpt"
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


def test_a_run_writes_only_under_its_root_and_names_never_share_checkpoints(tmp_path: Path) -> None:
    """``--trainer.default_root_dir T``: logs, report, checkpoints and the demo backbone all land under T; run b,
    asked to resume (``--ckpt_path last``), does not pick up run a's checkpoint beside it."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    config = str(REPO / "configs" / "demo.yaml")
    first = _run(["fit", "--config", config, *_small(tmp_path, "a", steps=4, every=2), "--trainer.log_every_n_steps", "2"],
                 cwd=elsewhere)
    lines = [line for line in first.stdout.splitlines() if line.startswith("step ")]  # stdout is a pipe here
    assert [line.split(" |")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)"], first.stdout[-2000:]
    assert "train/lm" in lines[-1] and "steps/s" in lines[-1]
    assert "args parameter" not in first.stderr  # LightningCLI is given the command line once
    _run(["fit", "--config", config, *_small(tmp_path, "b", steps=3, every=3), "--ckpt_path", "last"], cwd=elsewhere)
    assert list(elsewhere.iterdir()) == []  # nothing relative to the working directory
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "demo_backbone"]
    assert (_backbone(tmp_path) / "config.json").is_file()  # one backbone, built once, shared by a and b
    for name, steps in (("a", 4), ("b", 3)):
        run = tmp_path / "runs" / name
        assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]
        version = run / "version_0"
        assert {"config.yaml", "hparams.yaml", "metrics.csv", "report.json", "report.md", "grounding"} <= {
            p.name for p in version.iterdir()}
        assert _report(tmp_path, name)["step"] == steps
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


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
    assert (tmp_path / "b" / "runs" / "grounded" / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "b" / "runs" / "grounded").glob("version_*/report.json"))
    killed_at = torch.load(tmp_path / "b" / "runs" / "grounded" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at == 5  # resumes mid-epoch from step 5; steps 6-7 were lost with the crash
    _run(base + _small(tmp_path / "b", "grounded", steps=10, every=5) + ["--ckpt_path", "last"])
    resumed = _report(tmp_path / "b", "grounded")
    final = [torch.load(tmp_path / run / "runs" / "grounded" / "checkpoints" / "last.ckpt", weights_only=True) for run in ("a", "b")]
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
    ckpt = torch.load(tmp_path / "runs" / "lora" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k or "grounding_gate" in k for k in keys), keys[:5]  # trainable only
    adapter = tmp_path / "runs" / "lora" / "version_0" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    from_ckpt = _run(["validate", "--config", "configs/demo.yaml", *_small(tmp_path, "lora", steps=4), *lora,
                      "--ckpt_path", str(tmp_path / "runs" / "lora" / "checkpoints" / "last.ckpt")])
    assert "report:" in from_ckpt.stdout
    assert _report(tmp_path, "lora")["chair"] == report["chair"]
    _run(["validate", "--config", "configs/demo.yaml", *_small(tmp_path, "lora", steps=4),
          "--model.init_args.adapter", str(adapter)])
    again = _report(tmp_path, "lora")
    assert again["chair"] == report["chair"] and again["pope"] == report["pope"]
    assert [e["caption"] for e in again["examples"]] == [e["caption"] for e in report["examples"]]
    from models import GroundedVLM, GroundingConfig

    loaded = GroundedVLM(backbone=str(_backbone(tmp_path)), grounding=GroundingConfig(layers=[-1], word_score=True),
                         adapter=str(adapter))
    loaded.configure_model()
    # the demo's adapter holds the candidate-word head: a model built without it refuses the adapter, naming it
    mismatched = GroundedVLM(backbone=str(_backbone(tmp_path)), grounding=GroundingConfig(layers=[-1]), adapter=str(adapter))
    with pytest.raises(ValueError, match="does not fit"):
        mismatched.configure_model()
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


def test_wandb_logger_runs_offline_without_an_api_key(tmp_path: Path, monkeypatch) -> None:
    """The wandb extra: a WandbLogger in a config logs offline (no key, no network) under the run's directory,
    after the layout's CSV logger, whose version directory still holds the report."""
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any upload would fail
    monkeypatch.setenv("WANDB_SILENT", "true")
    proc = _run(["fit", "--config", "configs/demo.yaml", *_small(tmp_path, "wandb", steps=3),
                 "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project", "grounded-test"])
    run = tmp_path / "runs" / "wandb"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list(offline[0].glob("run-*.wandb")) and (offline[0] / "files").is_dir()
    assert (offline[0] / "run-" f"{offline[0].name.rsplit('-', 1)[-1]}.wandb").stat().st_size > 0
    assert _report(tmp_path, "wandb")["step"] == 3  # the CSV logger's version directory
