"""benchmarks/gpu_suite.sh stays runnable without a GPU.

Its ``--smoke`` mode runs every step's command at tiny sizes on the CPU: the DeepSpeed commands (ZeRO-2/3 in
zero_throughput.py, and the Lightning fit/validate with configs/strategies/zero2.yaml and zero3.yaml) must get as
far as Lightning's refusal of the CPU, and the zero2 fit then trains and validates from its checkpoint with the
plain strategy. The summary must hold one entry per step, with the figures each script wrote. Without --smoke on
a CPU the suite must stop at its environment check, loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_suite import OPT_IN, REFUSAL, STEPS, outcome, peak_tflops
from models.decoding import METHODS

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED_STEPS = ("zero_zero2", "zero_zero3", "fit_zero2", "validate_zero2", "fit_zero3", "validate_zero3")


def _suite(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu_suite_out")
    proc = _suite(out, "--smoke")
    summary = json.loads((out / "gpu_suite.json").read_text()) if (out / "gpu_suite.json").is_file() else {}
    markdown = (out / "gpu_suite.md").read_text() if (out / "gpu_suite.md").is_file() else ""
    return proc, summary, markdown


def _commands(step: dict, kind: str) -> list[str]:
    return [c["command"] for c in step["commands"] if c["kind"] == kind]


@pytest.mark.slow  # the whole suite in smoke mode: ~2 min on 2 cores
def test_smoke_runs_every_step_and_writes_one_entry_each(smoke) -> None:
    proc, summary, markdown = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [s["step"] for s in summary["steps"]] == [name for name, _ in STEPS]
    assert summary["passed"] and summary["failed"] == [] and summary["mode"] == "smoke"
    for step in summary["steps"]:
        if step["part"] in OPT_IN:  # run only when --only names them (test_opt_in_part_runs_when_named)
            assert step["status"] == f"not selected (opt-in: --only {step['part']})" and not step["commands"], step
            continue
        assert step["status"].startswith("ok"), step
        assert step["commands"] and all(c["passed"] for c in step["commands"]), step
        assert f"| {step['step']} | {step['status']} |" in markdown
    assert "n/a (smoke sizes)" in markdown and "meets" not in markdown  # no target is judged on smoke sizes


@pytest.mark.slow  # the whole suite in smoke mode: ~2 min on 2 cores
def test_smoke_deepspeed_commands_reach_the_cpu_refusal(smoke) -> None:
    _, summary, _ = smoke
    steps = {s["step"]: s for s in summary["steps"]}
    for name in DEEPSPEED_STEPS:
        refused = _commands(steps[name], "refusal")
        strategy = name.rsplit("_", 1)[1]
        if name == "validate_zero2":  # validated from the plain-strategy fit's checkpoint instead
            assert _commands(steps[name], "substitute")
            continue
        assert len(refused) == 1, steps[name]
        assert f"--strategies {strategy}" in refused[0] or f"configs/strategies/{strategy}.yaml" in refused[0]
    # the plain-strategy fit is the refused command with the strategy replaced, nothing else
    (fit,), (plain,) = _commands(steps["fit_zero2"], "refusal"), _commands(steps["fit_zero2"], "substitute")
    assert plain == fit + " --trainer.strategy auto"
    (validate,) = _commands(steps["validate_zero2"], "substitute")
    assert " validate " in validate and "--ckpt_path" in validate and "zero2/checkpoints/last.ckpt" in validate


@pytest.mark.slow  # the whole suite in smoke mode: ~2 min on 2 cores
def test_smoke_figures_come_from_each_script(smoke) -> None:
    _, summary, _ = smoke
    figures = {s["step"]: s.get("figures") for s in summary["steps"]}
    assert figures["env"]["cuda_available"] is False and figures["env"]["packages"]["deepspeed"]
    cases = figures["overhead"]["cases"]
    assert set(cases) == {"fwd+bwd", "prefill", "decode/token"}
    for r in cases.values():
        assert r["plain_median_ms"] > 0
        assert r["ratio_median"] == pytest.approx(r["grounded_median_ms"] / r["plain_median_ms"])
    zero = figures["zero_ddp"]
    (row,) = zero["results"]
    assert row["strategy"] == "ddp"
    assert row["tokens_s"] == pytest.approx(zero["batch_size"] * zero["tokens_per_row"] / row["step_s"])
    assert row["peak_gib"] is None  # no GPU: no peak memory
    substitute = figures["substitute"]
    assert substitute["shape"]["text_layers"] == 4 and Path(substitute["world"]["root"]).name == "world"
    fit = figures["fit_zero2"]
    assert fit["steps"] == 2 and fit["checkpoint_kind"] == "file" and fit["report"]["step"] == 2
    assert {"train/lm", "train/grounding", "train/contrastive"} <= set(fit["train"])
    assert figures["validate_zero2"]["same_as_fit"] is True  # the checkpoint's weights reproduce the fit's report
    rows = figures["decoding"]["models"]["tiny"]["rows"]
    assert [r["method"] for r in rows] == list(METHODS) and "grounded" in METHODS
    assert all(r["small"] > 0 and r["large"] > 0 for r in rows)


@pytest.mark.slow  # the whole suite in smoke mode: ~2 min on 2 cores
def test_gpu_summary_judges_the_targets(smoke) -> None:
    """The same summary as a GPU run's: each target gets its verdict from the figures (ZeRO-2's MFU, the overhead
    ratios, greedy's batch speedup, grounded decoding's cost)."""
    import copy

    from benchmarks.gpu_summary import markdown

    summary = copy.deepcopy(smoke[1])
    summary["mode"] = "gpu"
    steps = {s["step"]: s for s in summary["steps"]}
    zero2 = copy.deepcopy(steps["zero_ddp"]["figures"])
    zero2["results"][0].update(strategy="zero2", mfu=0.41, mfu_6n=0.55, peak_gib=30.0)
    steps["zero_zero2"].update(status="ok", figures={**zero2, "estimate_gib": 30.2})
    steps["overhead"]["figures"]["cases"]["prefill"]["ratio_median"] = 1.01
    steps["overhead"]["figures"]["cases"]["fwd+bwd"]["ratio_median"] = 1.03
    text = markdown(summary)
    assert "| zero2 | " in text and "| 30.0 | 30.2 | 41.0% | 55.0% | meets |" in text
    row = {case: text.split(f"| {case} |")[1].split("\n")[0] for case in ("prefill", "fwd+bwd")}
    assert "| 1.010 |" in row["prefill"] and row["prefill"].endswith("| meets |")
    assert row["fwd+bwd"].endswith("| **misses** |")
    assert "n/a (smoke sizes)" not in text


def test_opt_in_part_runs_when_named(tmp_path: Path) -> None:
    """``--only decoding7b`` runs the 7B-shaped decoding table's step (smoke: the tiny model's) and nothing else."""
    proc = _suite(tmp_path, "--smoke", "--only", "decoding7b")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["decoding7b"]["status"].startswith("ok") and steps["decoding"]["status"] == "not selected (--only)"
    rows = steps["decoding7b"]["figures"]["models"]["tiny"]["rows"]
    assert [r["method"] for r in rows] == list(METHODS) and all(r["large"] > 0 for r in rows)
    assert "## Decoding methods: captions/s, 7B-shaped model" in (tmp_path / "gpu_suite.md").read_text()


def test_gpu_mode_without_cuda_stops_at_the_environment_check(tmp_path: Path) -> None:
    proc = _suite(tmp_path, "--only", "decoding")
    assert proc.returncode == 1
    assert "CUDA is not available" in proc.stderr and "FAILED: env" in proc.stderr
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert summary["failed"] == ["env"] and summary["mode"] == "gpu"
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["decoding"] == "not run: env failed" and status["overhead"] == "not selected (--only)"


def test_a_spent_budget_skips_steps_and_fails(tmp_path: Path) -> None:
    proc = _suite(tmp_path, "--smoke", "--only", "decoding", GPU_SUITE_BUDGET_S="45")
    assert proc.returncode == 1
    env = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"][0]
    assert env["status"] == "skipped: the run's 45 s budget is spent"


def test_bad_arguments_are_refused() -> None:
    for args in (["--only", "overhead,nonsense"], ["--fast"]):
        proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "gpu_suite.sh: unknown" in proc.stderr


def test_outcome_of_a_refusal_needs_deepspeeds_own_message(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text(f"Traceback ...\nRuntimeError: The {REFUSAL} but `CPUAccelerator` is used.\n")
    assert outcome("refusal", 1, 60, log, None)[0]
    assert not outcome("refusal", 0, 60, log, None)[0]  # it ran through: not the refusal
    log.write_text("ModuleNotFoundError: No module named 'deepspeed'\n")
    assert outcome("refusal", 1, 60, log, None) == (False, "failed (exit 1), not DeepSpeed's CPU refusal")
    assert outcome("run", 124, 60, log, None) == (False, "timeout: still running after its 60 s limit")
    assert outcome("run", 0, 60, log, None) == (True, "ok")


def test_peak_of_known_gpus(monkeypatch) -> None:
    monkeypatch.delenv("GPU_PEAK_TFLOPS", raising=False)
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Some GPU") is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "100")
    assert peak_tflops("Some GPU") == 100.0


def test_memory_estimate_on_one_gpu_is_the_plans_unsharded_row() -> None:
    """The summary's estimate (docs/scale.md's model at the measured batch on one GPU) at the plan's own setting
    (16 rows of 576 + 44 tokens, a negative for every caption row) equals docs/scale.md's DDP row for 7B LoRA,
    which shards nothing; on one GPU ZeRO-2 has one rank to partition over, so it is the same."""
    from benchmarks.gpu_summary import memory_estimates

    rows = (REPO / "docs" / "scale.md").read_text().splitlines()
    row = next(r for r in rows if r.startswith("| LLaVA-1.5 7B | LoRA | DDP |"))
    estimate = memory_estimates(batch=16, tokens=620, negative_share=1.0)
    assert estimate["ddp"] == pytest.approx(float(row.split("|")[9]), abs=0.05)
    assert estimate["zero2"] == pytest.approx(estimate["ddp"])
