"""The suite's CLI: LightningCLI subcommands (fit/validate/test/predict) plus ``score``.

``score`` scores caption/answer files from any tool (see :mod:`lightning_app.score`); every other
subcommand is LightningCLI with the model and datamodule given as ``class_path``/``init_args``.
"""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "score":
        from lightning_app.score import main as score_main

        score_main(argv[1:])
        return
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
