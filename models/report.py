"""The validation report: companion-hallucination probe rates, ``report.json`` and a readable ``report.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["annotated_examples", "grounding_diagnostics", "logged_metrics", "probe_rates", "report_markdown",
           "write_report"]

HISTOGRAM = "grounding_scores.png"


def _naming_rate(rows: list[dict], name: str) -> float:
    """Share of captions that mention ``name`` (NaN without captions)."""
    return sum(name in d["mentioned_objects"] for d in rows) / len(rows) if rows else float("nan")


def probe_rates(details: list[dict], ground_truth: dict, probes: list[tuple[str, str]]) -> dict[str, dict]:
    """How often a caption names the companion where it is absent: with the anchor present, and elsewhere."""
    out = {}
    for anchor, companion in probes:
        with_anchor = [d for d in details if anchor in ground_truth[d["image_id"]] and companion not in ground_truth[d["image_id"]]]
        elsewhere = [d for d in details if anchor not in ground_truth[d["image_id"]] and companion not in ground_truth[d["image_id"]]]
        present = [d for d in details if companion in ground_truth[d["image_id"]]]

        out[f"{anchor}->{companion}"] = {
            "rate_absent_with_anchor": _naming_rate(with_anchor, companion),
            "n_absent_with_anchor": len(with_anchor),
            "rate_absent_elsewhere": _naming_rate(elsewhere, companion),
            "n_absent_elsewhere": len(elsewhere),
            "recall_when_present": _naming_rate(present, companion),
            "n_present": len(present),
        }
    return out


def logged_metrics(stage: str, chair: dict, pope: dict[str, dict], probes: dict[str, dict]) -> dict[str, float]:
    """The figures logged per evaluation: ``{stage}/CHAIRs``, ``{stage}/pope_f1``, ``{stage}/halluc_fork->knife``..."""
    metrics = {f"{stage}/{k}": v for k, v in chair.items()}
    for name, values in pope.items():  # one set named "pope" (the default questions file) logs as val/pope_*
        prefix = f"{stage}/pope_" if name == "pope" else f"{stage}/pope_{name}_"
        metrics.update({prefix + k: v for k, v in values.items() if k in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
    for name, probe in probes.items():
        metrics[f"{stage}/halluc_{name}"] = probe["rate_absent_with_anchor"]
    return metrics


def annotated_examples(examples: list[dict], details: list[dict], ground_truth: dict) -> list[dict]:
    """Example captions with their mentioned and hallucinated objects and the image's ground truth."""
    by_id = {d["image_id"]: d for d in details}
    keys = ("mentioned_objects", "hallucinated_objects")
    return [{**e, **{k: by_id.get(e["image_id"], {}).get(k, []) for k in keys},
             "gt_objects": sorted(ground_truth.get(e["image_id"], []))} for e in examples]


def grounding_diagnostics(scores: Any, present: Any, signal: str, mode: str, run_dir: Path | None) -> dict:
    """AUROC of the grounding score over the validation captions' object mentions (present vs hallucinated) and,
    with ``run_dir`` and matplotlib, its histogram ``grounding_scores.png`` there (else the block says why not)."""
    from models.diagnostics import auroc

    # torchmetrics' compute squeezes a one-element result to 0-d: flatten before reading
    scores = [float(s) for s in torch.as_tensor(scores).flatten()]
    present = [bool(p) for p in torch.as_tensor(present).flatten()]
    kept = [(s, p) for s, p in zip(scores, present) if s == s]
    block = {"signal": signal, "chair_mode": mode, "auroc": auroc(scores, present),
             "n_present": sum(p for _, p in kept), "n_hallucinated": sum(not p for _, p in kept),
             "n_unscored": len(scores) - len(kept), "histogram": None}
    if run_dir is not None and kept:
        from models.figures import MISSING_EXTRA, score_histograms

        try:
            score_histograms([(signal, scores, present, block["auroc"])], run_dir / HISTOGRAM,
                             f"object mentions of the validation captions ({mode} CHAIR mode)")
            block["histogram"] = HISTOGRAM
        except ImportError:
            block["histogram_missing"] = f"matplotlib is not installed ({MISSING_EXTRA})"
    return block


def write_report(report: dict, run_dir: Path) -> None:
    """``report.json`` and a readable ``report.md`` (hallucinated objects marked) in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(report_markdown(report))


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def _secs(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def _mean_pope(pope: dict[str, dict[str, float]], key: str) -> float:
    values = [m[key] for m in pope.values() if key in m]
    return sum(values) / len(values) if values else float("nan")


def report_markdown(report: dict) -> str:
    chair, pope = report["chair"], report["pope"]
    label = "POPE" if len(pope) <= 1 else f"POPE mean of {len(pope)}:"
    lines = [
        f"# {'Test' if report.get('stage') == 'test' else 'Validation'} report (epoch {report['epoch']}, step {report['step']})",
        "",
        f"Backbone `{report['settings']['backbone']}`, grounding "
        f"{'on' if report['settings']['grounding']['enabled'] else 'off'}.",
        "",
        f"| CHAIRs | CHAIRi | Recall | {label} acc | POPE F1 | POPE yes-ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {_pct(chair['CHAIRs'])} | {_pct(chair['CHAIRi'])} | {_pct(chair['Recall'])} | "
        f"{_pct(_mean_pope(pope, 'accuracy'))} | {_pct(_mean_pope(pope, 'f1'))} | {_pct(_mean_pope(pope, 'yes_ratio'))} |",
        "",
    ]
    timing = report.get("timing") or {}
    if timing.get("captions") or timing.get("answers"):
        method = (report["settings"].get("generation") or {}).get("method", "greedy")
        lines += [f"Decoding with `{method}`: {timing['captions']} captions, {_secs(timing['s_per_100_captions'])} s per "
                  f"100; {timing['answers']} answers, {_secs(timing['s_per_100_answers'])} s per 100 (wall time of "
                  "this process).", ""]
    if len(pope) > 1:
        lines += ["| POPE set | accuracy | precision | recall | F1 | yes-ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {_pct(m['accuracy'])} | {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} | "
                  f"{_pct(m['yes_ratio'])} |" for name, m in pope.items()]
        lines.append("")
    if report["probes"]:
        lines += [
            "Biased companion named where absent (%):",
            "",
            "| anchor -> companion | with anchor | elsewhere | named when present |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, p in report["probes"].items():
            lines.append(
                f"| {name} | {_pct(p['rate_absent_with_anchor'])} (n={p['n_absent_with_anchor']}) | "
                f"{_pct(p['rate_absent_elsewhere'])} (n={p['n_absent_elsewhere']}) | "
                f"{_pct(p['recall_when_present'])} (n={p['n_present']}) |"
            )
        lines.append("")
    if report.get("grounding_diagnostics"):
        lines += _diagnostics_markdown(report["grounding_diagnostics"])
    if report["examples"]:
        lines += ["Examples (hallucinated objects in **bold**):", ""]
        for e in report["examples"]:
            hallucinated = ", ".join(f"**{o}**" for o in e["hallucinated_objects"]) or "none"
            lines.append(f"- image {e['image_id']}: \"{e['caption']}\" (gt: {', '.join(e['gt_objects'])}; hallucinated: {hallucinated})")
    return "\n".join(lines) + "\n"


def _diagnostics_markdown(block: dict) -> list[str]:
    """The report's "grounding diagnostics": does the grounding score tell present from hallucinated mentions?"""
    name = {"word_z": "candidate-word score z", "G_own": "grounding score G at the mention"}.get(block["signal"],
                                                                                                block["signal"])
    area = "n/a (needs present and hallucinated mentions)" if block["auroc"] is None else f"{block['auroc']:.3f}"
    lines = ["Grounding diagnostics: AUROC of the " + name + " over the captions' object mentions "
             f"({block['n_present']} present, {block['n_hallucinated']} hallucinated, {block['chair_mode']} CHAIR mode): "
             f"**{area}** "
             "(1 = every present mention scores above every hallucinated one, 0.5 = chance; docs/analysis.md).", ""]
    if block.get("histogram"):
        lines += [f"![grounding scores]({block['histogram']})", ""]
    elif block.get("histogram_missing"):
        lines += [f"(No histogram: {block['histogram_missing']}.)", ""]
    return lines
