"""The GPU benchmark script stays runnable: its CPU smoke mode (tiny shape, plain strategy) prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.zero_throughput import SHAPES, model_flops

REPO = Path(__file__).resolve().parents[1]


def test_model_flops_of_a_lora_step() -> None:
    shape = SHAPES["7b"]
    lora, full = model_flops(shape, batch=2, seq=708, negatives=1, vision_params=300, lm_params=1000)
    attention = 12 * 32 * 708 * 4096
    assert lora == 3 * 708 * (4 * 1000 + attention) + 3 * 576 * 2 * 300
    assert full == 3 * 708 * (6 * 1000 + attention) + 3 * 576 * 6 * 300


def test_zero_throughput_cpu_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/zero_throughput.py", "--shape", "tiny", "--accelerator", "cpu",
           "--strategies", "ddp", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("ddp"))
    step, tokens = float(row.split()[1]), float(row.split()[2])
    assert step > 0 and tokens > 0
