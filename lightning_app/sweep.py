"""``python -m lightning_app sweep``: every experiment config x every seed, then one table (mean +- std).

    python -m lightning_app sweep configs/experiments/*.yaml --seeds 0 1 2 --root runs/sweep [-- FIT ARGS...]

For each config ``X.yaml`` and seed ``S`` it runs, in a subprocess, ::

    python -m lightning_app fit --config X.yaml --run_name X_sS --trainer.default_root_dir ROOT \\
        --seed_everything S --data.init_args.seed S [--data.init_args.demo_backbone.seed S] [EXTRA...]

(seed S moves the training randomness, the data's random choices and, where the config builds the demo backbone,
its initial weights), then ``analyze`` on the run's last checkpoint where ``--analyze`` is given. A run whose
report is already there is not run again, so an interrupted sweep continues where it stopped. ``ROOT/results.md``
and ``ROOT/results.json`` hold per row: CHAIRs, CHAIRi, Recall, POPE accuracy and F1, the biased companion named
where absent (with its anchor / elsewhere) and when present, the grounding-score AUROC (from ``analysis.json``
where present), the decoding seconds per 100 validation captions (``report.json`` timing: wall time of the
validating process) and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "row_metrics", "summarise"]

METRICS = (  # key, column title, scale
    ("CHAIRs", "CHAIRs", 100), ("CHAIRi", "CHAIRi", 100), ("Recall", "Recall", 100),
    ("pope_accuracy", "POPE acc", 100), ("pope_f1", "POPE F1", 100),
    ("absent_with_anchor", "companion where absent: with anchor", 100),
    ("absent_elsewhere", "elsewhere", 100), ("present", "companion when present", 100),
    ("detection_auroc", "word-score AUROC: objects in image vs not", 1),
    ("mention_auroc_G", "G AUROC: present vs hallucinated mentions", 1),
    ("mention_auroc_lm", "LM log-prob AUROC: mentions", 1), ("s_per_100_captions", "s / 100 captions", 1),
    ("wall_s", "wall s", 1),
)


def _builds_demo_backbone(config: Path) -> bool:
    """Whether ``config`` (with its bases) sets ``data.init_args.demo_backbone``."""
    from lightning_app.suite_cli import merged_config

    return ((merged_config(config).get("data") or {}).get("init_args") or {}).get("demo_backbone") is not None


def latest_version(run: Path, holding: str = "report.json") -> Path | None:
    """The run's newest ``version_N`` directory that holds ``holding`` (analyze writes a version without a report)."""
    versions = sorted(run.glob(f"version_*/{holding}"), key=lambda p: int(p.parent.name.split("_")[1]))
    return versions[-1].parent if versions else None


def row_metrics(report: dict, analysis: dict | None, wall: float | None) -> dict[str, float]:
    """The table's numbers of one run from its ``report.json`` (and ``analysis.json``)."""
    chair, pope = report["chair"], report.get("pope") or {}
    first = next(iter(pope.values()), {})
    probe = next(iter((report.get("probes") or {}).values()), {})
    nan = float("nan")
    out = {"CHAIRs": chair["CHAIRs"], "CHAIRi": chair["CHAIRi"], "Recall": chair["Recall"],
           "pope_accuracy": first.get("accuracy", nan), "pope_f1": first.get("f1", nan),
           "absent_with_anchor": probe.get("rate_absent_with_anchor", nan),
           "absent_elsewhere": probe.get("rate_absent_elsewhere", nan), "present": probe.get("recall_when_present", nan),
           "detection_auroc": nan, "mention_auroc_G": nan, "mention_auroc_lm": nan,
           "s_per_100_captions": (report.get("timing") or {}).get("s_per_100_captions", nan),
           "wall_s": wall if wall is not None else nan}
    if analysis is not None:
        out.update(analysis_metrics(analysis))
    return out


def analysis_metrics(analysis: dict) -> dict[str, float]:
    """AUROCs of an ``analysis.json``: the candidate-word score over every image x category (``detection``),
    and over the captions' object mentions (present vs hallucinated) the gate score G at its own position in the
    deepest grounded layer and the LM's log-probability. NaN where the run has no such signal (or no
    hallucinated mention)."""
    nan = float("nan")
    mentions = (analysis.get("mentions") or {}).get(analysis.get("chair_mode", "reference")) or {}
    auroc = mentions.get("auroc") or {}
    own = sorted((k for k in auroc if k.startswith("G_own/L")), key=lambda k: int(k.rsplit("L", 1)[1]))

    def num(value: object) -> float:
        return float(value) if isinstance(value, (int, float)) else nan

    return {"detection_auroc": num((analysis.get("detection") or {}).get("auroc")),
            "mention_auroc_G": num(auroc.get(own[-1])) if own else nan,
            "mention_auroc_lm": num(auroc.get("lm_logprob"))}


def _mean_std(values: list[float], scale: float, digits: int = 1) -> str:
    values = [v * scale for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: one line per row, mean ± sample std over its seeds."""
    head = "| row | seeds | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(METRICS)]
    for name, runs in rows.items():
        cells = [_mean_std([r[key] for r in runs], scale, 2 if "auroc" in key else 1) for key, _, scale in METRICS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def _launch(subcommand: str, config: Path, seed: int, root: Path, name: str, args: list[str], extra: list[str],
            record: dict) -> tuple[Path, float, Path]:
    """``python -m lightning_app SUBCOMMAND`` as run ``NAME`` with the seed's settings, unless its ``sweep.json``
    says it ran; the run's directory, wall seconds and newest version holding a report."""
    run = root / name
    done = run / "sweep.json"
    if not done.is_file():
        run.mkdir(parents=True, exist_ok=True)
        seeded = ["--config", str(config), "--run_name", name, "--trainer.default_root_dir", str(root),
                  "--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
        if _builds_demo_backbone(config):
            seeded += ["--data.init_args.demo_backbone.seed", str(seed)]
        print(f"sweep: {name}: {subcommand}", flush=True)
        wall = _run([sys.executable, "-m", "lightning_app", subcommand, *seeded, *args, *extra], run / "sweep.log")
        done.write_text(json.dumps({"wall_s": wall, "config": str(config), "seed": seed, **record, "extra": extra}))
    version = latest_version(run)
    if version is None:
        raise RuntimeError(f"{run}: the {subcommand} wrote no report.json (see {run / 'sweep.log'})")
    return run, json.loads(done.read_text())["wall_s"], version


def run_one(config: Path, seed: int, root: Path, analyze: bool, extra: list[str]) -> dict[str, float]:
    name = f"{config.stem}_s{seed}"
    run, wall, version = _launch("fit", config, seed, root, name, [], extra, {})
    analyzed = latest_version(run, "analysis.json")
    if analyze and analyzed is None:
        checkpoint = run / "checkpoints" / "last.ckpt"
        print(f"sweep: {name}: analyze", flush=True)
        _run([sys.executable, "-m", "lightning_app", "analyze", "--config", str(config), "--run_name", name,
              "--trainer.default_root_dir", str(root), "--ckpt_path", str(checkpoint), *extra], run / "sweep.log")
        analyzed = latest_version(run, "analysis.json")
    analysis = json.loads((analyzed / "analysis.json").read_text()) if analyzed is not None else None
    return row_metrics(json.loads((version / "report.json").read_text()), analysis, wall)


def run_method(config: Path, seed: int, root: Path, method: str, extra: list[str]) -> dict[str, float]:
    """``validate`` of run ``X_sS``'s last checkpoint decoding with ``method``, as run ``X_sS.METHOD``."""
    trained = f"{config.stem}_s{seed}"
    args = ["--ckpt_path", str(root / trained / "checkpoints" / "last.ckpt"),
            "--model.init_args.generation.method", method]
    _, wall, version = _launch("validate", config, seed, root, f"{trained}.{method}", args, extra, {"method": method})
    return row_metrics(json.loads((version / "report.json").read_text()), None, wall)


def _methods(text: str) -> list[str]:
    from models.decoding import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown decoding method(s) {unknown}; known: {', '.join(METHODS)}")
    return methods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_app sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="experiment configs, one table row each")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/sweep"), help="trainer.default_root_dir of every run")
    parser.add_argument("--analyze", action="store_true", help="also run analyze (grounding AUROC column)")
    parser.add_argument("--methods", type=_methods, default=[],
                        help="comma-separated decoding methods: validate every trained run with each (rows X.METHOD)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:cut], argv[cut + 1:]  # after --: arguments added to every fit
    args = parser.parse_args(argv)
    for config in args.configs:
        if not config.is_file():
            parser.error(f"no such config {config}")
    args.root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, float]]] = {}
    for config in args.configs:
        for seed in args.seeds:
            rows.setdefault(config.stem, []).append(run_one(config, seed, args.root, args.analyze, extra))
            for method in args.methods:
                rows.setdefault(f"{config.stem}.{method}", []).append(run_method(config, seed, args.root, method, extra))
            (args.root / "results.json").write_text(json.dumps(rows, indent=1))
    table = summarise(rows)
    (args.root / "results.md").write_text(table)
    print(table)
    print(f"results: {args.root / 'results.md'} (and results.json)")


if __name__ == "__main__":
    main()
