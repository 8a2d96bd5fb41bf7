"""What ``analyze`` collects over the validation batches and what it makes of it: ``analysis.json``, the figures,
``report.md``. The measurements themselves: :mod:`models.diagnostics` and :mod:`models.probes`."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.diagnostics import ForcedPass, auroc
from models.word_grounding import ObjectWords

__all__ = ["Collected", "analysis_payload", "draw_figures", "report_markdown", "summarize_mentions"]

MODES = ("reference", "lemma")
SUMMARY_SIGNALS = ("word_z", "lm_logprob", "G_own", "gate_pred", "image_attention")  # figures and report.md


@dataclass
class Collected:
    """Everything the batches produced: mention rows, captions, detection pairs, probe features."""

    layers: list[int]
    words: ObjectWords | None
    presence: dict[Any, frozenset[str]]
    pairs: tuple[tuple[str, str], ...] = ()  # (anchor, companion) biases of the data (EvaluationSpec.probes)
    images: dict[Any, str] = field(default_factory=dict)  # image id -> file
    rows: list[dict] = field(default_factory=list)
    captions: list[dict] = field(default_factory=list)
    detection: list[tuple[Any, str, float, bool]] = field(default_factory=list)  # image, category, z, present
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    image_ids: list[Any] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, image_ids: list, captions: list[str], rows: list[dict], forced: ForcedPass) -> None:
        self.rows += rows
        self.captions += [{"image_id": i, "caption": c} for i, c in zip(image_ids, captions)]
        self.image_ids += list(image_ids)
        for site, values in forced.features.items():
            self.features.setdefault(site, []).append(values)
        for name in ["lm_logprob", "word_z", *forced.signals]:
            if name not in self.signals:
                self.signals.append(name)
        if forced.word_z is not None and self.words is not None:
            for b, image_id in enumerate(image_ids):
                shown = self.presence.get(image_id, frozenset())
                for j, c in enumerate(self.words.category):
                    name = self.words.categories[c]
                    self.detection.append((image_id, name, float(forced.word_z[b, j]), name in shown))

    def timing(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        n = max(len(self.image_ids), 1)
        out["per_100_images"] = round(100 * self.seconds.get("captions_and_signals", 0.0) / n, 3)
        out["total"] = round(sum(self.seconds.values()), 3)
        return out


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def summarize_mentions(rows: list[dict], mode: str, signals: list[str]) -> dict:
    """Counts and AUROC (present vs hallucinated) of every signal over one CHAIR mode's mentions, and per category."""
    chosen = [r for r in rows if r["mode"] == mode]

    def block(selected: list[dict]) -> dict:
        present = [r["present"] for r in selected]
        return {
            "n_present": sum(present), "n_hallucinated": len(present) - sum(present),
            "auroc": {s: auroc([r.get(s, math.nan) for r in selected], present) for s in signals},
        }

    categories = sorted({r["category"] for r in chosen})
    out = block(chosen)
    out["captions_with_hallucination"] = len({(r["image_id"]) for r in chosen if not r["present"]})
    out["by_category"] = {c: block([r for r in chosen if r["category"] == c]) for c in categories}
    return out


def _detection(collected: Collected) -> dict | None:
    if not collected.detection:
        return None
    z = [d[2] for d in collected.detection]
    present = [d[3] for d in collected.detection]
    by_category = {}
    for name in sorted({d[1] for d in collected.detection}):
        rows = [d for d in collected.detection if d[1] == name]
        by_category[name] = {"n_present": sum(d[3] for d in rows), "n_absent": sum(not d[3] for d in rows),
                             "auroc": auroc([d[2] for d in rows], [d[3] for d in rows])}
    return {"n_present": sum(present), "n_absent": len(present) - sum(present), "auroc": auroc(z, present),
            "by_category": by_category}


def _probes(collected: Collected, categories: list[str], folds: int, seed: int) -> dict:
    from models.probes import category_probes, companion_probes

    start = time.perf_counter()
    features = {site: torch.cat(parts).numpy() for site, parts in collected.features.items()}
    per_category = category_probes(features, collected.image_ids, collected.presence, categories, folds, seed)
    companions = companion_probes(features, collected.image_ids, collected.presence, collected.pairs, folds, seed)
    collected.seconds["probes"] = time.perf_counter() - start
    mean = {}
    for site in features:
        values = [c["auroc"][site] for c in per_category.values() if c["auroc"][site] is not None]
        mean[site] = float(np.mean(values)) if values else None
    return {"sites": list(features), "folds": folds, "features": "mean and max over the image tokens",
            "mean_auroc": mean, "by_category": per_category, "companions": companions}


def probe_categories(collected: Collected, mode: str, count: int) -> list[str]:
    """The ``count`` categories to probe: the most hallucinated in ``mode``, then the most frequent in the images."""
    shown = Counter(c for i in collected.image_ids for c in collected.presence.get(i, ()))
    missed = Counter(r["category"] for r in collected.rows if r["mode"] == mode and not r["present"])
    return sorted(shown, key=lambda c: (-missed[c], -shown[c], c))[:count]


def analysis_payload(collected: Collected, module: Any, folds: int, seed: int, categories: int = 20) -> dict:
    """The content of ``analysis.json`` (docs/analysis.md describes every field)."""
    grounding = module.grounding
    return {
        "images": len(collected.image_ids),
        "chair_mode": module.chair_mode,
        "generation": module.generation.describe(),
        "max_new_tokens": module.generation.caption_max_new_tokens,
        "grounding": {"enabled": grounding.enabled, "layers": collected.layers, "score": grounding.score,
                      "feature": grounding.feature, "word_score": grounding.word_score},
        "signals": collected.signals,
        "mentions": {mode: summarize_mentions(collected.rows, mode, collected.signals) for mode in MODES},
        "detection": _detection(collected),
        "probe": _probes(collected, probe_categories(collected, module.chair_mode, categories), folds, seed),
    }


def write_rows(run_dir: Path, collected: Collected) -> None:
    """``mentions.jsonl`` (signals per mention, no attention vectors) and ``captions.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "mentions.jsonl", "w") as handle:
        for r in collected.rows:
            handle.write(json.dumps({k: _nan_to_none(v) for k, v in r.items() if k != "attention"}) + "\n")
    with open(run_dir / "captions.jsonl", "w") as handle:
        for c in collected.captions:
            handle.write(json.dumps(c) + "\n")


def _summary_signals(signals: list[str], layers: list[int]) -> list[str]:
    """word_z, lm_logprob and the last grounded layer's G at the mention, gate before it, image attention."""
    last = max(layers) if layers else None
    wanted = [s if s in ("word_z", "lm_logprob") else f"{s}/L{last}" for s in SUMMARY_SIGNALS]
    return [s for s in wanted if s in signals]


def _attention_examples(rows: list[dict], count: int) -> list[dict]:
    """Mentions of the most hallucinated category: half hallucinated, half grounded (first in image order)."""
    withattn = [r for r in rows if r.get("attention")]
    misses = Counter(r["category"] for r in withattn if not r["present"])
    if not withattn:
        return []
    category = misses.most_common(1)[0][0] if misses else Counter(r["category"] for r in withattn).most_common(1)[0][0]
    wrong = [r for r in withattn if r["category"] == category and not r["present"]][: count // 2]
    right = [r for r in withattn if r["category"] == category and r["present"]][: count - len(wrong)]
    return wrong + right


def draw_figures(collected: Collected, payload: dict, run_dir: Path, image_processor: Any, mode: str,
                 count: int) -> dict[str, str]:
    """``figures/{histograms,attention_maps,captions}.png`` in ``run_dir``; returns their relative paths."""
    from models.figures import attention_maps, caption_panels, model_view, score_histograms

    rows = [r for r in collected.rows if r["mode"] == mode]
    summary = payload["mentions"][mode]
    figures = {}
    groups = [(s, [r.get(s, math.nan) for r in rows], [r["present"] for r in rows], summary["auroc"][s])
              for s in _summary_signals(collected.signals, collected.layers)]
    groups = [g for g in groups if not all(math.isnan(v) for v in g[1])]  # e.g. word_z without word scores
    if rows and groups:
        score_histograms(groups, run_dir / "figures" / "histograms.png", f"object mentions ({mode} CHAIR mode)")
        figures["histograms"] = "figures/histograms.png"
    chosen = _attention_examples(rows, count)
    if chosen:
        layer = max(collected.layers)
        examples = [{"image": model_view(image_processor, collected.images[r["image_id"]]), "attention": r["attention"],
                     "present": r["present"], "title": f"{r['text']} ({'in image' if r['present'] else 'hallucinated'})"
                     f"\nimage {r['image_id']}"} for r in chosen]
        attention_maps(examples, run_dir / "figures" / "attention_maps.png",
                       f"attention of the position predicting the mention, layer {layer} (mean over heads)")
        figures["attention_maps"] = "figures/attention_maps.png"
    marks: dict[Any, list] = {}
    for r in rows:
        marks.setdefault(r["image_id"], []).append((r["start"], r["end"], r["present"]))
    wrong = [c for c in collected.captions if any(not p for _, _, p in marks.get(c["image_id"], []))]
    right = [c for c in collected.captions if c not in wrong]
    shown = wrong[: count // 2] + right[: count - min(len(wrong), count // 2)]
    if shown:
        panels = [{"image": model_view(image_processor, collected.images[c["image_id"]]), "caption": c["caption"],
                   "marks": marks.get(c["image_id"], []), "label": f"image {c['image_id']}",
                   "gt": sorted(collected.presence.get(c["image_id"], ()))} for c in shown]
        caption_panels(panels, run_dir / "figures" / "captions.png",
                       "generated captions: grounded mentions green, hallucinated red")
        figures["captions"] = "figures/captions.png"
    return figures


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_markdown(payload: dict) -> str:
    """A readable summary of ``analysis.json`` with its figures."""
    mode = payload["chair_mode"]
    lines = [f"# Grounding analysis ({payload['images']} validation images)", "",
             f"Checkpoint `{payload.get('checkpoint')}`, grounding "
             f"{'on' if payload['grounding']['enabled'] else 'off'} "
             f"(layers {payload['grounding']['layers']}, word score {payload['grounding']['word_score']}), decoding "
             f"`{payload['generation']['method']}`. {payload['seconds']['per_100_images']} s per 100 images.", "",
             *([f"Captions scored: `{payload['captions_from']}` (another run's), not this model's own.", ""]
               if payload.get("captions_from") else []),
             "AUROC of each signal, present vs hallucinated object mentions (0.5 = chance; docs/analysis.md):", "",
             "| signal | " + " | ".join(MODES) + " |", "| --- |" + " ---: |" * len(MODES)]
    for s in payload["signals"]:
        lines.append(f"| {s} | " + " | ".join(_num(payload["mentions"][m]["auroc"][s]) for m in MODES) + " |")
    lines += ["", "| mentions | " + " | ".join(MODES) + " |", "| --- |" + " ---: |" * len(MODES),
              "| present | " + " | ".join(str(payload["mentions"][m]["n_present"]) for m in MODES) + " |",
              "| hallucinated | " + " | ".join(str(payload["mentions"][m]["n_hallucinated"]) for m in MODES) + " |", ""]
    shown = [s for s in ("word_z", "lm_logprob") if s in payload["signals"]] + [
        s for s in payload["signals"] if s.startswith(("G_own", "gate_pred", "image_attention"))][-3:]
    lines += [f"Per category ({mode} mode): mentions present / hallucinated and AUROC:", "",
              "| category | n | " + " | ".join(shown) + " |", "| --- | ---: |" + " ---: |" * len(shown)]
    for name, block in payload["mentions"][mode]["by_category"].items():
        lines.append(f"| {name} | {block['n_present']} / {block['n_hallucinated']} | "
                     + " | ".join(_num(block["auroc"][s]) for s in shown) + " |")
    if payload["detection"] is not None:
        d = payload["detection"]
        lines += ["", f"Detection view: candidate-word z of every image x object word, {d['n_present']} present / "
                  f"{d['n_absent']} absent: AUROC {_num(d['auroc'])}."]
    probe = payload["probe"]
    lines += ["", f"Linear probes (present vs absent per category, {probe['folds']}-fold by image), AUROC:", "",
              "| category | n | " + " | ".join(probe["sites"]) + " |",
              "| --- | ---: |" + " ---: |" * len(probe["sites"])]
    for name, block in probe["by_category"].items():
        lines.append(f"| {name} | {block['n_present']} / {block['n_absent']} | "
                     + " | ".join(_num(block["auroc"][s]) for s in probe["sites"]) + " |")
    lines.append("| mean | | " + " | ".join(_num(probe["mean_auroc"][s]) for s in probe["sites"]) + " |")
    for name, block in probe["companions"].items():
        lines.append(f"| {name.split('->')[1]} among {name.split('->')[0]} images | {block['n_present']} / "
                     f"{block['n_absent']} | " + " | ".join(_num(block["auroc"][s]) for s in probe["sites"]) + " |")
    lines.append("")
    for name, path in payload["figures"].items():
        lines += [f"![{name}]({path})", ""]
    return "\n".join(lines)
