"""The suite's CLI: LightningCLI subcommands (fit/validate/test/predict) plus ``score``, ``sweep`` and ``analyze``.

``score`` scores caption/answer files from any tool (see :mod:`lightning_app.score`);
``sweep`` runs experiment configs over seeds into one table (:mod:`lightning_app.sweep`);
``analyze`` measures what grounding sees on the validation split (:mod:`lightning_app.analyze`); every other
subcommand is LightningCLI (:class:`lightning_app.suite_cli.SuiteCLI`) with the model and datamodule given
as ``class_path``/``init_args``. After ``fit`` and ``validate`` the validation report is printed.

Overlay configs (``configs/demo_baseline.yaml``): see :func:`lightning_app.suite_cli.expand_config_bases`.
"""

from __future__ import annotations

import os
import sys


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "score":
        from lightning_app.score import main as score_main

        score_main(argv[1:])
        return
    if argv and argv[0] == "sweep":
        from lightning_app.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    if argv and argv[0] == "analyze":
        from lightning_app.analyze import main as analyze_main

        analyze_main(argv[1:])
        return
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")  # wandb never asks for a login
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_app.suite_cli import SuiteCLI

    SuiteCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
    _leave_process_group()


def _leave_process_group() -> None:
    """Under DDP, ranks leave together: wait for every rank, then tear the process group down explicitly.

    Left to interpreter exit, a rank that finishes first (rank 1, while rank 0 still writes the report) could
    abort in teardown ("terminate called without an active exception") and fail the srun job step.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
