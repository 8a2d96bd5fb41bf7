"""Grounded vs plain: time ratio for fwd+bwd, prefill and per-token decode, measured in one run.

Two copies of one random LLaVA-architecture model (same weights): ``plain`` is untouched (sdpa), ``grounded``
has ``add_grounding`` on its last layers. Repetitions are interleaved (plain, grounded, plain, ...) so drift
hits both alike; the script prints min and median per case and the ratio grounded/plain of each.

    python benchmarks/overhead.py                 # CPU config (Llama 512 x 8 layers, batch 4, 144 + 64 tokens)
    python benchmarks/overhead.py --preset 7b     # GPU: 7B-shaped language model, bf16, 576 image tokens
    python benchmarks/overhead.py --preset tiny --reps 1 --json out.json   # seconds (smoke runs); JSON too
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlavaForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from models import GroundingConfig, add_grounding
from models.tiny import clip_vision_config, llama_config, llava_config

IMAGE_TOKEN_ID = 3


@dataclass
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    image_size: int
    patch: int  # image tokens = (image_size / patch) ** 2
    text_tokens: int
    batch: int
    grounded_layers: list[int]
    dtype: torch.dtype
    decode_tokens: int
    reps: int


PRESETS = {
    "cpu": Preset(512, 8, 8, 8, 1376, 8000, 48, 4, 64, 4, [-2, -1], torch.float32, 16, 7),
    "tiny": Preset(64, 2, 4, 4, 128, 256, 32, 8, 12, 2, [-1], torch.float32, 4, 2),
    "7b": Preset(4096, 32, 32, 32, 11008, 32064, 336, 14, 64, 4, [-4, -3, -2, -1], torch.bfloat16, 32, 10),
}


def build(preset: Preset, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    text = llama_config(preset.hidden, preset.layers, preset.heads, preset.kv_heads, preset.vocab,
                        intermediate=preset.intermediate, max_positions=4096)
    # a one-layer narrow vision tower: the language model dominates the cost, as in a real VLM
    vision = clip_vision_config(hidden=32, layers=1, image_size=preset.image_size, patch=preset.patch)
    config = llava_config(vision, text, IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: minutes less for a 7B shape than on the CPU
        plain = LlavaForConditionalGeneration(config).to(dtype=preset.dtype)
        grounded = LlavaForConditionalGeneration(config).to(dtype=preset.dtype)
    grounded.load_state_dict(plain.state_dict())
    add_grounding(grounded, GroundingConfig(layers=preset.grounded_layers))
    return plain.eval(), grounded.eval()


def batch(preset: Preset, device: str) -> dict[str, torch.Tensor]:
    n_img = (preset.image_size // preset.patch) ** 2
    g = torch.Generator().manual_seed(0)
    before = torch.randint(10, preset.vocab, (preset.batch, 5), generator=g)
    after = torch.randint(10, preset.vocab, (preset.batch, preset.text_tokens - 5), generator=g)
    ids = torch.cat([before, torch.full((preset.batch, n_img), IMAGE_TOKEN_ID), after], dim=1)
    pixels = torch.randn(preset.batch, 3, preset.image_size, preset.image_size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=preset.dtype),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def fwd_bwd(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()

    return run


def generate(model: torch.nn.Module, inputs: dict, new_tokens: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return run


class StepClock(StoppingCriteria):
    """Timestamps every decoding step (generate calls it once per step, after the forward)."""

    def __init__(self, device: str) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_steps(model: torch.nn.Module, inputs: dict, new_tokens: int, device: str) -> list[float]:
    """Seconds of each cached decoding step after the first token."""
    clock = StepClock(device)
    with torch.no_grad():
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def measure(cases: dict[str, tuple[Callable, Callable]], reps: int, device: str) -> dict[str, tuple[list, list]]:
    times = {name: ([], []) for name in cases}
    for plain, grounded in cases.values():  # warm-up
        plain(), grounded()
    for _ in range(reps):
        for name, (plain, grounded) in cases.items():
            times[name][0].append(timed(plain, device))
            times[name][1].append(timed(grounded, device))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    reps = args.reps or preset.reps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.preset == "7b" and device == "cpu":
        parser.error("--preset 7b needs a CUDA GPU (a 7B-shaped model in bf16); use the cpu preset here")
    if args.threads:
        torch.set_num_threads(args.threads)
    plain, grounded = build(preset, device)
    inputs = batch(preset, device)
    plain.train(), grounded.train()
    train = measure({"fwd+bwd": (fwd_bwd(plain, inputs), fwd_bwd(grounded, inputs))}, reps, device)
    plain.eval(), grounded.eval()
    n = preset.decode_tokens
    results = {**train, **measure({"prefill": (generate(plain, inputs, 1), generate(grounded, inputs, 1))}, reps, device)}
    # per-token decode: every step of one long generate() per repetition, interleaved
    steps: tuple[list, list] = ([], [])
    decode_steps(plain, inputs, 4, device), decode_steps(grounded, inputs, 4, device)
    for _ in range(reps):
        steps[0].extend(decode_steps(plain, inputs, n + 1, device))
        steps[1].extend(decode_steps(grounded, inputs, n + 1, device))
    results["decode/token"] = steps
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    n_img = (preset.image_size // preset.patch) ** 2
    print(
        f"device: {name}; preset {args.preset}: hidden {preset.hidden}, {preset.layers} layers, {preset.heads} heads, "
        f"batch {preset.batch}, {n_img} image + {preset.text_tokens} text tokens, grounded layers "
        f"{preset.grounded_layers}, {preset.dtype}, {reps} interleaved reps"
    )
    table = {case: summary(p, g) for case, (p, g) in results.items()}
    print(f"{'case':<14}{'plain min':>11}{'grounded min':>14}{'ratio min':>11}{'plain med':>11}{'grounded med':>14}{'ratio med':>11}")
    for case, r in table.items():
        print(
            f"{case:<14}{r['plain_min_ms']:>9.2f}ms{r['grounded_min_ms']:>12.2f}ms{r['ratio_min']:>11.3f}"
            f"{r['plain_median_ms']:>9.2f}ms{r['grounded_median_ms']:>12.2f}ms{r['ratio_median']:>11.3f}"
        )
    if args.json:
        setup = {"device": name, "preset": args.preset, "hidden": preset.hidden, "layers": preset.layers,
                 "heads": preset.heads, "batch": preset.batch, "image_tokens": n_img, "text_tokens": preset.text_tokens,
                 "grounded_layers": preset.grounded_layers, "dtype": str(preset.dtype), "reps": reps}
        with open(args.json, "w") as f:
            json.dump({**setup, "cases": table}, f, indent=1)


def summary(plain: list[float], grounded: list[float]) -> dict[str, float]:
    """Min and median milliseconds of each model and their ratios grounded / plain."""
    pmin, gmin, pmed, gmed = min(plain), min(grounded), statistics.median(plain), statistics.median(grounded)
    return {"plain_min_ms": pmin * 1e3, "grounded_min_ms": gmin * 1e3, "ratio_min": gmin / pmin,
            "plain_median_ms": pmed * 1e3, "grounded_median_ms": gmed * 1e3, "ratio_median": gmed / pmed}


if __name__ == "__main__":
    main()
