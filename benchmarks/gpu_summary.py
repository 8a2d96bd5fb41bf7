"""The summary of one ``benchmarks/gpu_suite.sh`` run: ``OUT/gpu_suite.json``, ``OUT/gpu_suite.md`` and
``OUT/gpu_suite.log`` (every command's log, one after the other), from the suite's work directory.

One entry per step of :data:`benchmarks.gpu_suite.STEPS`: its status, seconds, the commands it ran and the figures
they wrote (``overhead.py``, ``zero_throughput.py`` and ``decoding_speed.py`` JSON; the fit's ``metrics.csv``,
``report.json`` and checkpoint). The Markdown puts the figures beside the issue's targets. ZeRO peaks are set
beside docs/scale.md's memory model (``benchmarks/memory_plan.py``) evaluated for the measured setting.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

from benchmarks.gpu_suite import OPT_IN, STEPS

OVERHEAD_TARGET = 1.02  # grounded / plain at 7B shape
MFU_TARGET = 0.40  # ZeRO-2
SPEEDUP_TARGET = 8.0  # captions/s at batch 32 / batch 1, the 8-layer preset
GROUNDED_COST_TARGET = 1.3  # grounded decoding / greedy on the grounded model
LOG_LINES = 400  # of each command's log in gpu_suite.log


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _last_values(metrics: Path) -> tuple[int | None, dict[str, float]]:
    """(last logged step, last value of every train/ column) of a CSVLogger metrics.csv."""
    if not metrics.is_file():
        return None, {}
    step, last = None, {}
    with open(metrics) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("train/") and value not in ("", None):
                    last[key] = float(value)
                    step = int(row["step"])
    return step, last


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _progress(logs: list[Path]) -> dict:
    """The last ``step N/M (P%) | X steps/s`` progress line of a fit's logs."""
    text = "".join(log.read_text(errors="replace") for log in logs)
    found = re.findall(r"step (\d+)/(\d+) \(\d+%\) \| ([\d.]+) steps/s", text)
    return {"steps": int(found[-1][0]), "steps_per_s": float(found[-1][2])} if found else {}


def _versions(run: Path) -> list[Path]:
    return sorted(run.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def fit_figures(work: Path, strategy: str) -> dict:
    run = work / "runs" / strategy
    versions = _versions(run)
    step, losses = _last_values(versions[0] / "metrics.csv") if versions else (None, {})
    report = _json(versions[0] / "report.json") if versions else None
    ckpt = run / "checkpoints" / "last.ckpt"
    return {"last_step": step, "train": losses, **_progress(sorted((work / "logs").glob(f"fit_{strategy}.*.log"))),
            "checkpoint": str(ckpt) if ckpt.exists() else None,
            "checkpoint_mib": _size(ckpt) / 2**20 if ckpt.exists() else None,
            "checkpoint_kind": ("DeepSpeed directory" if ckpt.is_dir() else "file") if ckpt.exists() else None,
            "report": {k: report.get(k) for k in ("step", "chair", "pope")} if report else None}


def validate_figures(work: Path, strategy: str) -> dict:
    versions = _versions(work / "runs" / strategy)
    if len(versions) < 2:
        return {"report": None}
    fit, val = _json(versions[0] / "report.json"), _json(versions[-1] / "report.json")
    same = None if not (fit and val) else (fit["chair"], fit["pope"]) == (val["chair"], val["pope"])
    return {"report": {k: val.get(k) for k in ("step", "chair", "pope")} if val else None, "same_as_fit": same}


def memory_estimates(batch: int, tokens: int, negative_share: float) -> dict[str, float]:
    """GiB per GPU that docs/scale.md's model gives a 7B LoRA step on one GPU (nothing to shard over)."""
    from dataclasses import replace

    from benchmarks.memory_plan import ARCHS, GIB, ROOT, STRATEGIES, activation_bytes, count_params, \
        model_state_bytes, read_run_settings

    arch = ARCHS[0]
    run = replace(read_run_settings(ROOT / arch.config, 1), per_gpu_batch=batch, negative_fraction=negative_share)
    counts = count_params(arch, run)
    per_sample = activation_bytes(arch, run, True, tokens, math_attention=True)["total"]
    out = {}
    for strategy, name in ((STRATEGIES[0], "ddp"), (STRATEGIES[1], "zero2"), (STRATEGIES[3], "zero3")):
        states = model_state_bytes(strategy, counts.lora_resident, counts.lora_trainable, True, 1)
        out[name] = (states["weights"] + states["grads"] + states["optimizer"] + batch * per_sample) / GIB
    return out


def step_figures(work: Path, name: str) -> dict | None:
    if name in ("env", "overhead", "substitute", "decoding", "decoding7b"):
        return _json(work / f"{name}.json")
    if name.startswith("zero_"):
        return _json(work / f"{name}.json")
    strategy = name.split("_", 1)[1]
    return fit_figures(work, strategy) if name.startswith("fit_") else validate_figures(work, strategy)


def step_entry(name: str, part: str, records: list[dict], parts: list[str], work: Path, env_passed: bool) -> dict:
    mine = [r for r in records if r["step"] == name]
    entry = {"step": name, "part": part, "seconds": round(sum(r["seconds"] for r in mine), 1), "commands": mine}
    if part not in parts and part != "env":
        entry["status"] = f"not selected (opt-in: --only {part})" if part in OPT_IN else "not selected (--only)"
    elif not mine:
        entry["status"] = "failed: never ran (the suite stopped before it)" if env_passed else "not run: env failed"
    elif not all(r["passed"] for r in mine):
        entry["status"] = next(r["outcome"] for r in mine if not r["passed"])
    elif any(r["kind"] == "refusal" for r in mine):
        entry["status"] = "ok on CPU: DeepSpeed refused the CPU as expected" + (
            "; the plain strategy ran the same command" if any(r["kind"] == "substitute" for r in mine) else "")
    else:
        entry["status"] = "ok"
    if entry["status"].startswith("ok"):
        entry["figures"] = step_figures(work, name)
    return entry


def write_summary(work: Path, out: Path, mode: str, seconds: float, budget: float, parts: list[str],
                  invocation: str) -> int:
    """Write the three files; exit status 1 if any selected step did not pass."""
    records = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()] \
        if (work / "steps.jsonl").is_file() else []
    env_passed = any(r["step"] == "env" and r["passed"] for r in records)
    steps = [step_entry(name, part, records, parts, work, env_passed) for name, part in STEPS]
    failed = [s["step"] for s in steps if not s["status"].startswith(("ok", "not selected", "not run: env"))]
    env = _json(work / "env.json") or {}
    if mode == "gpu":
        for s in steps:
            zero = s.get("figures") if s["step"].startswith("zero_") else None
            if zero and zero.get("shape") == "7b":
                estimate = memory_estimates(zero["batch_size"], zero["tokens_per_row"],
                                            zero["negative_rows"] / zero["batch_size"])
                zero["estimate_gib"] = estimate[s["step"].split("_", 1)[1]]
    summary = {"suite": "benchmarks/gpu_suite.sh", "invocation": invocation, "mode": mode,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": env.get("device"), "seconds": round(seconds, 1),
               "budget_s": budget, "parts": parts, "passed": not failed, "failed": failed, "steps": steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_suite.md").write_text(markdown(summary))
    with open(out / "gpu_suite.log", "w") as f:
        for log in sorted((work / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime):
            lines = log.read_text(errors="replace").splitlines()
            shown = f", last {LOG_LINES}" if len(lines) > LOG_LINES else ""
            f.write(f"===== {log.name} ({len(lines)} lines{shown})\n")
            f.write("\n".join(lines[-LOG_LINES:]) + "\n")
    print(f"[gpu_suite] summary: {out / 'gpu_suite.md'} and gpu_suite.json, logs in gpu_suite.log")
    if failed:
        print(f"[gpu_suite] FAILED steps: {', '.join(failed)}")
    return 1 if failed else 0


def _verdict(ok: bool, mode: str) -> str:
    return "n/a (smoke sizes)" if mode == "smoke" else ("meets" if ok else "**misses**")


def _figures(by: dict, name: str) -> dict | None:
    return by[name].get("figures") if name in by else None


def _env_section(by: dict, mode: str) -> list[str]:
    env = _figures(by, "env")
    if not env:
        return []
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    gpu = f"{env['device']} ({env.get('memory_gib', '-')} GiB), bf16 {env['bf16']}, peak {env['peak_tflops']} TFLOP/s"
    return ["", "## Environment", "", f"{gpu}; Python {env['python']}, CUDA {env['cuda']}; {packages}"]


def _overhead_section(by: dict, mode: str) -> list[str]:
    f = _figures(by, "overhead")
    if not f:
        return []
    lines = ["", "## Grounded attention overhead", "",
             f"`overhead.py --preset {f['preset']}`: hidden {f['hidden']}, {f['layers']} layers, batch {f['batch']}, "
             f"{f['image_tokens']} image + {f['text_tokens']} text tokens, grounded layers {f['grounded_layers']}, "
             f"{f['dtype']}, {f['reps']} interleaved reps. Target: ratio <= {OVERHEAD_TARGET}.", "",
             "| case | plain median | grounded median | ratio median | ratio min | target |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for case, r in f["cases"].items():
        lines.append(f"| {case} | {r['plain_median_ms']:.2f} ms | {r['grounded_median_ms']:.2f} ms | "
                     f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f} | "
                     f"{_verdict(r['ratio_median'] <= OVERHEAD_TARGET, mode)} |")
    return lines


def _zero_section(by: dict, mode: str) -> list[str]:
    rows = [(name, _figures(by, f"zero_{name}")) for name in ("ddp", "zero2", "zero3")]
    rows = [(name, f) for name, f in rows if f]
    if not rows:
        return []
    f = rows[0][1]
    lines = ["", "## Training throughput: DDP / ZeRO-2 / ZeRO-3 on one device", "",
             f"`zero_throughput.py --shape {f['shape']}`: {f['device']}, batch {f['batch_size']} x "
             f"{f['tokens_per_row']} tokens (+{f['negative_rows']} negative rows), {f['steps']} timed steps after "
             f"{f['warmup']}; MFU against {f['peak_tflops']} TFLOP/s. *estimate*: docs/scale.md's memory model "
             f"(benchmarks/memory_plan.py) for this batch on one GPU. Target: MFU >= {MFU_TARGET:.0%} for ZeRO-2.", "",
             "| strategy | step s | tokens/s | peak GiB | estimate GiB | MFU (LoRA FLOPs) | MFU (6N) | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, f in rows:
        r = f["results"][0]
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        estimate = f"{f['estimate_gib']:.1f}" if "estimate_gib" in f else "-"
        target = _verdict(r["mfu"] >= MFU_TARGET, mode) if name == "zero2" else ""
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_s']:.0f} | {peak} | {estimate} | "
                     f"{r['mfu']:.1%} | {r['mfu_6n']:.1%} | {target} |")
    return lines


def _fit_section(by: dict, mode: str) -> list[str]:
    sub = _figures(by, "substitute")
    rows = []
    for strategy in ("zero2", "zero3"):
        fit, val = by[f"fit_{strategy}"], by[f"validate_{strategy}"]
        if fit["status"].startswith("not selected"):
            continue
        f, v = fit.get("figures") or {}, val.get("figures") or {}
        report = (v.get("report") or {})
        chair, pope = report.get("chair") or {}, (report.get("pope") or {}).get("pope") or {}
        rows.append(f"| {strategy} | {fit['status']} | {fit['seconds']:.0f} | {f.get('steps', '-')} | "
                    f"{f.get('steps_per_s', '-')} | {f.get('train', {}).get('train/loss', float('nan')):.3f} | "
                    f"{f.get('checkpoint_kind', '-')}, {f.get('checkpoint_mib') or 0:.1f} MiB | {val['status']} | "
                    f"{val['seconds']:.0f} | {chair.get('CHAIRs', '-')} / {pope.get('accuracy', '-')} | "
                    f"{v.get('same_as_fit', '-')} |")
    if not rows:
        return []
    shape = sub["shape"] if sub else {}
    return ["", "## Lightning + DeepSpeed: fit, then validate from its checkpoint", "",
            f"`python -m lightning_app fit --config configs/llava7b.yaml --config configs/strategies/STRATEGY.yaml` "
            f"on a substitute: text {shape.get('text_hidden')} wide x {shape.get('text_layers')} layers, "
            f"{shape.get('text_heads')} heads, vision {shape.get('vision_hidden')} x {shape.get('vision_layers')}, "
            f"{(sub or {}).get('parameters', 0) / 1e9:.2f} B random parameters; then `validate --ckpt_path "
            "RUN/checkpoints/last.ckpt`. *same*: the validation report equals the fit's end-of-training one.", "",
            "| strategy | fit | s | steps | steps/s | train/loss | checkpoint | validate | s | CHAIRs / POPE acc "
            "| same |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |", *rows]


def _decoding_section(by: dict, mode: str) -> list[str]:
    return _decoding_table(by, mode, "decoding") + _decoding_table(by, mode, "decoding7b")


def _decoding_table(by: dict, mode: str, step: str) -> list[str]:
    f = _figures(by, step)
    if not f:
        return []
    small, large = f["batches"]
    title = "Decoding methods: captions/s" + (", 7B-shaped model" if step == "decoding7b" else "")
    lines = ["", f"## {title}", "",
             f"`decoding_speed.py` on {f['device']}, {f['new_tokens']} new tokens, median of {f['reps']} reps. "
             f"Targets: speedup b{large}/b{small} >= {SPEEDUP_TARGET:g}; grounded cost <= {GROUNDED_COST_TARGET}."]
    for model, table in f["models"].items():
        lines += ["", f"{model}: {table['description']}", "",
                  f"| method | captions/s b{small} | captions/s b{large} | speedup | cost b{small} | cost b{large} "
                  "| target |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in table["rows"]:
            target = _verdict(r["speedup"] >= SPEEDUP_TARGET, mode) if r["method"] == "greedy" else ""
            if r["method"] == "grounded":
                target = _verdict(max(r["cost_small"], r["cost_large"]) <= GROUNDED_COST_TARGET, mode)
            lines.append(f"| {r['method']} | {r['small']:.2f} | {r['large']:.2f} | {r['speedup']:.1f} | "
                         f"{r['cost_small']:.2f} | {r['cost_large']:.2f} | {target} |")
    return lines


def markdown(summary: dict) -> str:
    s = summary
    verdict = "every selected step passed" if s["passed"] else f"**FAILED: {', '.join(s['failed'])}**"
    lines = [f"# GPU suite: {s['device']}", "",
             f"`{s['invocation']}` ({s['mode']} mode, {s['date']}): {s['seconds']:.0f} s of a {s['budget_s']:.0f} s "
             f"budget; {verdict}."]
    if s["mode"] == "smoke":
        lines += ["", "Smoke mode: every step at tiny sizes on the CPU, DeepSpeed steps up to its CPU refusal (the fit "
                  "and validate steps then run with the plain strategy). No figure here is a GPU measurement."]
    lines += ["", "| step | status | s |", "| --- | --- | ---: |"]
    lines += [f"| {e['step']} | {e['status']} | {e['seconds']:.0f} |" for e in s["steps"]]
    by = {e["step"]: e for e in s["steps"]}
    for section in (_env_section, _overhead_section, _zero_section, _fit_section, _decoding_section):
        lines += section(by, s["mode"])
    return "\n".join(lines) + "\n"
