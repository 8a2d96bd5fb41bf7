"""The Python half of ``benchmarks/gpu_suite.sh``: the environment check, the 4-layer 7B-wide substitute backbone,
one record per command the suite runs, and the summary (``gpu_suite.json`` + ``gpu_suite.md``).

    python benchmarks/gpu_suite.py env WORK [--smoke]
    python benchmarks/gpu_suite.py substitute WORK --world JSON [--shape 7b|tiny]
    python benchmarks/gpu_suite.py record WORK STEP KIND RC SECONDS LIMIT [--reason TEXT] -- COMMAND...
    python benchmarks/gpu_suite.py summary WORK OUT --mode gpu|smoke --seconds S --budget S --parts a,b

``record`` and ``summary`` import no torch (they run between steps); ``KIND`` is ``run`` (must exit 0),
``refusal`` (CPU smoke: must stop at Lightning's "DeepSpeed is only supported on CUDA GPUs"), ``substitute``
(CPU smoke: the same command with the plain strategy) or ``skipped`` (a dependency failed, or the time budget
is spent). The summary has one entry per step, in :data:`STEPS` order; :mod:`benchmarks.gpu_summary` renders it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# (step, part): parts are what ``gpu_suite.sh --only`` selects
STEPS = (
    ("env", "env"), ("overhead", "overhead"),
    ("zero_ddp", "zero"), ("zero_zero2", "zero"), ("zero_zero3", "zero"),
    ("substitute", "fit"), ("fit_zero2", "fit"), ("validate_zero2", "fit"), ("fit_zero3", "fit"),
    ("validate_zero3", "fit"), ("decoding", "decoding"), ("decoding7b", "decoding7b"),
)
OPT_IN = ("decoding7b",)  # parts gpu_suite.sh runs only when --only names them
REFUSAL = "DeepSpeed strategy is only supported on CUDA GPUs"
PACKAGES = ("torch", "lightning", "transformers", "peft", "deepspeed", "jsonargparse", "datasets", "spacy",
            "pycocotools", "torchmetrics", "tokenizers", "safetensors", "huggingface_hub")
# imported by the env step, so that a package that is there but broken on this machine fails it, not a later step
IMPORTS = ("deepspeed", "datasets", "spacy", "pycocotools.coco", "lightning.pytorch.cli", "peft", "models",
           "datamodules", "lightning_app.suite_cli")
# dense bf16 TFLOP/s by device name (first match wins: the PCIe/NVL H100s before the SXM one)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))
MIN_DISK_GIB = 30  # the 7B backbone (13 GiB), the substitute (3 GiB), checkpoints and the world
SUBSTITUTE_LAYERS = 4


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_tflops(device: str) -> float | None:
    """GPU_PEAK_TFLOPS, else the table's dense bf16 peak of ``device``, else None."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    return next((peak for key, peak in PEAK_TFLOPS if key in device), None)


def check_env(work: Path, smoke: bool) -> int:
    """Write WORK/env.json (versions, device, bf16, peak, disk); exit 1 naming what a GPU run lacks."""
    import torch

    packages = {name: version(name) for name in PACKAGES}
    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(), "packages": packages,
                  "disk_free_gib": round(shutil.disk_usage(work).free / 2**30, 1), "smoke": smoke}
    missing = [name for name, v in packages.items() if v is None]
    problems = [f"missing Python packages: {', '.join(missing)} (a GPU machine without network: "
                "benchmarks/gpu_packages.sh packs them, see benchmarks/RESULTS.md)"] if missing else []
    if not missing and not smoke:  # (the smoke's own steps import them all)
        problems = _import_problems()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        bf16 = torch.cuda.is_bf16_supported() and bool(torch.isfinite((x @ x).float()).all())
        info.update(device=name, devices=torch.cuda.device_count(), bf16=bf16, peak_tflops=peak_tflops(name),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info.update(device=f"CPU x{torch.get_num_threads()} threads", devices=0, bf16=False, peak_tflops=None)
    if not smoke:
        if not info["cuda_available"]:
            problems.append(f"CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                            "--smoke runs the steps at tiny sizes on a CPU")
        elif not info["bf16"]:
            problems.append(f"{info['device']} does not run bf16 (the 7B recipe's precision)")
        elif info["peak_tflops"] is None:
            problems.append(f"unknown dense bf16 peak of {info['device']}: set GPU_PEAK_TFLOPS (for MFU)")
        if info["disk_free_gib"] < MIN_DISK_GIB:
            problems.append(f"{work} has {info['disk_free_gib']} GiB free, the suite writes up to {MIN_DISK_GIB}")
    (work / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "packages"}))
    print("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _import_problems() -> list[str]:
    import importlib

    problems = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as err:  # any failure to import is the finding
            problems.append(f"import {module} failed: {type(err).__name__}: {err}")
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE

    if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
        problems.append(f"LightningCLI needs jsonargparse[signatures]: {_JSONARGPARSE_SIGNATURES_AVAILABLE}")
    return problems


def _prompts(config: Path) -> list[str]:
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    keys = ("caption_prompt", "val_caption_prompt", "question_prompt", "question_suffix")
    return [data[k] for k in keys if k in data]


def write_substitute(work: Path, world: dict, shape_name: str) -> dict:
    """The world (COCO format, offline), and a LLaVA-1.5-wired backbone at ``shape_name``'s widths with
    :data:`SUBSTITUTE_LAYERS` text layers: random bf16 weights, a tokenizer trained on the world's texts and
    llava7b.yaml's prompts, a processor at the shape's image size; written to WORK/substitute for
    ``--model.init_args.backbone`` (loaded by ``from_pretrained`` like a hub checkpoint)."""
    from dataclasses import asdict, replace

    import torch
    from transformers import LlavaForConditionalGeneration

    from benchmarks.zero_throughput import SHAPES, shape_config
    from datamodules import CaptionPairsDataModule
    from datamodules.world import WorldConfig, generate_world
    from models.demo_backbone import TinyLlavaConfig, build_processor, train_tokenizer

    config = WorldConfig(**world)
    generate_world(config, progress=False)
    texts = CaptionPairsDataModule(processor="unused", world=config)._world_texts()
    tokenizer = train_tokenizer(texts + _prompts(REPO / "configs" / "llava7b.yaml"), 512)
    shape = replace(SHAPES[shape_name], text_layers=SUBSTITUTE_LAYERS)
    shape = replace(shape, vocab=max(shape.vocab, len(tokenizer)))
    llava = shape_config(shape, image_token=tokenizer.convert_tokens_to_ids("<image>"))
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
        model = LlavaForConditionalGeneration(llava).to(torch.bfloat16)
    for target in (model.config, model.config.get_text_config(), model.generation_config):
        for key, value in ids.items():
            setattr(target, key, value)
    out = work / "substitute"
    model.save_pretrained(out)
    processor = build_processor(tokenizer, TinyLlavaConfig(image_size=shape.image_size, patch_size=shape.patch))
    processor.save_pretrained(out)
    info = {"backbone": str(out), "world": world, "shape": asdict(shape), "tokenizer_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters())}
    (work / "substitute.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return info


def outcome(kind: str, rc: int, limit: int, log: Path, reason: str | None) -> tuple[bool, str]:
    """(passed, what happened) for one command of a step."""
    if kind == "skipped":
        return False, f"skipped: {reason}"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if kind == "refusal":
        if rc != 0 and REFUSAL in text:
            return True, "DeepSpeed refused the CPU, as expected (the command parsed and built everything before it)"
        return False, ("failed: expected DeepSpeed's CPU refusal, the command succeeded" if rc == 0
                       else f"failed (exit {rc}), not DeepSpeed's CPU refusal")
    if rc == 0:
        return True, "ok"
    if rc in (124, 137):
        return False, f"timeout: still running after its {limit} s limit"
    return False, f"failed (exit {rc})"


def record(work: Path, step: str, kind: str, rc: int, seconds: float, limit: int, command: list[str],
           reason: str | None) -> int:
    """Append one command's record to WORK/steps.jsonl; exit status 0 if it passed."""
    log = work / "logs" / f"{step}.{kind}.log"
    passed, what = outcome(kind, rc, limit, log, reason)
    entry = {"step": step, "kind": kind, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit,
             "command": shlex.join(command), "outcome": what, "passed": passed}
    if not passed and log.is_file():
        entry["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    with open(work / "steps.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"[gpu_suite] {step} ({kind}): {what} in {seconds:.0f} s", file=sys.stderr if not passed else sys.stdout)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("work", type=Path)
    env.add_argument("--smoke", action="store_true")
    substitute = sub.add_parser("substitute")
    substitute.add_argument("work", type=Path)
    substitute.add_argument("--world", required=True, help="WorldConfig fields as JSON")
    substitute.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    rec = sub.add_parser("record")
    for name in ("work", "step", "kind", "rc", "seconds", "limit"):
        rec.add_argument(name, type={"work": Path, "rc": int, "seconds": float, "limit": int}.get(name, str))
    rec.add_argument("--reason", default=None)
    summary = sub.add_parser("summary")
    summary.add_argument("work", type=Path)
    summary.add_argument("out", type=Path)
    summary.add_argument("--mode", choices=["gpu", "smoke"], required=True)
    summary.add_argument("--seconds", type=float, required=True)
    summary.add_argument("--budget", type=float, required=True)
    summary.add_argument("--parts", required=True)
    summary.add_argument("--invocation", default="")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # record: the command after "--"
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "env":
        return check_env(args.work, args.smoke)
    if args.command == "substitute":
        write_substitute(args.work, json.loads(args.world), args.shape)
        return 0
    if args.command == "record":
        steps = {name for name, _ in STEPS}
        if args.step not in steps or args.kind not in ("run", "refusal", "substitute", "skipped"):
            parser.error(f"record: unknown step {args.step!r} or kind {args.kind!r}")
        return record(args.work, args.step, args.kind, args.rc, args.seconds, args.limit, command, args.reason)
    from benchmarks.gpu_summary import write_summary

    return write_summary(args.work, args.out, args.mode, args.seconds, args.budget, args.parts.split(","),
                         args.invocation)


if __name__ == "__main__":
    sys.exit(main())
