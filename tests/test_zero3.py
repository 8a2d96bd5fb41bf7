"""GroundedVLM under real DeepSpeed ZeRO-3 (CPU, gloo, one rank) in a subprocess: tests/zero3_worker.py.

The reference is the same model loaded without DeepSpeed: identical weights after the partitioned load (LoRA B
still zero), identical loss and grounding scores through the engine, and an adapter export after a step that
holds the full trained tensors (not the empty local shards).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from models.tiny import write_tiny_backbone

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_zero3_loads_trains_and_exports_like_the_unsharded_model(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    tiny = write_tiny_backbone("llava", tmp_path / "tiny", ["a cat on a mat", "describe the image."], text_layers=2)
    env = {**os.environ, "ZERO3_PORT": str(_free_port()), "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "zero3_worker.py"), str(tiny), str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["zero3_config"]["zero_optimization"]["stage"] == 3 and found["zero3_config"]["bf16"] == {"enabled": True}
    assert found["frozen_unpartitioned"] == []
    assert found["mismatched_at_load"] == []
    assert found["lora_b_zero_at_start"] and found["trainable_partitioned"]
    assert found["loss"] == pytest.approx(found["reference_loss"], abs=1e-6)
    assert found["score_max_diff"] < 1e-5
    assert found["adapter_tensors"] > 0 and found["adapter_empty"] == []
    assert found["lora_b_trained"] and found["adapter_matches_engine"]
    assert found["gate_shapes"] == [[1]]
