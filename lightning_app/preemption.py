"""Preemption under SLURM: on the requeue signal, checkpoint at the next step boundary, then requeue the job.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves inside the signal handler, wherever
training is: in the middle of a step (a run resumed from it skips the batch in flight) or, under DDP, while
another rank is inside a gradient all-reduce (the save's collectives can then hang). Here the handler only
records the signal. After the next optimizer step the ranks agree whether any of them was signalled, all of
them take part in the save (DeepSpeed writes shards), rank 0 runs ``scontrol requeue`` and every rank waits
for SLURM to end the job. The handler replaces Lightning's when training starts and is removed at teardown,
before Lightning restores the process's original handlers. ``SuiteCLI`` adds this callback whenever it runs
under SLURM with auto-requeue.

The signal is acted on when the current training step ends: a validation pass that runs when it arrives
finishes first, so SLURM's lead time (``#SBATCH --signal=SIGUSR1@300`` in ``slurm/train.sh``) must cover a step,
a validation pass and the save.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from types import FrameType

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for array tasks, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        raise RuntimeError(f"cannot requeue: SLURM job id {job!r} (SLURM_JOB_ID / SLURM_ARRAY_*) is not set or malformed")
    return job


class RequeueOnSignal(Callback):
    """Checkpoint at a step boundary and requeue the SLURM job when ``signum`` arrives.

    Args:
        signum: the signal SLURM sends before the time limit (``#SBATCH --signal=SIGUSR1@300``).
        requeue_command: the command, followed by the job id, that requeues the job.
        grace_s: how long the ranks wait, after a successful requeue, for SLURM to end the job before they exit
            themselves; no training step runs in between, so nothing newer than the checkpoint is written.
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue_command: tuple[str, ...] = ("scontrol", "requeue"),
                 grace_s: float = 180.0) -> None:
        self.signum, self.requeue_command, self.grace_s = signal.Signals(signum), tuple(requeue_command), grace_s
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # only a flag: saving here could be mid-step or inside a collective

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._previous is None:  # after Lightning registered its handlers: replace its handler of this signal
            self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, self._previous)
        self._previous = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # any rank signalled
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        if trainer.is_global_zero:
            log.warning("%s received: saving %s at step %d, then requeueing", self.signum.name, path, trainer.global_step)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)  # every rank: DeepSpeed writes its shards, the others wait for rank 0
        requeued = False
        if trainer.is_global_zero:
            requeued = self._requeue()
        if not trainer.strategy.broadcast(requeued, src=0):
            self.requested = False  # keep training; a later signal (or the time limit) ends the job
            return
        self._wait_for_termination()

    def _requeue(self) -> bool:
        job = slurm_job_id()
        result = subprocess.run([*self.requeue_command, job], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log.warning("requeueing SLURM job %s failed (%d): %s", job, result.returncode, result.stderr.strip())
            return False
        print(f"requeued SLURM job {job}: it resumes from the checkpoint just written", flush=True)
        return True

    def _wait_for_termination(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            time.sleep(0.2)
        self._restore()
        raise SystemExit(0)  # SLURM did not end the job: leave without training further
