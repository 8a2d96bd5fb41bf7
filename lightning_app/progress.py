"""A plain-text progress line for logs that are not a terminal (SLURM output files, CI).

Progress bars redraw one terminal line; written to a file they show nothing useful until the end. When
stdout is not a terminal, ``SuiteCLI`` adds :class:`TextProgress`, which prints one line every
``every_n_steps`` optimizer steps on global rank 0::

    step 120/1300 (9%) | 3.1 steps/s | eta 6m20s | train/loss 0.512, train/lm 0.498
"""

from __future__ import annotations

import math
import time

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["TextProgress"]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TextProgress(Callback):
    """Print ``step N/TOTAL (P%) | R steps/s | eta T | metrics`` every ``every_n_steps`` training steps.

    Args:
        every_n_steps: steps between lines (``SuiteCLI`` uses the trainer's ``log_every_n_steps``).
        metrics: how many of the progress-bar metrics (those logged with ``prog_bar=True``) to show.
    """

    def __init__(self, every_n_steps: int = 50, metrics: int = 6) -> None:
        if every_n_steps < 1:
            raise ValueError(f"TextProgress.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.metrics = every_n_steps, metrics
        self._start: tuple[float, int] | None = None
        self._printed = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)  # a resumed run counts its rate from here

    def line(self, trainer: Trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        started, first = self._start or (time.monotonic(), step)
        elapsed = time.monotonic() - started
        rate = (step - first) / elapsed if elapsed > 0 else float("nan")
        where = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        eta = _duration((total - step) / rate) if total and rate > 0 else "?"
        shown = [f"{k} {float(v):.4g}" for k, v in list(trainer.progress_bar_metrics.items())[: self.metrics]]
        return " | ".join([where, f"{rate:.2f} steps/s", f"eta {eta}", ", ".join(shown)]).rstrip(" |")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # counts optimizer steps: with gradient accumulation, once per several batches
        if trainer.is_global_zero and step > self._printed and step % self.every_n_steps == 0:
            self._printed = step
            print(self.line(trainer), flush=True)
