"""RequeueOnSignal: a real signal mid-training checkpoints at the next step boundary and runs the requeue command.

The requeue command is a real program that records its argument; the checkpoint is then resumed and must end
exactly where an uninterrupted run ends (same step count, bitwise-equal weights). SuiteCLI adds the callback
under SLURM; tests/test_slurm.py runs the whole path on a real cluster.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_app.preemption import RequeueOnSignal, slurm_job_id


class Regression(LightningModule):
    """A linear regression; optionally sends itself ``signum`` during training step ``signal_at``."""

    def __init__(self, signal_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.signal_at, self.steps_run = signal_at, []

    def training_step(self, batch, batch_idx: int):
        self.steps_run.append(self.global_step)
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives inside the step, as SLURM's does
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, generator=g).repeat(64, 1)  # every batch alike: the order cannot matter
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(root: Path, steps: int, callbacks: list | None = None) -> Trainer:
    return Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=callbacks or [])


def test_signal_checkpoints_at_the_step_boundary_requeues_and_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    marker = tmp_path / "requeued"
    command = (sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(marker))
    callback = RequeueOnSignal(signal.SIGUSR1, requeue_command=command, grace_s=0.2)
    previous = signal.getsignal(signal.SIGUSR1)

    model = Regression(signal_at=3)
    with pytest.raises(SystemExit) as exited:
        _trainer(tmp_path / "run", 8, [callback]).fit(model)
    assert exited.value.code == 0
    assert marker.read_text() == "4242"  # the requeue command ran with the job id
    assert model.steps_run == [0, 1, 2, 3]  # nothing trained after the checkpoint
    assert signal.getsignal(signal.SIGUSR1) == previous
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    checkpoint = torch.load(hpc, weights_only=True)
    assert checkpoint["global_step"] == 4  # the signalled step completed, not cut short

    resumed = Regression()
    _trainer(tmp_path / "run", 8).fit(resumed, ckpt_path=hpc)
    reference = Regression()
    _trainer(tmp_path / "plain", 8).fit(reference)
    assert resumed.global_step == reference.global_step == 8
    assert resumed.steps_run == [4, 5, 6, 7]
    for a, b in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_failed_requeue_keeps_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    callback = RequeueOnSignal(signal.SIGUSR1, requeue_command=(sys.executable, "-c", "raise SystemExit(3)"), grace_s=0.2)
    model = Regression(signal_at=2)
    _trainer(tmp_path / "run", 6, [callback]).fit(model)
    assert model.global_step == 6 and (tmp_path / "run" / "hpc_ckpt_1.ckpt").is_file()


def test_job_id_of_array_tasks_and_missing_ids(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "99_3"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert slurm_job_id() == "100"
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID"):
        slurm_job_id()
