"""Training throughput of a 7B-shaped grounded LLaVA under DDP / DeepSpeed ZeRO-2 / ZeRO-3 (random weights).

The recipe of ``configs/llava7b.yaml``: bf16 weights with ``bf16-mixed``, LoRA r 128 / alpha 256 on every
language-model linear layer, projector trained fully, vision tower frozen, gradient checkpointing, grounding on
the last 8 layers with the full objective (a second pass over negative captions for half of the rows). Batches
are synthetic (576 image tokens of a 336 px image + ``--text`` text tokens), so data loading is not timed.
For each strategy it prints the median step time, tokens/s, peak GPU memory and MFU, measured in one run:

    python benchmarks/zero_throughput.py --strategies zero2 zero3 [--batch-size 8] [--steps 10] [--devices 1]
    python benchmarks/zero_throughput.py --shape tiny --accelerator cpu --strategies ddp   # a CPU smoke run
    python benchmarks/zero_throughput.py --strategies zero3 --backbone /tmp/llava7b --json zero3.json

``--backbone DIR`` keeps the random backbone in DIR (written there when DIR holds no ``config.json``), so one
strategy per process can share it: each process then measures its own peak memory from a clean start.

MFU = model FLOPs per step / (step time x devices x peak). Model FLOPs count the work a step must do, not
checkpoint recomputation: the frozen language-model linear layers forward + input gradients (4 N_lm per
text-side token), attention scores and mixing (12 L T d per token, PaLM's term), the frozen vision tower's
forward (2 N_vision per patch token) and the negatives' extra forward/backward pass. The 6 N convention of
full fine-tuning is printed beside it. Peak: ``--peak-tflops`` (default 989, H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader
from transformers import LlavaConfig, LlavaForConditionalGeneration

from datamodules.evaluation import EvaluationSpec
from models import GroundedVLM, GroundingConfig, LoraSettings, ObjectiveConfig
from models.demo_backbone import train_tokenizer
from models.tiny import clip_vision_config, llama_config, llava_config


@dataclass(frozen=True)
class Shape:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_mlp: int
    vocab: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SHAPES = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 7B shape)
    "7b": Shape(1024, 24, 16, 336, 14, 4096, 32, 32, 11008, 32064),
    "13b": Shape(1024, 24, 16, 336, 14, 5120, 40, 40, 13824, 32064),
    "tiny": Shape(32, 2, 4, 56, 14, 64, 8, 4, 128, 256),
}
IMAGE_TOKEN = 32000 % 256  # an id inside every shape's vocabulary


def shape_config(shape: Shape, image_token: int = IMAGE_TOKEN) -> LlavaConfig:
    """LLaVA-1.5's wiring at ``shape``: CLIP tower (features of its second-to-last layer) + Llama."""
    vision = clip_vision_config(shape.vision_hidden, shape.vision_layers, shape.image_size, shape.patch,
                                heads=shape.vision_heads, intermediate=4 * shape.vision_hidden, projection_dim=768)
    text = llama_config(shape.text_hidden, shape.text_layers, shape.text_heads, kv_heads=shape.text_heads,
                        vocab=shape.vocab, intermediate=shape.text_mlp, max_positions=4096)
    return llava_config(vision, text, image_token, vision_feature_layer=-2)


def build_backbone(shape: Shape, directory: Path, device: str) -> Path:
    """Random weights of the shape (built on ``device`` for speed), saved with a small tokenizer."""
    config = shape_config(shape)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    train_tokenizer(["a photo of a cat on a mat"], 64).save_pretrained(directory)
    return directory


def synthetic_batches(shape: Shape, batch: int, text: int, count: int) -> list[dict]:
    """Caption-pair batches in the collator's layout: image tokens, then text; negatives for half of the rows."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        words = torch.randint(100, shape.vocab, (batch, text), generator=g)  # (B, T)
        ids = torch.cat([words[:, :4], torch.full((batch, shape.image_tokens), IMAGE_TOKEN), words[:, 4:]], dim=1)
        labels = ids.clone()
        labels[:, : 4 + shape.image_tokens + 16] = -100  # the prompt
        objects = torch.full_like(ids, -100)
        objects[:, -text + 20 :: 7] = 1  # every 7th caption token is an object word
        half = torch.arange(batch // 2)
        neg_objects = objects[half].clone()
        neg_objects[:, -text + 27 :: 14] = 0  # hallucinated words of the negatives
        out.append({
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "object_labels": objects,
            "pixel_values": torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g),
            "neg_input_ids": ids[half], "neg_attention_mask": torch.ones_like(ids[half]),
            "neg_object_labels": neg_objects, "neg_index": half,
        })
    return out


class Batches(LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)

    def evaluation(self, stage: str, chair_mode: str = "reference") -> EvaluationSpec:
        return EvaluationSpec(ground_truth={})  # the benchmark trains only: nothing is evaluated


class StepTimer(Callback):
    def __init__(self, synchronize: bool) -> None:
        self.times: list[float] = []
        self.synchronize, self._start = synchronize, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def model_flops(shape: Shape, batch: int, seq: int, negatives: int, vision_params: int, lm_params: int) -> tuple[float, float]:
    """(FLOPs a LoRA step does, the 6N full fine-tuning convention) for one step of one device."""
    attention = 12 * shape.text_layers * seq * shape.text_hidden  # per token: QK^T and AV, forward + backward
    rows = batch + negatives  # the negatives' pass repeats the language model (and the vision tower)
    lora = rows * seq * (4 * lm_params + attention) + rows * shape.image_tokens * 2 * vision_params
    full = rows * seq * (6 * lm_params + attention) + rows * shape.image_tokens * 6 * vision_params
    return float(lora), float(full)


def strategy(name: str):
    if name == "ddp":
        return "ddp" if torch.cuda.device_count() > 1 else "auto"
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stage = {"zero2": 2, "zero3": 3}[name]
    return DeepSpeedStrategy(stage=stage, overlap_comm=True, contiguous_gradients=True, exclude_frozen_parameters=True)


def run(name: str, backbone: Path, batches: list[dict], args: argparse.Namespace) -> dict:
    module = GroundedVLM(
        backbone=str(backbone), dtype="bfloat16", gradient_checkpointing=True, freeze_vision=True,
        grounding=GroundingConfig(layers=list(range(-8, 0))),
        objective=ObjectiveConfig(lambda_grounding=0.1, lambda_contrastive=0.1),
        lora=LoraSettings(r=128, alpha=256, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                          modules_to_save=["multi_modal_projector"]),
    )
    gpu = args.accelerator == "gpu"
    timer = StepTimer(synchronize=gpu)
    trainer = Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy(name),
                      precision="bf16-mixed", max_steps=len(batches), limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[timer], default_root_dir=args.out)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=Batches(batches))
    params = dict(module.model.named_parameters())
    numel = {n: (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for n, p in params.items()}
    vision = sum(v for n, v in numel.items() if "vision_tower" in n)
    lm = sum(v for n, v in numel.items()  # every linear layer a text token passes (embedding lookups are free)
             if ("language_model" in n or "lm_head" in n) and "lora_" not in n and "embed_tokens" not in n)
    times = timer.times[args.warmup:]
    step = statistics.median(times)
    first = batches[0]
    b, seq = first["input_ids"].shape
    lora, full = model_flops(SHAPES[args.shape], b, seq, int(first["neg_index"].numel()), vision, lm)
    peak = args.peak_tflops * 1e12
    return {
        "strategy": name, "step_s": step, "tokens_s": b * seq * args.devices / step,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
        "mfu": lora / step / peak, "mfu_6n": full / step / peak, "steps": len(times),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["zero2", "zero3"], choices=["ddp", "zero2", "zero3"])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--text", type=int, default=128, help="text tokens per row (576 image tokens come on top)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one device")
    parser.add_argument("--out", default=None, help="directory for the random backbone (default: a temporary one)")
    parser.add_argument("--backbone", default=None, help="keep the random backbone in this directory and reuse it")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    batches = synthetic_batches(shape, args.batch_size, args.text, args.warmup + args.steps)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        args.out = tmp
        backbone = Path(args.backbone) if args.backbone else Path(tmp) / "backbone"
        if not (backbone / "config.json").is_file():  # written beside, then moved: a killed run leaves no half one
            partial = backbone.with_name(backbone.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            build_backbone(shape, partial, "cuda" if args.accelerator == "gpu" else "cpu")
            shutil.rmtree(backbone, ignore_errors=True)
            partial.rename(backbone)
        results = [run(name, backbone, batches, args) for name in args.strategies]
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.shape}-shaped LLaVA, {device} x{args.devices}; batch {args.batch_size} x "
          f"{shape.image_tokens + args.text} tokens per device (+{args.batch_size // 2} negative rows); "
          f"{args.steps} timed steps after {args.warmup}; trainable {results[0]['trainable']:,}")
    if args.json:
        setup = {"device": device, "devices": args.devices, "shape": args.shape, "batch_size": args.batch_size,
                 "tokens_per_row": shape.image_tokens + args.text, "negative_rows": args.batch_size // 2,
                 "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops}
        with open(args.json, "w") as f:
            rows = [{k: None if v != v else v for k, v in r.items()} for r in results]  # NaN (no GPU peak): null
            json.dump({**setup, "results": rows}, f, indent=1)
    print(f"{'strategy':<10}{'step s':>9}{'tokens/s':>11}{'peak GiB':>10}{'MFU':>8}{'MFU 6N':>8}")
    for r in results:
        print(f"{r['strategy']:<10}{r['step_s']:>9.3f}{r['tokens_s']:>11.0f}{r['peak_gib']:>10.1f}"
              f"{100 * r['mfu']:>7.1f}%{100 * r['mfu_6n']:>7.1f}%")


if __name__ == "__main__":
    main()
