"""``python -m datamodules.world``: generate (or verify) a world and print its statistics as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from datamodules.world.config import WorldConfig
from datamodules.world.files import WorldMismatchError, generate_world, world_stats


def _parse_bias(text: str) -> tuple[str, str, float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"bias must be ANCHOR:COMPANION:PROBABILITY (fork:knife:0.9), got {text!r}")
    try:
        return parts[0], parts[1], float(parts[2])
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bias probability must be a number, got {parts[2]!r}") from error


def _parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(WorldConfig) if f.name != "root"}
    p = argparse.ArgumentParser(prog="python -m datamodules.world", description="Generate the synthetic world.")
    p.add_argument("--root", required=True, type=Path, help="output directory")
    ints = ("seed", "num_train", "num_val", "image_size", "min_objects", "max_objects", "clutter")
    for name in ints + ("captions_per_image", "questions_per_image"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name], help="default %(default)s")
    for name in ("companion_scale", "companion_contrast", "background_noise", "val_probe_fraction"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=defaults[name], help="default %(default)s")
    p.add_argument(
        "--categories", type=lambda s: tuple(x.strip() for x in s.split(",")), default=defaults["categories"],
        help="comma-separated COCO names (default: %(default)s)",
    )
    p.add_argument(
        "--object-scale", type=float, nargs=2, default=defaults["object_scale"], metavar=("LOW", "HIGH"),
        help="object size as a fraction of its grid cell (default: %(default)s)",
    )
    p.add_argument("--bias", type=_parse_bias, action="append", help="ANCHOR:COMPANION:P, repeatable (fork:knife:0.9)")
    p.add_argument("--no-bias", action="store_true", help="no co-occurrence bias (sets --val-probe-fraction 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different world at ROOT")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output is identical)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate (or verify) a world and print its statistics as JSON."""
    args = _parser().parse_args(argv)
    if args.no_bias and args.bias:
        _parser().error("--bias and --no-bias exclude each other")
    values = {f.name: getattr(args, f.name) for f in fields(WorldConfig) if f.name not in ("bias", "object_scale")}
    bias = () if args.no_bias else tuple(args.bias) if args.bias else WorldConfig.bias
    values["val_probe_fraction"] = 0.0 if args.no_bias else args.val_probe_fraction
    try:
        config = WorldConfig(**values, bias=bias, object_scale=tuple(args.object_scale))
        root = generate_world(config, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress)
    except (ValueError, WorldMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(world_stats(root), indent=2))
    return 0
