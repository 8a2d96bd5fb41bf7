"""Evaluation of :class:`models.module.GroundedVLM`: the metrics a validation or test builds from the datamodule's
:class:`datamodules.evaluation.EvaluationSpec`, what each caption batch updates, the report written at the end
(:mod:`models.report`), and the captions ``predict`` writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from datamodules.evaluation import EvaluationSource, EvaluationSpec
from models.diagnostics import MentionScores, report_signal, validation_mention_scores
from models.report import annotated_examples, grounding_diagnostics, logged_metrics, probe_rates, write_report

if TYPE_CHECKING:
    from models.module import GroundedVLM

log = logging.getLogger(__name__)

__all__ = ["answer_update", "caption_update", "evaluation_end", "evaluation_spec", "run_settings", "set_up_metrics",
           "write_predictions"]


def evaluation_spec(module: GroundedVLM, stage: str) -> EvaluationSpec:
    """What the datamodule's evaluation loaders are scored against (``datamodules.evaluation``)."""
    trainer = module._trainer
    datamodule = trainer.datamodule if trainer is not None else None
    if not isinstance(datamodule, EvaluationSource):
        raise TypeError(
            f"GroundedVLM validates with a datamodule that has evaluation(stage, chair_mode) -> EvaluationSpec "
            f"(datamodules.evaluation), got {type(datamodule).__name__}"
        )
    spec = datamodule.evaluation(stage, module.chair_mode)
    if not isinstance(spec, EvaluationSpec):
        raise TypeError(f"{type(datamodule).__name__}.evaluation returned {type(spec).__name__}, not EvaluationSpec")
    return spec


def set_up_metrics(module: GroundedVLM, spec: EvaluationSpec) -> None:
    """CHAIR against the spec's ground truth, one POPE per question set, the probes, the mention diagnostics."""
    from metrics import CHAIR, POPE

    module.chair = CHAIR(spec.ground_truth, mode=module.chair_mode, return_details=True)
    module.evaluation_spec = spec
    module.pope = torch.nn.ModuleDict({name: POPE() for name in spec.question_sets})
    module.probes = list(spec.probes)
    module.categories = tuple(spec.categories)
    module.mention_scores = MentionScores() if module.grounding.enabled else None  # the report's diagnostics
    module.decoding_time = _no_time()


def _no_time() -> dict[str, float]:
    return {"captions": 0, "caption_s": 0.0, "answers": 0, "answer_s": 0.0}


def caption_update(module: GroundedVLM, batch: dict) -> None:
    """Caption a batch: CHAIR, the grounding diagnostics of its mentions, the report's first examples."""
    start = time.perf_counter()
    new = module.generate_tokens(batch, module.generation.caption_max_new_tokens)
    captions = module.decoded(new)
    module.decoding_time["caption_s"] += time.perf_counter() - start
    module.decoding_time["captions"] += len(captions)
    module.chair.update(captions, batch["image_ids"])
    if module.mention_scores is not None:
        module.mention_scores.update(*validation_mention_scores(module, batch, new))
    room = module.report_examples - len(module._examples)
    module._examples += [{"image_id": i, "caption": c} for i, c in zip(batch["image_ids"], captions)][:max(room, 0)]


def answer_update(module: GroundedVLM, batch: dict, question_set: str) -> None:
    """Answer a batch of yes/no questions of ``question_set`` (POPE)."""
    start = time.perf_counter()
    answers = module.decoded(module.generate_tokens(batch, module.generation.answer_max_new_tokens))
    module.decoding_time["answer_s"] += time.perf_counter() - start
    module.decoding_time["answers"] += len(answers)
    module.pope[question_set].update(answers, batch["targets"])


def decoding_timing(counts: dict[str, float]) -> dict[str, float]:
    """This process's decoding wall time (``time.perf_counter``) and seconds per 100 captions / answers."""
    per_100 = {f"s_per_100_{kind}": 100 * counts[f"{kind[:-1]}_s"] / counts[kind] if counts[kind] else float("nan")
               for kind in ("captions", "answers")}
    return {**counts, **per_100}


def evaluation_end(module: GroundedVLM, stage: str) -> None:
    """Compute, log and reset every metric; outside the sanity check, write ``report.json`` / ``report.md``."""
    chair = {k: float(v) for k, v in module.chair.compute().items()}
    details = module.chair.details()
    pope = {name: {k: float(v) for k, v in metric.compute().items()} for name, metric in module.pope.items()
            if int(metric.tp + metric.fp + metric.tn + metric.fn)}
    probes = probe_rates(details, module.chair.ground_truth, module.probes)
    mentions = module.mention_scores.compute() if module.mention_scores is not None else None  # all ranks
    timing, module.decoding_time = decoding_timing(module.decoding_time), _no_time()
    module.log_dict(logged_metrics(stage, chair, pope, probes), prog_bar=False, sync_dist=False, rank_zero_only=True)
    module.chair.reset()
    for metric in [*module.pope.values(), *([module.mention_scores] if module.mention_scores is not None else [])]:
        metric.reset()
    trainer = module.trainer
    if trainer.sanity_checking:  # (validation only) no report from the sanity check
        module._examples = []
        return
    examples = annotated_examples(module._examples, details, module.chair.ground_truth)
    module._examples = []
    module.last_report = {
        "stage": stage,
        "epoch": module.current_epoch,
        "step": module.global_step,
        "chair": chair,
        "pope": pope,
        "probes": probes,
        "settings": run_settings(module),
        "timing": timing,
        "examples": examples,
    }
    run_dir = module.run_dir()  # trainer.log_dir is a broadcast under DDP: every rank must call it
    if mentions is not None:
        module.last_report["grounding_diagnostics"] = grounding_diagnostics(
            *mentions, report_signal(module.grounding.word_score), module.chair_mode,
            run_dir if trainer.is_global_zero else None)
    if trainer.is_global_zero:
        write_report(module.last_report, run_dir)


def run_settings(module: GroundedVLM) -> dict:
    """The settings a report names: backbone, grounding, objective, LoRA, decoding."""
    return {
        "backbone": module.backbone,
        "grounding": asdict(module.grounding),
        "objective": asdict(module.objective),
        "lora": asdict(module.lora) if module.lora else None,
        "freeze_vision": module.freeze_vision,
        "lm_loss_reduction": module.lm_loss_reduction,
        "lr": module.lr,
        "chair_mode": module.chair_mode,
        "generation": module.generation.describe(),
    }


def write_predictions(module: GroundedVLM, rows: list[dict]) -> Path:
    """``predictions.jsonl`` (one per process under DDP) in the run directory, scorable with ``score chair``."""
    run_dir = module.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = module.trainer
    name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{module.global_rank}.jsonl"
    with open(run_dir / name, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    log.info("wrote %d captions to %s", len(rows), run_dir / name)
    print(f"predictions: {run_dir / name}")
    return run_dir / name
