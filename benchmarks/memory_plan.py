"""Per-GPU memory plan for LLaVA-1.5 7B / 13B training (LoRA or full fine-tuning) under DDP and DeepSpeed ZeRO.

Everything is derived, not typed in:

* parameter counts from the real architectures, built on the ``meta`` device (no weights allocated) from
  transformers' ``LlavaConfig`` (CLIP ViT-L/14-336 + Vicuna v1.5 ``LlamaConfig``), with the project's own
  ``add_grounding`` and peft's ``get_peft_model`` applied as ``models.GroundedVLM.configure_model`` does;
* the per-GPU batch, gradient accumulation, LoRA settings, grounded layers and negative share from the
  configs (``configs/llava7b.yaml``, ``configs/llava13b.yaml``);
* model states (weights, gradients, AdamW states) per GPU with DeepSpeed's mixed-precision accounting (the same
  multipliers as ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
  ``stage3.estimate_zero3_model_states_mem_needs``);
* activations per sample with activation checkpointing on every decoder layer (formulas in docs/scale.md).

These are estimates, not GPU measurements. Usage::

    python benchmarks/memory_plan.py                     # the markdown tables of docs/scale.md
    python benchmarks/memory_plan.py --gpus 8 --headroom 0.1 --text-tokens 44 --grounded-attention math
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
BF16, FP32 = 2, 4
IMAGE_TOKENS = 576  # (336 / 14) ** 2 patches; the CLS token is dropped by vision_feature_select_strategy="default"
VISION_TOKENS = 577  # patches + CLS at the vision tower's output
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default (Lightning does not set it)
ADAMW_MASTER_AND_STATES = 12  # fp32 master copy + exp_avg + exp_avg_sq
ZERO_GRADS = BF16 + FP32  # DeepSpeed: 16-bit gradient partition + fp32 gradient partition (its "18 = 2 + 4 + 12")


@dataclass(frozen=True)
class Arch:
    """The language-model shape of one LLaVA-1.5 checkpoint (vision tower: CLIP ViT-L/14-336 for both)."""

    name: str
    config: str  # project config that trains it
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 32064  # llava-hf pads Vicuna's 32000 (+ <image>, <pad>) to 32064


ARCHS = (
    Arch("LLaVA-1.5 7B", "configs/llava7b.yaml", hidden=4096, layers=32, heads=32, intermediate=11008),
    Arch("LLaVA-1.5 13B", "configs/llava13b.yaml", hidden=5120, layers=40, heads=40, intermediate=13824),
)


@dataclass(frozen=True)
class RunSettings:
    """What a project config decides about memory."""

    per_gpu_batch: int
    accumulation: int
    lora_r: int
    lora_dropout: float
    lora_targets: str
    modules_to_save: tuple[str, ...]
    grounded_layers: tuple[int, ...]
    negative_fraction: float  # share of caption rows with a negative caption (a second forward pass)


@dataclass(frozen=True)
class Strategy:
    name: str
    stage: int  # 0 = DDP
    offload_optimizer: bool = False
    offload_params: bool = False


STRATEGIES = (
    Strategy("DDP", 0),
    Strategy("ZeRO-2", 2),
    Strategy("ZeRO-2 offload", 2, offload_optimizer=True),
    Strategy("ZeRO-3", 3),
    Strategy("ZeRO-3 offload", 3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one architecture (numbers of elements)."""

    base_total: int  # LlavaForConditionalGeneration as released
    vision: int
    projector: int
    language: int  # decoder stack + embeddings + final norm
    lm_head: int
    gates: int  # GroundingGate parameters on the grounded layers
    lora: int  # LoRA A/B matrices
    largest_decoder_layer: int

    @property
    def lora_trainable(self) -> int:
        """LoRA run: adapters + the projector's trainable copy (modules_to_save) + gates."""
        return self.lora + self.projector + self.gates

    @property
    def lora_resident(self) -> int:
        """LoRA run: every parameter on the GPU (peft keeps the original projector next to its trainable copy)."""
        return self.base_total + self.gates + self.lora + self.projector

    @property
    def full_trainable(self) -> int:
        """Full fine-tuning: language model + lm_head + projector + gates (vision tower frozen, as LLaVA-1.5)."""
        return self.language + self.lm_head + self.projector + self.gates


def read_run_settings(path: Path, gpus: int) -> RunSettings:
    """Per-GPU batch = data.batch_size (global, divided by the processes) / gpus; the rest from model.init_args."""
    from lightning_app.suite_cli import merged_config

    cfg = merged_config(path)  # overlay configs (llava13b.yaml on llava7b.yaml) with their bases
    data, model, trainer = cfg["data"]["init_args"], cfg["model"]["init_args"], cfg["trainer"]
    global_batch = int(data["batch_size"])
    if global_batch % gpus:
        raise ValueError(f"{path}: data.batch_size {global_batch} does not divide over {gpus} GPUs")
    lora = model["lora"]
    return RunSettings(
        per_gpu_batch=global_batch // gpus,
        accumulation=int(trainer.get("accumulate_grad_batches", 1)),
        lora_r=int(lora["r"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        lora_targets=lora["target_modules"],
        modules_to_save=tuple(lora.get("modules_to_save", [])),
        grounded_layers=tuple(model["grounding"]["layers"]),
        negative_fraction=float(data.get("negative_fraction", 1.0)),
    )


def llava_1_5_config(arch: Arch):
    """llava-hf/llava-1.5-{7b,13b}-hf's configuration, built locally (no hub access needed)."""
    from models.tiny import clip_vision_config, llama_config, llava_config

    vision = clip_vision_config(1024, 24, image_size=336, patch=14, heads=16, intermediate=4096, projection_dim=768)
    text = llama_config(arch.hidden, arch.layers, arch.heads, kv_heads=arch.heads, vocab=arch.vocab,
                        intermediate=arch.intermediate, max_positions=4096, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, pad_token_id=None)
    config = llava_config(vision, text, image_token_id=32000, vision_feature_layer=-2, projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    return config


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(arch: Arch, run: RunSettings) -> ParamCounts:
    """Exact counts from the architecture built on the meta device, grounded and LoRA-wrapped like the configs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from models.backbones import add_grounding
    from models.grounding import GroundingConfig

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_1_5_config(arch))
    inner = model.model
    counts = {
        "base_total": _numel(model), "vision": _numel(inner.vision_tower),
        "projector": _numel(inner.multi_modal_projector), "language": _numel(inner.language_model),
        "lm_head": _numel(model.lm_head),
        "largest_decoder_layer": max(_numel(layer) for layer in inner.language_model.layers),
    }
    add_grounding(model, GroundingConfig(layers=list(run.grounded_layers), score="similarity", feature="value"))
    gates = _numel(model) - counts["base_total"]
    inner.vision_tower.requires_grad_(False)
    lora_config = LoraConfig(
        r=run.lora_r, lora_alpha=2 * run.lora_r, lora_dropout=run.lora_dropout, target_modules=run.lora_targets,
        modules_to_save=["grounding_gate", *run.modules_to_save],
    )
    with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora_config)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return ParamCounts(gates=gates, lora=lora, **counts)


def model_state_bytes(strategy: Strategy, resident: int, trainable: int, lora: bool, gpus: int) -> dict[str, float]:
    """Weights / gradients / optimizer states per GPU, and CPU memory for the whole node, in bytes.

    DeepSpeed (bf16): 2 B per parameter (all cast to bf16 by the engine), gradients 2 B (bf16) + 4 B (fp32
    partition) and AdamW 12 B (fp32 master + 2 moments) per trainable parameter, divided by ``gpus`` where sharded.
    DDP: the model as the configs load it (bf16; peft upcasts LoRA adapters to fp32), .grad plus DDP's reducer
    buckets (2 copies), torch AdamW's 2 moments in the parameter's dtype (no master copy).
    """
    frozen = resident - trainable
    out = {"weights": 0.0, "grads": 0.0, "optimizer": 0.0, "cpu": 0.0}
    if strategy.stage == 0:
        t_bytes = FP32 if lora else BF16
        out.update(weights=BF16 * frozen + t_bytes * trainable, grads=2 * t_bytes * trainable,
                   optimizer=2 * t_bytes * trainable)
        return out
    sharded_states = ADAMW_MASTER_AND_STATES * trainable / gpus
    sharded_grads = ZERO_GRADS * trainable / gpus
    if strategy.stage == 2:
        out["weights"] = BF16 * resident
    else:
        # own shard + gathered working set (<= stage3_max_live_parameters, never more than the model)
        shard = 0.0 if strategy.offload_params else BF16 * resident / gpus
        out["weights"] = shard + BF16 * min(MAX_LIVE_PARAMETERS, resident)
        if strategy.offload_params:
            out["cpu"] += BF16 * resident
    if strategy.offload_optimizer:
        # the fp32 gradient partition and the AdamW states live in (pinned) CPU memory; the node holds all shards
        out["cpu"] += (FP32 + ADAMW_MASTER_AND_STATES) * trainable
        out["grads"] = BF16 * trainable / gpus
    else:
        out.update(grads=sharded_grads, optimizer=sharded_states)
    return out


def layer_bytes_per_token(h: int, inter: int, lora_r: int | None, lora_dropout: float) -> int:
    """Bytes one Llama decoder layer holds per token between its (re)computed forward and its backward.

    RMSNorm x2: fp32 upcast input (4h) + normalised bf16 before and after the weight (2h + 2h): 16h; attention
    (sdpa, flash/efficient: no T^2): rotated q, k, v and the output (8h) + o_proj's contiguous input (2h);
    SwiGLU MLP: gate, silu(gate), up, product (8I). Saved total 26h + 8I; backward transients: incoming and
    outgoing hidden-state gradients (4h) and two I-wide gradients (4I). LoRA (dropout > 0) per target: the
    dropped input copy (2 B) + the dropout mask (1 B, bool on CUDA) per input element + A's output (2r).
    """
    base = 16 * h + 8 * h + 2 * h + 8 * inter + 4 * h + 4 * inter
    if lora_r is None:
        return base
    inputs = 6 * h + inter  # q, k, v, o, gate, up read h-wide inputs; down reads I-wide
    per_input = (BF16 + 1) if lora_dropout > 0 else 0
    return base + per_input * inputs + 7 * BF16 * lora_r


def grounded_layer_extra_bytes(arch: Arch, seq: int, math_attention: bool) -> int:
    """Extra bytes per sample of one grounded layer's working set (score=similarity, feature=value).

    Similarity: fp32 query features and their normalised copy (8·T·h), the value copy (2·T·h), normalised image
    features (8·P·h), the (T, P) cosine and its masked copy in fp32 (8·T·P). Bias: (T, S) fp32 product, bf16 cast
    and the combined causal+bias mask (8·T·S; broadcast over heads). Attention with a bias that needs a gradient:
    ``math`` = PyTorch's unfused path, which upcasts bf16 to fp32: q, k, v copies (12·T·h) and the (H, T, S)
    probabilities, their gradient and the score gradient (12·H·T·S); ``efficient`` = the memory-efficient
    kernel's full-head bias gradient in bf16 (2·H·T·S).
    """
    h, p, t, s = arch.hidden, IMAGE_TOKENS, seq, seq
    similarity = 8 * t * h + 2 * t * h + 8 * p * h + 8 * t * p
    bias = 8 * t * s
    attention = (12 * t * h + 12 * arch.heads * t * s) if math_attention else 2 * arch.heads * t * s
    return similarity + bias + attention


def activation_bytes(arch: Arch, run: RunSettings, lora: bool, seq: int, math_attention: bool) -> dict[str, float]:
    """Activation bytes per sample (linear in the batch): checkpoints live together, then the larger of two peaks.

    Peaks: the loss (bf16 logits 2V + fp32 upcast 4V + fp32 log-softmax 4V in the forward, and log-softmax +
    its gradient + the fp32 logits gradient 12V in the backward: 12·T·V) and, later in the backward, the
    recompute of one grounded decoder layer. They are never live at the same time: the loss's tensors are
    freed before the first decoder layer is recomputed.
    """
    h = arch.hidden
    neg = run.negative_fraction  # negatives: a second forward (logits_to_keep=1) whose graph lives until backward
    passes = 1.0 + neg
    checkpoints = passes * arch.layers * seq * h * BF16  # each decoder layer's input hidden states
    vision = passes * (VISION_TOKENS * 1024 * BF16 + IMAGE_TOKENS * (1024 * BF16 + 2 * h * BF16))  # tower out + projector
    layer = seq * layer_bytes_per_token(h, arch.intermediate, run.lora_r if lora else None, run.lora_dropout)
    grounded = grounded_layer_extra_bytes(arch, seq, math_attention)
    loss = 12 * seq * arch.vocab
    peak = max(loss, layer + grounded)
    return {"checkpoints": checkpoints, "vision": vision, "layer": layer, "grounded": grounded, "loss": loss,
            "total": checkpoints + vision + peak}


def max_batch(usable: float, states: float, per_sample: float) -> int:
    return max(0, math.floor((usable - states) / per_sample))


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def build_rows(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    seq = IMAGE_TOKENS + args.text_tokens
    math_attention = args.grounded_attention == "math"
    usable = {cap: cap * GIB * (1 - args.headroom) for cap in (40, 80)}
    params_lines = [
        (
            "| model | total params | vision (frozen) | projector | language model + lm_head | LoRA r=128 | gates | "
            "trainable, LoRA | trainable, full FT | bf16 weights |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    act_lines = [
        (
            "| model | method | checkpoints | vision + projector | layer recompute | grounded-layer extra | loss peak | "
            f"per sample (T = {seq}) | micro-batch | activations |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    table = [
        (
            "| model | method | strategy | micro-batch x accum | weights | grads | optimizer | activations | total GiB | "
            "fits 40 GB | fits 80 GB | max micro-batch 40 / 80 | CPU GiB (node) |"
        ),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: | ---: | ---: |",
    ]
    for arch in ARCHS:
        run = read_run_settings(ROOT / arch.config, args.gpus)
        counts = count_params(arch, run)
        params_lines.append(
            f"| {arch.name} | {counts.base_total / 1e9:.3f} B | {counts.vision / 1e6:.1f} M | "
            f"{counts.projector / 1e6:.1f} M | {(counts.language + counts.lm_head) / 1e9:.3f} B | "
            f"{counts.lora / 1e6:.1f} M | {counts.gates} | {counts.lora_trainable / 1e6:.1f} M | "
            f"{counts.full_trainable / 1e9:.3f} B | {gib(BF16 * counts.base_total)} GiB |"
        )
        for method, lora in (("LoRA", True), ("full FT", False)):
            resident = counts.lora_resident if lora else counts.base_total + counts.gates
            trainable = counts.lora_trainable if lora else counts.full_trainable
            act = activation_bytes(arch, run, lora, seq, math_attention)
            batch = run.per_gpu_batch
            act_lines.append(
                f"| {arch.name} | {method} | {act['checkpoints'] / 2**20:.0f} MiB | {act['vision'] / 2**20:.0f} MiB | "
                f"{act['layer'] / 2**20:.0f} MiB | {act['grounded'] / 2**20:.0f} MiB | {act['loss'] / 2**20:.0f} MiB | "
                f"{act['total'] / 2**20:.0f} MiB | {batch} | {gib(batch * act['total'])} GiB |"
            )
            for strategy in STRATEGIES:
                states = model_state_bytes(strategy, resident, trainable, lora, args.gpus)
                on_gpu = states["weights"] + states["grads"] + states["optimizer"]
                total = on_gpu + batch * act["total"]
                fits = {cap: "yes" if total <= usable[cap] else "no" for cap in usable}
                best = " / ".join(str(max_batch(usable[cap], on_gpu, act["total"])) for cap in usable)
                cpu = gib(states["cpu"]) if states["cpu"] else "-"
                table.append(
                    f"| {arch.name} | {method} | {strategy.name} | {batch} x {run.accumulation} | "
                    f"{gib(states['weights'])} | {gib(states['grads'])} | {gib(states['optimizer'])} | "
                    f"{gib(batch * act['total'])} | {gib(total)} | {fits[40]} | {fits[80]} | {best} | {cpu} |"
                )
    return params_lines + [""] + act_lines, table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (the configs' global batch is divided by it)")
    parser.add_argument("--headroom", type=float, default=0.10,
                        help="share of each GPU kept free for the CUDA context, allocator fragmentation and\n"
                             "communication buckets (default 0.10: 36 of 40 GiB, 72 of 80 GiB usable)")
    parser.add_argument("--text-tokens", type=int, default=44,
                        help="prompt + caption tokens per row after padding to the batch's longest (default 44:\n"
                             "23 prompt tokens + ~21 for a COCO caption with EOS), added to the 576 image tokens")
    parser.add_argument("--grounded-attention", choices=("math", "efficient"), default="math",
                        help="attention path of the grounded layers in training: 'math' (unfused, fp32 T x S per\n"
                             "head; the default, an upper bound) or 'efficient' (fused kernel with a bias gradient)")
    args = parser.parse_args(argv)
    if args.gpus < 1 or not 0 <= args.headroom < 1 or args.text_tokens < 1:
        parser.error("--gpus >= 1, 0 <= --headroom < 1 and --text-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    details, table = build_rows(args)
    print(f"<!-- python benchmarks/memory_plan.py --gpus {args.gpus} --headroom {args.headroom} "
          f"--text-tokens {args.text_tokens} --grounded-attention {args.grounded_attention} -->")
    print("\n".join(details))
    print()
    print("\n".join(table))


if __name__ == "__main__":
    main()
