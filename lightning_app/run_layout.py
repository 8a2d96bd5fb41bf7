"""Where a run writes: the one place that decides it. ``SuiteCLI`` and ``slurm/train.sh`` both follow it.

Given ``trainer.default_root_dir`` ROOT and the top-level ``run_name`` NAME::

    ROOT/NAME/version_N/       the logger's directory: config.yaml, metrics.csv, report.json/.md, grounding/,
                               adapter/, predictions.jsonl (a new version per fit / validate / test / predict)
    ROOT/NAME/checkpoints/     ModelCheckpoint (last.ckpt, ...): shared by the versions of NAME only, so
                               ``--ckpt_path last`` continues NAME and two names never share a checkpoint
    ROOT/NAME/hpc_ckpt_K.ckpt  SLURM requeue checkpoints (the trainer's own default_root_dir is ROOT/NAME)
    ROOT/demo_backbone/KEY/    the offline demo backbone, shared by the runs under ROOT that build it the same
                               way (KEY is a digest of its build settings)

    python -m lightning_app.run_layout resume --restart N -- FIT_ARGUMENTS...

prints the checkpoint a SLURM job must resume from (nothing: start fresh) and exits 2 with a message when a
first start (N = 0) would train over an existing run (see :func:`resume_checkpoint`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_RUN_NAME", "RunInTheWayError", "RunLayout", "build_key", "resume_checkpoint"]

DEFAULT_RUN_NAME = "run"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunInTheWayError(RuntimeError):
    """A first start would continue (or overwrite) a run that is already in its directory."""


@dataclass(frozen=True)
class RunLayout:
    """The directories of run ``name`` under ``root`` (see the module docstring)."""

    root: Path
    name: str = DEFAULT_RUN_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"run_name must be letters, digits, '.', '_' or '-' (no '/'), got {self.name!r}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def demo_backbone(self, key: str) -> Path:
        return self.root / "demo_backbone" / key

    def checkpoint_files(self) -> list[Path]:
        """The run's resumable checkpoints, newest last: ``last*.ckpt`` and the SLURM ``hpc_ckpt_K.ckpt``."""
        found = [p for p in self.checkpoints.glob("last*.ckpt") if re.fullmatch(r"last(-v?\d+)?\.ckpt", p.name)]
        found += [p for p in self.run_dir.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)]
        return sorted(found, key=lambda p: p.stat().st_mtime)


def build_key(settings: Any) -> str:
    """A short digest of JSON-able build settings (the demo backbone's cache key)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resume_checkpoint(layout: RunLayout, restart: int) -> Path | None:
    """The checkpoint a SLURM job resumes from.

    A restarted job (``restart`` > 0: requeued after preemption or a node failure) continues its own run: the
    newest checkpoint in its run directory, or none if it was stopped before writing one. A first start
    never resumes: a checkpoint already in the run directory belongs to an earlier job and is an error.
    """
    found = layout.checkpoint_files()
    if restart > 0:
        return found[-1] if found else None
    if found:
        raise RunInTheWayError(
            f"run directory {layout.run_dir} already holds checkpoints of an earlier run ({found[-1].name}); "
            f"pass --ckpt_path {found[-1]} to continue it, or --run_name NEW (or another "
            "--trainer.default_root_dir) for a new run"
        )
    return None


def _resolved(fit_args: list[str]) -> dict:
    """The fit config the CLI resolves from ``fit_args`` (``--print_config``: parses, instantiates nothing)."""
    import yaml

    out = subprocess.run([sys.executable, "-m", "lightning_app", "fit", *fit_args, "--print_config"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cannot resolve the run's config (--print_config failed):\n{out.stderr[-3000:]}")
    return yaml.safe_load(out.stdout) or {}


def layout_of(config: dict) -> RunLayout:
    trainer = config.get("trainer") or {}
    return RunLayout(Path(trainer.get("default_root_dir") or "."), config.get("run_name") or DEFAULT_RUN_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_app.run_layout")
    sub = parser.add_subparsers(dest="command", required=True)
    resume = sub.add_parser("resume", help="print the checkpoint a SLURM job resumes from (empty: none)")
    resume.add_argument("--restart", type=int, default=0, help="SLURM_RESTART_COUNT of the job")
    resume.add_argument("fit_args", nargs=argparse.REMAINDER, help="-- then the fit arguments (--config ...)")
    args = parser.parse_args(argv)
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    try:
        found = resume_checkpoint(layout_of(_resolved(fit_args)), args.restart)
    except (RunInTheWayError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if found is not None:
        print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
