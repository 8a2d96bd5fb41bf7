"""LightningCLI for fit/validate/test/predict that prints the run's validation report at the end.

``data.init_args.processor`` follows ``model.init_args.backbone``: a config names the backbone once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_app.preemption import RequeueOnSignal


class SuiteCLI(LightningCLI):
    """LightningCLI that prints ``report.md`` and the run directory after fit, validate and test.

    Under SLURM with auto-requeue (Lightning's default there) it adds :class:`RequeueOnSignal`, which saves
    the requeue checkpoint at a step boundary instead of inside the signal handler.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.processor")  # one directory, named once

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        environment = trainer._accelerator_connector.cluster_environment
        slurm = isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal
        if slurm and not any(isinstance(cb, RequeueOnSignal) for cb in trainer.callbacks):
            trainer.callbacks.append(RequeueOnSignal(environment.requeue_signal))
        return trainer

    def _print_report(self) -> None:
        module = self.model
        if not hasattr(module, "run_dir"):
            return
        run_dir = Path(module.run_dir())  # trainer.log_dir is a broadcast under DDP: every rank must call it
        if not self.trainer.is_global_zero:
            return
        report = run_dir / "report.md"
        if report.is_file():
            print(f"\n{report.read_text()}\nreport: {report} (and report.json)\nrun directory: {run_dir}")
        else:
            print(f"\nrun directory: {run_dir} (no validation report was written)")

    def after_fit(self) -> None:
        self._print_report()

    def after_validate(self) -> None:
        self._print_report()

    def after_test(self) -> None:
        self._print_report()
