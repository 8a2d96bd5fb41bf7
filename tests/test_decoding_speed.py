"""benchmarks/decoding_speed.py stays runnable: its smoke mode (tiny LLaVA, batches 1 and 2) prints a row per method."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.decoding_speed import theory
from models.decoding import METHODS
from models.decoding.settings import BeamSettings, OPERASettings, PAISettings

REPO = Path(__file__).resolve().parents[1]


def test_theoretical_costs() -> None:
    """passes / work relative to greedy for a prompt of 100 tokens (40 without the image) and 11 new tokens."""
    assert theory("greedy", None, 100, 40, 11) == (1.0, 1.0)
    assert theory("vcd", None, 100, 40, 11) == (2.0, 2.0)
    assert theory("pai", PAISettings(gamma=1.1), 100, 40, 11) == (2.0, 1.0 + 50 / 110)
    assert theory("pai", PAISettings(gamma=1.0), 100, 40, 11) == (1.0, 1.0)
    assert theory("beam", BeamSettings(num_beams=5), 100, 40, 11) == (1.0, 150 / 110)
    assert theory("opera", OPERASettings(), 100, 40, 11) == (2.0, (100 + 50 + 275) / 110)
    assert theory("opera", OPERASettings(), 100, 40, 11, encoder_decoder=True)[0] == 6.0


def test_decoding_speed_smoke() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "benchmarks/decoding_speed.py", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert set(METHODS) <= set(rows)
    for name in METHODS:
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[1]) > 0  # captions/s at both batch sizes
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # cost vs greedy
    assert float(rows["greedy"].split("|")[5]) == 1.0  # greedy costs 1 greedy


def test_the_7b_shape_needs_cuda() -> None:
    """The 7B-shaped preset is refused on the CPU before anything is built, naming the flag to set."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "benchmarks/decoding_speed.py", "--models", "cpu,7b"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "--models 7b needs --device cuda" in proc.stderr
