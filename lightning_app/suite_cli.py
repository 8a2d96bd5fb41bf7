"""LightningCLI for fit/validate/test/predict that prints the run's validation report at the end."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI


class SuiteCLI(LightningCLI):
    """LightningCLI that prints ``report.md`` and the run directory after fit, validate and test."""

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
