"""Speed of the hallucination metrics on one CPU core.

* CHAIR: the 500 long captions of an OPERA log (``tests/data/opera_chair/``), ground truth
  already loaded. "cold" clears the tokeniser/singulariser caches before every repeat (first contact
  with the text); "warm" keeps them (a validation loop that has seen the vocabulary before).
* CHAIR ground truth at COCO-2014 scale (``--coco-scale``): synthetic ``instances``/``captions`` files
  with 123,287 images, ~600k human-like captions (sentences of the OPERA logs) and ~860k instances;
  time to build the ground truth, and to load it back from the disk cache.
* POPE: 9000 answers (3 splits x 3000, the size of COCO POPE) in varied wording, official and robust
  parsers, through the functional form and the ``Metric`` in batches of 64.

    taskset -c 0 python benchmarks/metrics_speed.py [--log llava-1.5_greedy] [--repeats 5] [--coco-scale]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metrics.chair import CHAIR, chair
from metrics.chair_gt import build_coco_ground_truth, load_gt_objects
from metrics.coco_objects import COCO_CATEGORIES
from metrics.english import singularize_lemma
from metrics.pope import POPE, pope
from metrics.text import _chunk_tokens, singularize



def _clear_caches() -> None:
    for cached in (_chunk_tokens, singularize, singularize_lemma):
        cached.cache_clear()


def _best(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "opera_chair"  # sources: its README
GT_OBJECTS = REFERENCE / "gt_objects.json"
LOGS = sorted(p.name.removesuffix(".jsonl.gz") for p in REFERENCE.glob("*.jsonl.gz"))


def read_log(name: str) -> list[dict]:
    with gzip.open(REFERENCE / f"{name}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def bench_chair(log: str, repeats: int) -> list[str]:
    start = time.perf_counter()
    gt = load_gt_objects(GT_OBJECTS)
    gt_seconds = time.perf_counter() - start
    records = read_log(log)
    caps, ids = [r["caption"] for r in records], [r["image_id"] for r in records]
    words = sum(len(c.split()) for c in caps) / len(caps)
    lines = [f"CHAIR, {log}: {len(caps)} captions, {words:.0f} words/caption; gt_objects.json loaded in {gt_seconds * 1e3:.0f} ms"]
    for mode in ("reference", "lemma"):
        for label, before in (("cold", _clear_caches), ("warm", None)):
            if before is None:
                chair(caps, ids, gt, mode)  # fill the caches
            best, median = _best(lambda: chair(caps, ids, gt, mode), repeats, before)
            lines.append(f"  chair() {mode:9s} {label}: {len(caps) / best:8.0f} captions/s (best), {len(caps) / median:8.0f} (median)")

    def metric_run() -> None:
        metric = CHAIR(gt)
        for i in range(0, len(caps), 16):
            metric.update(caps[i : i + 16], ids[i : i + 16])
        metric.compute()

    best, median = _best(metric_run, repeats, _clear_caches)
    lines.append(f"  CHAIR Metric, batches of 16, cold: {len(caps) / best:8.0f} captions/s (best), {len(caps) / median:8.0f} (median)")
    return lines


def bench_coco_scale(num_images: int = 123_287) -> list[str]:
    rng = random.Random(0)
    sentences = sorted({
        sentence.strip() + "."
        for log in LOGS
        for record in read_log(log)
        for sentence in re.split(r"[.\n]", record["caption"])
        if 5 <= len(sentence.split()) <= 20
    })
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(COCO_CATEGORIES)]
    images = [{"id": i} for i in range(num_images)]
    instances = {"images": images, "categories": categories, "annotations": [
        {"id": k, "image_id": i, "category_id": rng.randint(1, 80)} for k, i in enumerate(rng.choices(range(num_images), k=7 * num_images))]}
    captions = {"images": images, "annotations": [
        {"id": i * 5 + j, "image_id": i, "caption": rng.choice(sentences)} for i in range(num_images) for j in range(5)]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "instances_train2014.json").write_text(json.dumps(instances))
        (folder / "captions_train2014.json").write_text(json.dumps(captions))
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        _clear_caches()
        start = time.perf_counter()
        build_coco_ground_truth(folder, cache_dir=folder / "cache")
        built = time.perf_counter() - start
        start = time.perf_counter()
        build_coco_ground_truth(folder, cache_dir=folder / "cache")
        loaded = time.perf_counter() - start
    return [
        f"CHAIR ground truth, COCO scale: {num_images} images, {len(captions['annotations'])} captions, "
        f"{len(instances['annotations'])} instances ({size:.0f} MiB of JSON)",
        f"  build (parse every human caption) + write cache: {built:6.1f} s",
        f"  load from the disk cache:                      {loaded:6.1f} s",
    ]


ANSWER_TEMPLATES = [
    "Yes", "No", "Yes, there is a {o} in the image.", "No, there is no {o} in the image.",
    "There is a {o} in the image.", "There is not a {o} in the image.", "I don't see a {o}.", "NO",
    "Yes. The {o} is on the left, next to a table.", "Nope.", "",
]


def bench_pope(repeats: int) -> list[str]:
    rng = random.Random(0)
    objects = ["dog", "cat", "dining table", "person", "car", "umbrella"]
    answers = [rng.choice(ANSWER_TEMPLATES).format(o=rng.choice(objects)) for _ in range(9000)]
    labels = [rng.choice(["yes", "no"]) for _ in range(9000)]
    lines = [f"POPE: {len(answers)} answers"]
    for parser in ("official", "robust"):
        best, median = _best(lambda: pope(answers, labels, parser), repeats)
        lines.append(f"  pope() {parser:8s}: {len(answers) / best:9.0f} answers/s (best), {best * 1e3:6.1f} ms per 9000")

    def metric_run() -> None:
        metric = POPE()
        for i in range(0, len(answers), 64):
            metric.update(answers[i : i + 64], labels[i : i + 64])
        metric.compute()

    best, median = _best(metric_run, repeats)
    lines.append(f"  POPE Metric, batches of 64: {len(answers) / best:9.0f} answers/s (best), {best * 1e3:6.1f} ms per 9000")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="llava-1.5_greedy", help="OPERA log name in tests/data/opera_chair")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coco-scale", action="store_true", help="also time ground-truth building at COCO-2014 scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = bench_chair(args.log, args.repeats) + bench_pope(args.repeats)
    if args.coco_scale:
        lines += bench_coco_scale()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
