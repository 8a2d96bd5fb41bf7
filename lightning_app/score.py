"""``python -m lightning_app score {chair,pope,mme,amber,pope-questions}``: score files from any tool.

The JSON written with ``--output`` is a contract other tools rely on (see ``docs/metrics.md``):

* ``chair``: ``{"metrics": {CHAIRs, CHAIRi, Recall, Len}, "counts": {...}, "mode", "captions": [{image_id,
  caption, mentioned_objects, hallucinated_objects, gt_objects}, ...]}``, captions in input order;
* ``pope``: ``{accuracy, precision, recall, f1, yes_ratio, tp, fp, tn, fn, "splits": {name: {same keys}}}``
  (top level = all answers together; one split per question file);
* ``mme``: per-subtask ``acc``/``acc_plus``/``score`` and ``perception``/``cognition``/``total``;
* ``amber``: ``{CHAIR, Cover, Hal, Cog}`` and the counts.

Every command also prints a short table. Errors (an empty input file, unknown image id, missing answer,
malformed JSON) exit with status 2 and a message naming the file / line / id.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _table(rows: Sequence[tuple[str, Any]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * max(len(title), width + 12)]
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name.ljust(width)}  {shown:>10}")
    return "\n".join(lines)


def _write(path: str, payload: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _require(items: Sequence, path: str, what: str) -> None:
    """An empty input is an error: its metrics would be 0/0 (reported as zeros), not a measurement."""
    if not len(items):
        raise ValueError(f"{path}: no {what} to score (the file is empty)")


def _floats(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# chair
# ---------------------------------------------------------------------------------------------------


def _run_chair(args: argparse.Namespace) -> None:
    from metrics.chair import COUNT_NAMES, _chair_compute, _counts, chair_captions
    from metrics.chair_gt import load_ground_truth
    from metrics.coco_objects import get_parser
    from metrics.io import normalize_image_id, read_records, require_key

    records = read_records(args.captions)
    _require(records, args.captions, "captions")
    raw_ids = [require_key(r, args.image_id_key, args.captions, i) for i, r in enumerate(records)]
    captions = [require_key(r, args.caption_key, args.captions, i) for i, r in enumerate(records)]
    gt = load_ground_truth(args.coco_dir, args.gt_objects, args.mode, args.cache_dir, not args.no_cache)
    results, skipped = chair_captions(captions, raw_ids, gt, get_parser(args.mode), args.skip_unknown)
    counts = _counts(results, skipped)
    metrics = _floats(_chair_compute(counts))
    raw_by_norm = {normalize_image_id(i): i for i in raw_ids}
    payload = {
        "metrics": metrics,
        "counts": dict(zip(COUNT_NAMES, counts.tolist())),
        "mode": args.mode,
        "captions": [dict(r.as_dict(), image_id=raw_by_norm[r.image_id]) for r in results],
        "skipped_image_ids": [i for i in raw_ids if normalize_image_id(i) not in gt],
    }
    _write(args.output, payload)
    rows = [(k, metrics[k]) for k in ("CHAIRs", "CHAIRi", "Recall", "Len")]
    rows += [(k, v) for k, v in payload["counts"].items() if k != "num_skipped_unknown" or v]
    print(_table(rows, f"CHAIR ({args.mode}) on {args.captions}"))


# ---------------------------------------------------------------------------------------------------
# pope
# ---------------------------------------------------------------------------------------------------


def _run_pope(args: argparse.Namespace) -> None:
    import torch

    from metrics.io import read_records
    from metrics.pope import _pope_compute, _pope_update, join_answers, read_pope_questions

    if len(args.questions) != len(args.answers):
        raise ValueError(f"{len(args.questions)} --questions files but {len(args.answers)} --answers files")
    splits: dict[str, dict[str, Any]] = {}
    total = torch.zeros(4, dtype=torch.long)
    for q_path, a_path in zip(args.questions, args.answers):
        questions = read_pope_questions(q_path)
        _require(questions, q_path, "questions")
        answer_records = read_records(a_path)
        _require(answer_records, a_path, "answers")
        answers, labels = join_answers(questions, answer_records, args.answer_key, source=str(a_path))
        counts = _pope_update(answers, labels, args.parser)
        name = Path(q_path).stem
        if name in splits:
            raise ValueError(f"two question files are named {name!r}; splits are named by file stem")
        splits[name] = _floats(_pope_compute(counts))
        total += counts
    payload = _floats(_pope_compute(total))
    payload["parser"] = args.parser
    payload["splits"] = splits
    _write(args.output, payload)
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn")
    names = list(splits) + (["all"] if len(splits) > 1 else [])
    table = {**splits, "all": payload}
    header = "metric".ljust(10) + "".join(n[-14:].rjust(16) for n in names)
    lines = [f"POPE ({args.parser} parser)", header, "-" * len(header)]
    for key in keys:
        cells = [table[n][key] for n in names]
        lines.append(key.ljust(10) + "".join((f"{c:.4f}" if isinstance(c, float) else str(c)).rjust(16) for c in cells))
    print("\n".join(lines))


def _run_pope_questions(args: argparse.Namespace) -> None:
    from metrics.pope import STRATEGIES, build_pope_questions, coco_objects_per_image, write_pope_questions

    images = coco_objects_per_image(args.instances)
    strategies = STRATEGIES if args.strategy == "all" else (args.strategy,)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in strategies:
        questions = build_pope_questions(
            images, strategy, args.num_images, args.num_questions, args.seed, an_template=args.an_template
        )
        path = out_dir / f"{args.prefix}_pope_{strategy}.json"
        write_pope_questions(questions, path)
        rows.append((str(path), len(questions)))
    print(_table(rows, f"POPE questions from {args.instances} (seed {args.seed})"))


# ---------------------------------------------------------------------------------------------------
# mme, amber
# ---------------------------------------------------------------------------------------------------


def _run_mme(args: argparse.Namespace) -> None:
    from metrics.mme import mme, read_mme_results

    subtasks, images, labels, predictions = read_mme_results(
        args.results, args.subtask_key, args.image_key, args.label_key, args.prediction_key
    )
    _require(subtasks, args.results, "MME results")
    payload = _floats(mme(subtasks, images, labels, predictions))
    _write(args.output, payload)
    rows = [(k, v) for k, v in payload.items() if k.endswith("/score") or "/" not in k]
    print(_table(rows, f"MME on {args.results}"))


def _run_amber(args: argparse.Namespace) -> None:
    from metrics.amber import COUNT_NAMES, _amber_compute, _amber_update, load_amber_annotations, read_amber_responses

    annotations = load_amber_annotations(args.annotations, args.relation, args.safe_words)
    ids, responses = read_amber_responses(args.responses, args.id_key, args.response_key)
    _require(ids, args.responses, "responses")
    counts = _amber_update(ids, responses, annotations)
    payload = {"metrics": _floats(_amber_compute(counts)), "counts": dict(zip(COUNT_NAMES, counts.tolist()))}
    _write(args.output, payload)
    print(_table(list(payload["metrics"].items()), f"AMBER generative on {args.responses}"))


# ---------------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_app score",
        description="Score caption / answer files with CHAIR, POPE, MME or AMBER; build POPE question sets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chair", help="CHAIR of a caption file (JSON Lines or JSON list)")
    p.add_argument("--captions", required=True, help="JSON Lines / JSON list of {image id, caption}")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--coco-dir", help="folder with COCO instances_*.json + captions_*.json (all merged)")
    gt.add_argument("--gt-objects", help="JSON object: image id -> list of object names")
    p.add_argument("--image-id-key", default="image_id")
    p.add_argument("--caption-key", default="caption")
    p.add_argument("--mode", choices=("reference", "lemma"), default="reference")
    p.add_argument("--skip-unknown", action="store_true", help="skip captions whose image id has no ground truth")
    p.add_argument("--cache-dir", help="ground-truth cache folder (default ~/.cache/grounded_attention/chair)")
    p.add_argument("--no-cache", action="store_true", help="build the COCO ground truth without the disk cache")
    p.add_argument("--output", required=True)
    p.set_defaults(run=_run_chair)

    p = sub.add_parser("pope", help="POPE of answer files joined to question files by question id")
    p.add_argument("--questions", nargs="+", required=True, help="official POPE question files, one per split")
    p.add_argument("--answers", nargs="+", required=True, help="answer files, in the order of --questions")
    p.add_argument("--parser", choices=("official", "robust"), default="official")
    p.add_argument("--answer-key", help='answer text key (default: "answer" if present, else "text")')
    p.add_argument("--output", required=True)
    p.set_defaults(run=_run_pope)

    p = sub.add_parser("pope-questions", help="build POPE question sets from a COCO instances file")
    p.add_argument("--instances", required=True)
    p.add_argument("--strategy", choices=("random", "popular", "adversarial", "all"), default="all")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--num-questions", type=int, default=3, help="positive (= negative) questions per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--an-template", help='template before vowels (default: the official one, "imange" typo included)')
    p.add_argument("--prefix", default="coco")
    p.add_argument("--output-dir", required=True)
    p.set_defaults(run=_run_pope_questions)

    p = sub.add_parser("mme", help="MME scores of an official results folder or a records file")
    p.add_argument("--results", required=True, help="folder of <subtask>.txt files, or JSON Lines / JSON list")
    p.add_argument("--subtask-key", default="category")
    p.add_argument("--image-key", default="image")
    p.add_argument("--label-key", default="answer")
    p.add_argument("--prediction-key", default="prediction")
    p.add_argument("--output", required=True)
    p.set_defaults(run=_run_mme)

    p = sub.add_parser("amber", help="AMBER generative metrics (CHAIR, Cover, Hal, Cog)")
    p.add_argument("--responses", required=True, help='JSON list / JSON Lines of {"id", "response"}')
    p.add_argument("--annotations", required=True, help="AMBER data/annotations.json")
    p.add_argument("--relation", required=True, help="AMBER data/relation.json")
    p.add_argument("--safe-words", required=True, help="AMBER data/safe_words.txt")
    p.add_argument("--id-key", default="id")
    p.add_argument("--response-key", default="response")
    p.add_argument("--output", required=True)
    p.set_defaults(run=_run_amber)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry of ``python -m lightning_app score ...``."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        parser.exit(2, f"score {args.command}: error: {message}\n")
