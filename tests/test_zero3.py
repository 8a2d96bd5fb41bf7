"""GroundedVLM under real DeepSpeed ZeRO-3 on CPU (gloo) in subprocesses running tests/zero3_worker.py.

The reference is the same model without DeepSpeed. One rank: identical weights after the partitioned load
(LoRA B still zero), identical loss and grounding scores through the engine, and an adapter export after a
step that holds the full trained tensors (not the empty local shards). Two ranks: one step on a different
batch per rank equals one step of the unsharded model on the mean loss, the export gathers the shards of
both ranks, and greedy generation of different lengths per rank finishes with the reference's tokens.
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


def _env(port: int, rank: int, world: int) -> dict:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1"}


def _worker(mode: str, tiny: Path, out: Path, rank: int, world: int, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "zero3_worker.py"), mode, str(tiny), str(out)],
                            cwd=REPO, env=_env(port, rank, world), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"ZeRO-3 worker hung\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    pytest.importorskip("deepspeed")
    return write_tiny_backbone("llava", tmp_path / "tiny", ["a cat on a mat", "describe the image."], text_layers=2)


def test_zero3_loads_trains_and_exports_like_the_unsharded_model(tiny: Path, tmp_path: Path) -> None:
    found = _result(_worker("single", tiny, tmp_path / "run", 0, 1, _free_port()))
    assert found["zero3_config"]["zero_optimization"]["stage"] == 3 and found["zero3_config"]["bf16"] == {"enabled": True}
    assert found["frozen_unpartitioned"] == []
    assert found["mismatched_at_load"] == []
    assert found["lora_b_zero_at_start"] and found["trainable_partitioned"]
    assert found["loss"] == pytest.approx(found["reference_loss"], abs=1e-6)
    assert found["score_max_diff"] < 1e-5
    assert found["adapter_tensors"] > 0 and found["adapter_empty"] == []
    assert found["lora_b_trained"] and found["adapter_matches_engine"]
    assert found["gate_shapes"] == [[1]]
    # exclude_frozen_parameters: the checkpoint is far smaller than the frozen weights alone, and it restores
    # exactly into a freshly loaded model (non-strict: the frozen weights come from the backbone)
    assert not found["strict_loading"]
    assert found["checkpoint_bytes"] < found["frozen_bytes"] / 4, found
    assert found["restored_equal"] and found["second_step_equal"]


def test_zero3_two_ranks_step_export_and_generate_like_the_unsharded_model(tiny: Path, tmp_path: Path) -> None:
    port = _free_port()
    procs = [_worker("ranks", tiny, tmp_path / "run", rank, 2, port) for rank in range(2)]
    found = [_result(proc) for proc in procs]
    for rank, result in enumerate(found):
        assert result["rank"] == rank
        assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5)
        assert result["adapter_tensors"] > 0 and result["lora_b_moved"] > 1e-4  # trained, not the empty shards
        assert result["adapter_max_diff"] < 1e-6  # one step equals the unsharded step on both batches
        assert result["generated"] == result["reference_generated"]
    assert [len(r["generated"]) for r in found] == [2, 6]
