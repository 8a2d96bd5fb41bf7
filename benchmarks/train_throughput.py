"""Training throughput: GroundedVLM under Lightning (LM + grounding + contrastive) vs a plain PyTorch loop.

Both train the same demo backbone on the same pre-collated batches of the synthetic world (so data loading
is not timed). *plain*: ``model(**batch, labels=...).loss.backward(); opt.step()`` on the untouched model.
*Lightning*: ``Trainer.fit`` of ``GroundedVLM`` with grounding on the last layer, timed per step by a callback,
with (a) the object grounding loss on the positives only and (b) the full objective, whose BCE and contrastive
terms need a second forward/backward pass over the negative captions. Blocks of steps are interleaved (plain, lightning, plain, ...) and the script
prints samples/s (median and best step) and the overhead ratio measured in this one run.

    python benchmarks/train_throughput.py [--steps 20] [--blocks 3] [--batch-size 32] [--text-hidden 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText

from datamodules import CaptionPairsDataModule, WorldConfig
from datamodules.evaluation import EvaluationSpec
from models import GroundedVLM, GroundingConfig, ObjectiveConfig
from models.demo_backbone import TinyLlavaConfig


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def _identity(batch: dict) -> dict:
    return batch


class Batches(LightningDataModule):
    """Serves pre-collated batches; validation hooks come from the real datamodule."""

    def __init__(self, real: CaptionPairsDataModule, batches: list[dict]) -> None:
        super().__init__()
        self.real, self.batches = real, batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=_identity)

    def evaluation(self, stage: str, chair_mode: str = "reference") -> EvaluationSpec:
        return EvaluationSpec(ground_truth={})  # the benchmark trains only: nothing is evaluated


def collated(root: Path, batch_size: int, count: int, backbone: TinyLlavaConfig) -> tuple[CaptionPairsDataModule, list[dict]]:
    dm = CaptionPairsDataModule(
        processor=str(root / "backbone"), world=WorldConfig(root=root / "world", num_train=400, num_val=20),
        demo_backbone=backbone, batch_size=batch_size,
    )
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return dm, [next(loader) for _ in range(count)]


def plain_block(model, optimizer, batches: list[dict]) -> list[float]:
    times = []
    keep = ("input_ids", "attention_mask", "pixel_values", "labels")
    for batch in batches:
        start = time.perf_counter()
        loss = model(**{k: batch[k] for k in keep}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def lightning_block(module: GroundedVLM, dm: Batches, steps: int, root: Path) -> list[float]:
    timer = StepTimer()
    trainer = Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-hidden", type=int, default=TinyLlavaConfig.text_hidden, help="width of the text model")
    parser.add_argument("--text-layers", type=int, default=TinyLlavaConfig.text_layers)
    args = parser.parse_args()
    backbone = TinyLlavaConfig(text_hidden=args.text_hidden, text_layers=args.text_layers)
    with tempfile.TemporaryDirectory() as tmp:
        real, batches = collated(Path(tmp), args.batch_size, args.steps, backbone)
        plain = AutoModelForImageTextToText.from_pretrained(Path(tmp) / "backbone").train()
        variants = {
            # the grounding term on positives only: Lightning + grounding scores + loss, no extra forward pass
            "Lightning, LM + object loss": ObjectiveConfig(lambda_grounding=0.1, lambda_contrastive=0.0,
                                                            grounding_loss="object"),
            # the full objective: also a forward/backward pass over the negative captions
            "Lightning, full objective": ObjectiveConfig(lambda_grounding=0.1, lambda_contrastive=0.1),
        }
        modules = {}
        for name, objective in variants.items():
            module = GroundedVLM(backbone=str(Path(tmp) / "backbone"), grounding=GroundingConfig(layers=[-1]),
                                 objective=objective, lr=2e-3)
            module.configure_model()
            module.model.load_state_dict(copy.deepcopy(plain.state_dict()), strict=False)
            modules[name] = module
        optimizer = torch.optim.AdamW(plain.parameters(), lr=2e-3)
        data = Batches(real, batches)
        plain_block(plain, optimizer, batches[:2])  # warm-up
        times: dict[str, list[float]] = {"plain loop, LM loss": [], **{name: [] for name in modules}}
        for _ in range(args.blocks):
            times["plain loop, LM loss"] += plain_block(plain, optimizer, batches)[1:]
            for name, module in modules.items():
                times[name] += lightning_block(module, data, args.steps, Path(tmp) / "runs")[1:]
    negatives = sum(int(b["neg_index"].numel()) for b in batches if "neg_index" in b) / len(batches)
    bs = args.batch_size
    base_med, base_min = statistics.median(times["plain loop, LM loss"]), min(times["plain loop, LM loss"])
    print(f"demo backbone, text model {args.text_hidden} wide x {args.text_layers} layers; "
          f"CPU x{torch.get_num_threads()} threads; batch {bs} (+{negatives:.1f} negative captions per batch on "
          f"average); {args.blocks} interleaved blocks of {args.steps} steps (first step of each block dropped)")
    print(f"{'':<30}{'samples/s med':>15}{'samples/s best':>16}{'ratio med':>11}{'ratio best':>12}")
    for name, values in times.items():
        med, best = statistics.median(values), min(values)
        print(f"{name:<30}{bs / med:>15.1f}{bs / best:>16.1f}{med / base_med:>11.3f}{best / base_min:>12.3f}")


if __name__ == "__main__":
    main()
