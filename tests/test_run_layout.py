"""The run layout (where a run writes), SLURM's resume decision, and overlay configs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from lightning_app.run_layout import RunInTheWayError, RunLayout, build_key, resume_checkpoint
from lightning_app.suite_cli import expand_config_bases

REPO = Path(__file__).resolve().parents[1]


def _touch(path: Path, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_layout_directories_and_names(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "grounded")
    assert layout.run_dir == tmp_path / "grounded"
    assert layout.checkpoints == tmp_path / "grounded" / "checkpoints"
    assert layout.demo_backbone("abc") == tmp_path / "demo_backbone" / "abc"
    assert RunLayout(tmp_path).name == "run"
    for bad in ("", "a/b", "../x", ".hidden"):
        with pytest.raises(ValueError, match="run_name must be"):
            RunLayout(tmp_path, bad)
    assert build_key({"a": 1, "b": [2]}) == build_key({"b": [2], "a": 1}) != build_key({"a": 2, "b": [2]})


def test_first_start_never_resumes_and_refuses_an_earlier_run(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "grounded")
    assert resume_checkpoint(layout, restart=0) is None  # nothing there: a fresh start
    _touch(tmp_path / "other" / "checkpoints" / "last.ckpt", age=0)  # another run's checkpoint beside it
    assert resume_checkpoint(layout, restart=0) is None
    last = _touch(layout.checkpoints / "last.ckpt", age=10)
    with pytest.raises(RunInTheWayError, match=r"already holds checkpoints .*--ckpt_path .*last.ckpt.*--run_name"):
        resume_checkpoint(layout, restart=0)
    assert resume_checkpoint(layout, restart=1) == last


def test_a_restart_resumes_the_newest_of_its_own_checkpoints(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "grounded")
    assert resume_checkpoint(layout, restart=2) is None  # requeued before its first checkpoint: from the start
    _touch(layout.checkpoints / "last.ckpt", age=30)
    hpc = _touch(layout.run_dir / "hpc_ckpt_1.ckpt", age=5)
    _touch(layout.checkpoints / "epoch=0-step=10.ckpt", age=0)  # not a resume point
    _touch(layout.run_dir / "hpc_ckpt_x.ckpt", age=0)  # not Lightning's name
    assert resume_checkpoint(layout, restart=1) == hpc
    newer = _touch(layout.checkpoints / "last-v1.ckpt", age=1)
    assert resume_checkpoint(layout, restart=1) == newer


def test_overlay_configs_expand_to_base_then_overlay(tmp_path: Path) -> None:
    argv = expand_config_bases(["fit", "--config", str(REPO / "configs" / "demo_baseline.yaml"), "--trainer.max_steps", "3"])
    assert argv[:3] == ["fit", "--config", str(REPO / "configs" / "demo.yaml")]
    overlay = yaml.safe_load(argv[4])
    assert "config" not in overlay and overlay["run_name"] == "baseline"
    assert overlay["model"]["init_args"]["grounding"] == {"enabled": False, "word_score": False}
    assert argv[5:] == ["--trainer.max_steps", "3"]
    plain = ["validate", "--config=" + str(REPO / "configs" / "demo.yaml")]
    assert expand_config_bases(plain) == ["validate", "--config", str(REPO / "configs" / "demo.yaml")]
    (tmp_path / "a.yaml").write_text("config: b.yaml\nrun_name: a\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\nrun_name: b\n")
    with pytest.raises(SystemExit, match="cycle"):
        expand_config_bases(["fit", "--config", str(tmp_path / "a.yaml")])
