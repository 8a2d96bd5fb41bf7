"""LightningCLI for fit/validate/test/predict: the run layout, linked arguments, the report printed at the end.

* ``run_name`` (top level, default ``run``) and ``trainer.default_root_dir`` decide where a run writes
  (:mod:`lightning_app.run_layout`): the logger, ModelCheckpoint callbacks without a ``dirpath``, the
  report, adapter and SLURM requeue checkpoints all follow; nothing else in a config names a run directory.
* ``data.init_args.processor`` follows ``model.init_args.backbone`` (one directory, named once). With
  ``data.init_args.demo_backbone`` set and no ``model.init_args.backbone``, the backbone is the demo build
  cached under ``ROOT/demo_backbone/KEY``.
* Under SLURM with auto-requeue it adds :class:`RequeueOnSignal`, which saves the requeue checkpoint at a
  step boundary instead of inside the signal handler; when stdout is not a terminal (SLURM logs, CI) it adds
  :class:`TextProgress`, a plain progress line every ``trainer.log_every_n_steps`` steps.
* Loggers: the layout's ``CSVLogger`` (``ROOT/NAME/version_N``) always comes first; configured loggers follow
  it, a ``WandbLogger`` without a ``save_dir`` writes under ``ROOT/NAME`` (offline unless WANDB_API_KEY is set).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lightning_app.preemption import RequeueOnSignal
from lightning_app.progress import TextProgress
from lightning_app.run_layout import DEFAULT_RUN_NAME, RunLayout, build_key


def _plain(value: Any) -> Any:
    """JSON-able form of a parsed config value (Namespace, dataclass, Path)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if is_dataclass(value):
        return asdict(value)
    return value


def expand_config_bases(argv: list[str]) -> list[str]:
    """``--config FILE`` with a top-level ``config: BASE`` becomes ``--config BASE --config <FILE's other keys>``.

    An overlay config (``configs/demo_baseline.yaml``) names its base, relative to itself; its own keys then change
    only what they name, ``model: init_args:`` included (jsonargparse's own nested ``config:`` would reset the
    base's ``init_args``). Bases may have bases; a cycle is an error.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += _config_chain(argv[i + 1], set())
            i += 2
            continue
        out += _config_chain(arg.split("=", 1)[1], set()) if arg.startswith("--config=") else [arg]
        i += 1
    return out


def _config_chain(value: str, seen: set[Path]) -> list[str]:
    path = Path(value)
    if not path.is_file():
        return ["--config", value]  # a YAML string, or a missing file LightningCLI reports
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return ["--config", value]  # LightningCLI reports the syntax error with the file name
    if not isinstance(content, dict) or "config" not in content:
        return ["--config", value]
    if path.resolve() in seen:
        raise SystemExit(f"error: {path}: config bases form a cycle")
    bases = content.pop("config")
    chain: list[str] = []
    for base in [bases] if isinstance(bases, str) else bases:
        chain += _config_chain(str(path.parent / base), seen | {path.resolve()})
    return [*chain, "--config", yaml.safe_dump(content, sort_keys=False)]


def merged_config(path: str | Path) -> dict:
    """The keys of config file ``path`` after its bases (``config:``), merged as the CLI merges them: nested dicts
    key by key, anything else replaced. For tools that read a config without the CLI (benchmarks, sweep)."""
    items = expand_config_bases(["--config", str(path)])
    merged: dict = {}
    for text in items[1::2]:
        layer = yaml.safe_load(Path(text).read_text()) if Path(text).is_file() else yaml.safe_load(text)
        _merge(merged, layer or {})
    return merged


def _merge(into: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _drop(tree: dict, path: list[str]) -> None:
    """Remove ``tree[a][b]...`` for ``path`` [a, b, ...]; where a level is not a dict, its whole entry."""
    head, rest = path[0], path[1:]
    if head in tree:
        if rest and isinstance(tree[head], dict):
            _drop(tree[head], rest)
        else:
            del tree[head]


class SuiteCLI(LightningCLI):
    """LightningCLI with the suite's run layout; prints ``report.md`` and the run directory after fit, validate, test."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default=DEFAULT_RUN_NAME,
                            help="the run's directory under trainer.default_root_dir (see lightning_app.run_layout)")
        parser.link_arguments("model.init_args.backbone", "data.init_args.processor")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """The command line, or ``args`` in its place when given (never both), with overlay configs expanded."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        self._args = expand_config_bases(list(sys.argv[1:] if args is None else args))
        self.config = parser.parse_args(self._args)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``'s hyperparameters under the command line, not over it: what the command line and its
        configs set wins (``validate --ckpt_path X --model.init_args.generation.method vcd`` decodes with VCD);
        the checkpoint fills the rest.

        Lightning merges every hyperparameter of the checkpoint over the parsed command line, so each
        ``--model...`` option of a validate/test/predict of a checkpoint was silently dropped (Lightning PR #21455
        proposes the same order). Same merge as Lightning's, without the keys given explicitly."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        args = getattr(self, "_args", None)
        if args is not None:
            model = self.parser.parse_args(args, defaults=False)[subcommand].get("model")
            init_args = model.get("init_args") if model is not None else None
            for key in init_args.keys() if init_args is not None else []:
                _drop(hparams, key.split("."))
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def layout(self) -> RunLayout:
        config = self._subconfig()
        return RunLayout(Path(config.trainer.default_root_dir or "."), config.run_name)

    def before_instantiate_classes(self) -> None:
        """Fill what the config leaves to the layout: the demo backbone's directory, a WandbLogger's ``save_dir``."""
        config = self._subconfig()
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("WandbLogger"):
                if logger.init_args.get("save_dir") in (None, "."):  # "." is WandbLogger's default
                    logger.init_args.save_dir = str(self.layout().run_dir)
        self._fill_demo_backbone(config)

    def _fill_demo_backbone(self, config: Any) -> None:
        """``model.backbone`` = ``ROOT/demo_backbone/KEY`` when left to ``data.demo_backbone``; ``data.processor``
        = ``model.backbone`` again (the link is applied at parse time, before ``--ckpt_path`` hyperparameters)."""
        data = config.data.get("init_args") if config.get("data") is not None else None
        model = config.model.get("init_args") if config.get("model") is not None else None
        if data is None or model is None:
            return
        demo = data.get("demo_backbone")
        if model.get("backbone") is None and demo is not None:
            world = _plain(data.get("world")) or {}
            settings = {
                "backbone": _plain(demo), "world": {k: v for k, v in world.items() if k != "root"},
                "texts": [data.get(k) for k in ("caption_prompt", "question_prompt", "question_suffix", "train_split",
                                                "val_split")],
            }
            model.backbone = str(self.layout().demo_backbone(build_key(settings)))
        if "processor" in data:
            data.processor = model.get("backbone")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        layout = self.layout()
        trainer_config = self._get(self.config_init, "trainer", default={})
        loggers = trainer_config.get("logger")
        if loggers is not False:  # the layout's CSV logger first: its version directory is the run's (report, adapter)
            given = [] if loggers in (None, True) else list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
            if not given or not isinstance(given[0], CSVLogger):
                kwargs.setdefault("logger", [CSVLogger(save_dir=layout.run_dir, name=""), *given])
        kwargs.setdefault("default_root_dir", str(layout.run_dir))  # Lightning's SLURM checkpoints go there
        trainer = super().instantiate_trainer(**kwargs)
        if not sys.stdout.isatty() and not any(isinstance(cb, TextProgress) for cb in trainer.callbacks):
            trainer.callbacks.append(TextProgress(max(1, trainer.log_every_n_steps)))
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(layout.checkpoints)
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
