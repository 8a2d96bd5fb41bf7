"""Time to generate a 5,000-image synthetic world (4,800 train + 200 val, default look and bias).

Each run writes a fresh world to a temporary directory (rendering, PNG files, COCO/POPE files,
world.json) and reports the wall time per worker count; the requirement is under 60 s on 2 cores.

    python benchmarks/world_speed.py [--images 5000] [--workers 1 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from datamodules.world import WorldConfig, generate_world


def _digest(root: Path) -> str:
    """Hash of every file but world.json (which records the root): equal digests = identical worlds."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "world.json":
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for workers in args.workers:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                config = WorldConfig(Path(tmp) / "world", num_train=args.images - args.val, num_val=args.val)
                start = time.perf_counter()
                generate_world(config, workers=workers, progress=False)
                seconds = time.perf_counter() - start
                digest = _digest(config.root)
            rate = args.images / seconds
            print(f"{args.images} images, workers={workers}: {seconds:.2f} s ({rate:.0f} img/s), digest {digest}")


if __name__ == "__main__":
    main()
