"""Captions per second of every decoding method at batch 1 and batch 32, and its cost relative to greedy.

Models: ``demo`` (the offline demo backbone's architecture, random weights: CLIP 64 x 2, 64 image tokens, Llama 64 x
2), ``cpu`` (the CPU Llama preset of benchmarks/overhead.py: Llama 512 x 8, 144 image + 64 text tokens) and ``7b``
(its GPU preset: llava-1.5-7b's language model shape, Llama 4096 x 32, 576 image + 64 text tokens, bf16, random
weights; CUDA only). Every row decodes exactly ``--new-tokens`` tokens (no EOS), methods at their published
defaults. Repetitions are interleaved (greedy, beam, vcd, ..., greedy, beam, ...) so drift hits all alike; the table
uses the median and prints, measured in one run:

- ``speedup``: captions/s at the large batch / captions/s at batch 1 (target >= 8 on the 8-layer preset);
- ``cost``: seconds of the method / seconds of greedy at the same batch (``grounded``, ours: / greedy on the same
  model grounded on its last layer with candidate-word scores; issue target <= 1.3);
- ``passes``: forward passes per caption relative to greedy (the cost when a step is latency-bound, batch 1);
- ``work``: token-forwards relative to greedy (rows x tokens through the model, the cost when compute-bound);
- ``cost/theory``: cost / passes at batch 1 and cost / work at the large batch (target within 1.2x).

    python benchmarks/decoding_speed.py                      # demo + cpu preset, batches 1 and 32
    python benchmarks/decoding_speed.py --models cpu --reps 3
    python benchmarks/decoding_speed.py --clock cpu          # shared CPU: seconds of this process, 1 thread
    python benchmarks/decoding_speed.py --smoke              # tiny sizes, a few seconds (tests)
    python benchmarks/decoding_speed.py --models cpu --device cuda --json out.json   # on a GPU; JSON too
    python benchmarks/decoding_speed.py --models 7b --device cuda --reps 2             # the 7B-shaped table

``--device cuda`` runs the same models (fp32) on the GPU, synchronising before every clock reading.
``--clock cpu`` times with ``time.process_time`` (the CPU seconds this process used) on one torch thread: on a
machine other jobs share, wall time mostly measures their load; CPU time measures the method's own work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.decoding import METHODS  # noqa: E402
from models.decoding.settings import OPERASettings  # noqa: E402


@dataclass
class Bench:
    """A model and how to make a batch for it."""

    model: torch.nn.Module
    inputs: Callable[[int], dict]
    prompt_tokens: int  # image + text tokens of a prompt
    text_tokens: int  # the prompt without its image (PAI/M3ID's second pass)
    description: str


def _prompt(batch: int, before: int, image: int, after: int, image_id: int, vocab: int, pixels: tuple) -> dict:
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> torch.Tensor:  # ids past the special ones, never the image placeholder
        ids = torch.randint(5, vocab, (batch, n), generator=g)
        return ids.masked_fill(ids == image_id, 5 if image_id != 5 else 6)

    ids = torch.cat([text(before), torch.full((batch, image), image_id), text(after)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, *pixels, generator=g)}


def demo(device: str = "cpu") -> Bench:
    from models.demo_backbone import TinyLlavaConfig, build_model, train_tokenizer

    config = TinyLlavaConfig()
    words = "a the red green blue small large cube sphere cylinder left right of on near image shows there is".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    model = build_model(tokenizer, config).eval()
    image_id = model.config.image_token_id
    size = (3, config.image_size, config.image_size)
    return Bench(model, lambda b: _prompt(b, 1, config.image_tokens, 8, image_id, len(tokenizer), size),
                 config.image_tokens + 9, 9,
                 f"demo backbone (random weights): Llama {config.text_hidden} x {config.text_layers} layers, "
                 f"{config.image_tokens} image + 9 text tokens, vocab {len(tokenizer)}")


def llama_preset(name: str, device: str = "cpu") -> Bench:
    """A preset of benchmarks/overhead.py (``cpu`` or ``7b``), its plain model built on ``device`` in its dtype."""
    from benchmarks.overhead import IMAGE_TOKEN_ID, PRESETS, build

    p = PRESETS[name]
    model = build(p, device)[0].eval()
    n_img = (p.image_size // p.patch) ** 2
    size = (3, p.image_size, p.image_size)
    return Bench(model, lambda b: _prompt(b, 5, n_img, p.text_tokens - 5, IMAGE_TOKEN_ID, p.vocab, size),
                 n_img + p.text_tokens, p.text_tokens,
                 f"overhead.py {name} preset: Llama {p.hidden} x {p.layers} layers, {n_img} image + {p.text_tokens} "
                 f"text tokens, vocab {p.vocab}, {str(p.dtype).removeprefix('torch.')}")


def tiny(device: str = "cpu") -> Bench:
    from models.tiny import IMAGE_TOKEN_ID, VOCAB, tiny_llava

    torch.manual_seed(0)
    model = tiny_llava().eval()
    return Bench(model, lambda b: _prompt(b, 2, 16, 4, IMAGE_TOKEN_ID, VOCAB, (3, 32, 32)), 22, 6, "tiny LLaVA")


BUILDERS: dict[str, Callable[[str], Bench]] = {
    "demo": demo,
    "cpu": lambda device: llama_preset("cpu", device),
    "7b": lambda device: llama_preset("7b", device),
    "tiny": tiny,
}
CUDA_ONLY = {"7b"}  # a 7B-shaped model in bf16: minutes of random init and 26 GB on a CPU


def theory(name: str, settings, prompt: int, text: int, new: int, encoder_decoder: bool = False) -> tuple[float, float]:
    """(forward passes, token-forwards) per caption relative to greedy, for ``new`` tokens after a prompt.

    OPERA's candidates of a step take one pass together on decoder-only models, one pass each on Flan-T5."""
    greedy_work = prompt + new - 1
    if name == "beam":
        k = settings.num_beams
        return 1.0, (prompt + k * (new - 1)) / greedy_work
    if name == "opera":
        k, c = settings.num_beams, settings.num_candidates
        return 1.0 + (c if encoder_decoder else 1), (prompt + k * (new - 1) + k * c * new) / greedy_work
    if name == "vcd" or (name == "pai" and settings.gamma != 1) or name == "m3id":
        extra = prompt if name == "vcd" else text
        return 2.0, 1.0 + (extra + new - 1) / greedy_work
    return 1.0, 1.0


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], clock: Callable[[], float], device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


GROUNDED_GREEDY = "greedy on the grounded model"


def word_scored(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` grounded on its last layer with candidate-word scores and an object-word table of 80
    distinct token ids (one per COCO category): the model ``grounded`` decoding needs (random weights)."""
    import copy

    from models.backbones import add_grounding
    from models.grounding import GroundingConfig
    from models.word_grounding import ObjectWords, set_object_words
    from metrics.coco_objects import COCO_CATEGORIES

    grounded = add_grounding(copy.deepcopy(model), GroundingConfig(layers=[-1], word_score=True)).eval()
    vocab = grounded.get_input_embeddings().weight.shape[0]
    tokens = tuple(range(5, 5 + min(80, vocab - 5)))
    set_object_words(grounded, ObjectWords(tuple(COCO_CATEGORIES), tokens, tuple(range(len(tokens)))))
    return grounded


def measure(bench: Bench, batch: int, methods: list[str], new: int, reps: int, clock: Callable[[], float],
            device: str = "cpu") -> dict[str, float]:
    """Median seconds per method at ``batch``, repetitions interleaved over the methods.

    Methods that need candidate-word scores (``grounded``) run on ``word_scored(bench.model)``, and greedy on that
    same model is timed too (``GROUNDED_GREEDY``): their cost is relative to it."""
    dtype = next(bench.model.parameters()).dtype  # pixels in the model's dtype (bf16 for the 7b preset)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in bench.inputs(batch).items()}
    grounded = word_scored(bench.model) if any(METHODS[m].word_score for m in methods) else None
    runs = {}
    for name in methods:
        settings = METHODS[name].settings()
        model = grounded if METHODS[name].word_score else bench.model
        runs[name] = (lambda f=METHODS[name].fn, s=settings, m=model: f(m, inputs, s, max_new_tokens=new,
                                                                         pad_token_id=0, eos_token_id=None))
    if grounded is not None:
        runs[GROUNDED_GREEDY] = lambda: METHODS["greedy"].fn(grounded, inputs, METHODS["greedy"].settings(),
                                                             max_new_tokens=new, pad_token_id=0, eos_token_id=None)
    runs["greedy"]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name in runs:
            times[name].append(timed(runs[name], clock, device))
    return {name: statistics.median(t) for name, t in times.items()}


def report(bench: Bench, batches: list[int], methods: list[str], new: int, reps: int,
           clock: Callable[[], float], device: str = "cpu") -> list[dict]:
    small, large = batches
    seconds = {b: measure(bench, b, methods, new, reps, clock, device) for b in batches}
    rows = []
    for name in methods:
        passes, work = theory(name, METHODS[name].settings(), bench.prompt_tokens, bench.text_tokens, new)
        rate = {b: b / seconds[b][name] for b in batches}
        base = GROUNDED_GREEDY if METHODS[name].word_score else "greedy"
        cost = {b: seconds[b][name] / seconds[b][base] for b in batches}
        rows.append(dict(method=name, small=rate[small], large=rate[large], speedup=rate[large] / rate[small],
                         cost_small=cost[small], cost_large=cost[large], passes=passes, work=work,
                         fit_small=cost[small] / passes, fit_large=cost[large] / work))
    return rows


def print_table(rows: list[dict], batches: list[int]) -> None:
    small, large = batches
    print(f"| method | captions/s b{small} | captions/s b{large} | speedup b{large}/b{small} | cost b{small} | "
          f"cost b{large} | passes | work | cost/passes b{small} | cost/work b{large} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['small']:.2f} | {r['large']:.2f} | {r['speedup']:.1f} | {r['cost_small']:.2f} | "
              f"{r['cost_large']:.2f} | {r['passes']:.1f} | {r['work']:.2f} | {r['fit_small']:.2f} | "
              f"{r['fit_large']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,cpu", help=f"comma-separated, of {sorted(BUILDERS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--batches", default="1,32", help="two batch sizes: small,large")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; cpu clock: 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models decode")
    parser.add_argument("--json", default=None, help="also write the tables to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny model, batches 1,2, 3 tokens, 1 rep")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batches, args.new_tokens, args.reps = "tiny", "1,2", 3, 1
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if "greedy" not in methods:
        methods.insert(0, "greedy")
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) != 2:
        parser.error("--batches takes two sizes, e.g. 1,32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    cuda_only = sorted(CUDA_ONLY & set(args.models.split(",")))
    if cuda_only and args.device != "cuda":
        parser.error(f"--models {','.join(cuda_only)} needs --device cuda (a GPU); use --models cpu,demo here")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu counts this process's CPU seconds, not the GPU's work: use the wall clock on cuda")
    if args.threads or args.clock == "cpu":
        torch.set_num_threads(args.threads or 1)
    opera = OPERASettings()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.clock} clock; "
          f"{args.new_tokens} new tokens per caption, no EOS; median of {args.reps} interleaved reps; defaults "
          f"(opera: {opera.num_beams} beams x {opera.num_candidates} candidates)")
    tables = {}
    with torch.no_grad():
        for name in args.models.split(","):
            if name not in BUILDERS:
                parser.error(f"unknown model {name!r}; known: {sorted(BUILDERS)}")
            bench = BUILDERS[name](args.device)
            bench.model.to(args.device)
            print(f"\n{name}: {bench.description}")
            rows = report(bench, batches, methods, args.new_tokens, args.reps, CLOCKS[args.clock], args.device)
            print_table(rows, batches)
            tables[name] = {"description": bench.description, "rows": rows}
            del bench
            if args.json:  # after every model, so that a run stopped by a timeout keeps the finished tables
                setup = {"device": where, "clock": args.clock, "batches": batches, "new_tokens": args.new_tokens,
                         "reps": args.reps}
                Path(args.json).write_text(json.dumps({**setup, "models": tables}, indent=1))


if __name__ == "__main__":
    main()
