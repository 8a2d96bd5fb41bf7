"""GroundedVLM: the LightningModule that trains and validates a grounded VLM.

Loss (DESIGN.md section 4): ``L = L_LM(positive) + lambda_grounding * L_grounding + lambda_contrastive *
L_contrastive``. Negative captions feed only the grounding and contrastive terms. Validation generates
captions (CHAIR) and yes/no answers (POPE), tracks how often the data's biased companions are named where
absent, and writes ``report.json`` / ``report.md`` into the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from models.backbones import add_grounding, save_grounding
from models.grounding import GroundingConfig, GroundingRecorder

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class ObjectiveConfig:
    """Weights and kinds of the grounding terms.

    Args:
        lambda_grounding: weight of ``L_grounding``.
        lambda_contrastive: weight of ``L_contrastive``.
        grounding_loss: ``direct`` (-mean G over caption tokens), ``object`` (-mean G over object words) or
            ``bce`` (BCE of the gate against labels: 1 on grounded object words, 0 on hallucinated ones).
        margin: of ``relu(margin - (mean_obj G(pos) - mean_obj G(neg)))``.
    """

    lambda_grounding: float = 0.1
    lambda_contrastive: float = 0.1
    grounding_loss: Literal["direct", "object", "bce"] = "bce"
    margin: float = 0.2

    def __post_init__(self) -> None:
        if self.grounding_loss not in ("direct", "object", "bce"):
            raise ValueError(f"ObjectiveConfig.grounding_loss must be direct, object or bce, got {self.grounding_loss!r}")
        for name in ("lambda_grounding", "lambda_contrastive", "margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"ObjectiveConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LoraSettings:
    """peft LoRA on the language model; grounding gates are always trained and saved with it.

    ``target_modules``: module-name suffixes (peft matches them anywhere, vision tower included) or one regular
    expression that must match a module's full name, e.g. ``.*language_model.*\\.(q_proj|v_proj)``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class GenerationSettings:
    caption_max_new_tokens: int = 32
    answer_max_new_tokens: int = 4
    num_beams: int = 1


def nanmean_layers(recorder: GroundingRecorder, logits: bool = False) -> Tensor:
    """(B, T) mean over grounded layers of the recorded scores (or gate logits) of one forward."""
    read = recorder.forward_logits if logits else recorder.forward_scores
    return torch.stack([read(layer) for layer in recorder.layers]).mean(0)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` (and values defined); 0 with a zero gradient if none."""
    mask = mask & ~values.isnan()
    if not bool(mask.any()):
        return values.nan_to_num(0.0).sum() * 0.0
    return values[mask].mean()


def grounding_loss(kind: str, scores: Tensor, logits: Tensor, labels: Tensor, object_labels: Tensor,
                   neg_logits: Tensor | None, neg_labels: Tensor | None) -> Tensor:
    """L_grounding of a batch: scores/logits (B, T) of the positive pass, labels -100 outside the caption."""
    if kind == "direct":
        return -masked_mean(scores, labels != IGNORE)
    if kind == "object":
        return -masked_mean(scores, object_labels == 1)
    values, targets = [logits[object_labels == 1]], [torch.ones_like(logits[object_labels == 1])]
    if neg_logits is not None and neg_labels is not None:
        keep = neg_labels != IGNORE
        values.append(neg_logits[keep])
        targets.append(neg_labels[keep].to(neg_logits.dtype))
    z, y = torch.cat(values), torch.cat(targets)
    defined = ~z.isnan()
    if not bool(defined.any()):
        return logits.nan_to_num(0.0).sum() * 0.0
    return F.binary_cross_entropy_with_logits(z[defined], y[defined])


def contrastive_loss(pos_scores: Tensor, object_labels: Tensor, neg_scores: Tensor, neg_labels: Tensor,
                     neg_index: Tensor, margin: float) -> Tensor:
    """mean over pairs of relu(margin - (mean G over positive object words - mean G over hallucinated words))."""
    terms = []
    for pair, row in enumerate(neg_index.tolist()):
        pos = pos_scores[row][(object_labels[row] == 1) & ~pos_scores[row].isnan()]
        neg = neg_scores[pair][(neg_labels[pair] == 0) & ~neg_scores[pair].isnan()]
        if pos.numel() and neg.numel():
            terms.append(F.relu(margin - (pos.mean() - neg.mean())))
    if not terms:
        return pos_scores.nan_to_num(0.0).sum() * 0.0
    return torch.stack(terms).mean()


def lm_loss(logits: Tensor, labels: Tensor, reduction: str, shift: bool = True) -> Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) labels (-100 = ignored).

    ``shift``: position t predicts label t + 1 (decoder-only); False for an encoder-decoder's decoder, whose
    labels are already aligned with its logits. ``token``: mean over every target token of the batch (Hugging
    Face's loss). ``sample``: mean over rows of each row's token mean, so a one-word answer weighs as much as a
    long caption; rows without targets drop out.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    logits = logits.float()
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    mask = labels != IGNORE
    if reduction == "token":
        return tokens.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(1)  # (B,)
    rows = counts > 0
    if not bool(rows.any()):
        return tokens.sum() * 0.0
    return (tokens.sum(1)[rows] / counts[rows]).mean()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def check_backbone(backbone: str) -> None:
    """A local path must exist; a hub id is ``name`` or ``org/name`` (resolved later by ``from_pretrained``)."""
    path = Path(backbone).expanduser()
    looks_local = path.is_absolute() or backbone.startswith((".", "~")) or backbone.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"model.backbone: no such directory {path} (a hub id looks like llava-hf/llava-1.5-7b-hf; a local "
            "directory must hold config.json and the weights from save_pretrained)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.backbone: {path} has no config.json (not a save_pretrained directory)")


def check_quantization(quantization: str, lora: LoraSettings | None) -> None:
    if quantization not in ("none", "8bit", "4bit"):
        raise ValueError(f"model.quantization must be none, 8bit or 4bit, got {quantization!r}")
    if quantization == "none":
        return
    if lora is None:
        raise ValueError(f"model.quantization {quantization} needs model.lora: quantized weights cannot be fine-tuned")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.quantization {quantization} needs bitsandbytes: pip install bitsandbytes")


class GroundedVLM(LightningModule):
    """Any registry backbone (``models.BACKBONES``), grounded or plain, optionally with LoRA.

    Args:
        backbone: hub id or local directory for ``from_pretrained`` (model and processor).
        grounding: ``GroundingConfig``; ``enabled: false`` keeps the identical code path with inert gates.
        objective: the loss weights; both lambdas must be 0 when grounding is disabled.
        lora: peft LoRA settings, or null for full fine-tuning. The end of a LoRA run writes the adapters +
            grounding gates with peft's ``save_pretrained`` into ``RUN_DIR/adapter``. Wherever parameters are
            frozen (LoRA, ``freeze_vision``, LLaVA's unused vision post-layernorm) checkpoints hold only the
            trainable ones; the frozen ones are reloaded from ``backbone``.
        adapter: a peft adapter directory (a run's ``adapter/``) loaded onto the backbone, trainable, instead of
            new LoRA weights: ``validate --model.init_args.adapter RUN_DIR/adapter`` evaluates a trained run.
        freeze_vision: freeze the vision tower (and Q-Former).
        lm_loss_reduction: ``token`` (mean over all target tokens, as Hugging Face and LLaVA) or ``sample``
            (mean of each row's token mean: short answers weigh as much as captions).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        lr_schedule: after warm-up, ``constant``, or ``linear``/``cosine`` decay to 0 at the trainer's last step.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for loading the backbone.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``); it
            applies to the vision tower / Q-Former, the language model runs the grounded sdpa layer.
        quantization: ``8bit`` or ``4bit`` (NF4, QLoRA) loading through bitsandbytes; needs LoRA, CUDA and a
            non-DeepSpeed strategy (checked before any weight is loaded).
        gradient_checkpointing: non-reentrant activation checkpointing of the language model.
        generation: lengths and beams of validation generation.
        chair_mode: ``reference`` or ``lemma`` (see docs/metrics.md).
        report_examples: captions shown in the report.
        trust_remote_code: passed to ``from_pretrained``; off unless you set it.
    """

    def __init__(
        self,
        backbone: str,
        grounding: GroundingConfig | None = None,
        objective: ObjectiveConfig | None = None,
        lora: LoraSettings | None = None,
        adapter: str | None = None,
        freeze_vision: bool = False,
        lm_loss_reduction: Literal["token", "sample"] = "token",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "linear",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        quantization: Literal["none", "8bit", "4bit"] = "none",
        gradient_checkpointing: bool = False,
        generation: GenerationSettings | None = None,
        chair_mode: Literal["reference", "lemma"] = "reference",
        report_examples: int = 6,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.grounding = grounding if grounding is not None else GroundingConfig(enabled=False)
        self.objective = objective if objective is not None else ObjectiveConfig()
        if not self.grounding.enabled and (self.objective.lambda_grounding or self.objective.lambda_contrastive):
            raise ValueError(
                "model.grounding.enabled is false but model.objective.lambda_grounding/lambda_contrastive are "
                "non-zero: the grounding terms would be computed from inert gates; set both lambdas to 0"
            )
        self.backbone, self.lora, self.freeze_vision = backbone, lora, freeze_vision
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"model.adapter: {adapter} holds no adapter_config.json (a run's adapter/ directory)")
        self.adapter = adapter
        self.peft = lora is not None or adapter is not None
        self.strict_loading = not self.peft  # peft checkpoints hold the trainable parameters only
        if lm_loss_reduction not in ("token", "sample"):
            raise ValueError(f"model.lm_loss_reduction must be token or sample, got {lm_loss_reduction!r}")
        self.lm_loss_reduction = lm_loss_reduction
        if lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"model.lr_schedule must be constant, linear or cosine, got {lr_schedule!r}")
        self.lr, self.weight_decay, self.warmup_steps, self.lr_schedule = lr, weight_decay, warmup_steps, lr_schedule
        self.dtype_name, self.gradient_checkpointing = dtype, gradient_checkpointing
        self.attn_implementation, self.quantization = attn_implementation, quantization
        check_quantization(quantization, lora)
        self.generation = generation or GenerationSettings()
        self.chair_mode, self.report_examples, self.trust_remote_code = chair_mode, report_examples, trust_remote_code
        # plain values only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",  # LightningCLI --ckpt_path
                "backbone": backbone,
                "grounding": asdict(self.grounding),
                "objective": asdict(self.objective),
                "lora": asdict(lora) if lora else None,
                "adapter": adapter,
                "freeze_vision": freeze_vision,
                "lm_loss_reduction": lm_loss_reduction,
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "lr_schedule": lr_schedule,
                "dtype": dtype,
                "attn_implementation": attn_implementation,
                "quantization": quantization,
                "gradient_checkpointing": gradient_checkpointing,
                "generation": asdict(self.generation),
                "chair_mode": chair_mode,
            }
        )
        self.model: torch.nn.Module | None = None
        self.encoder_decoder = False  # the language model is an encoder-decoder (Flan-T5); set when loading
        self._hf_deepspeed_config = None  # ZeRO-3: transformers reads it (weakly referenced) while loading and generating
        self.tokenizer = None
        self._examples: list[dict] = []
        self.last_report: dict | None = None

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Load the backbone, add grounding and LoRA (under ZeRO-3 ``setup`` has done it: see ``load_model``)."""
        if self.model is None:
            self.load_model()

    def zero3_config(self) -> dict | None:
        """The DeepSpeed config (with the trainer's precision) when the trainer shards parameters with ZeRO-3."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not getattr(strategy, "zero_stage_3", False):
            return None
        config = copy.deepcopy(strategy.config)
        precision = str(self._trainer.precision)
        if precision.startswith("bf16"):
            config["bf16"] = {"enabled": True}
        elif precision.startswith("16"):
            config["fp16"] = {"enabled": True}
        return config

    def load_model(self, zero3_config: dict | None = None) -> None:
        """``from_pretrained`` + grounding + LoRA (or ``adapter``) into ``self.model``, and the tokenizer.

        With ``zero3_config`` the weights are partitioned across ranks as they load (transformers' DeepSpeed
        integration, kept active so that ``generate`` steps all ranks together), while the small new parameters
        (gates, LoRA) are created whole and initialised normally; DeepSpeed partitions them when the engine
        starts. This is why ZeRO-3 runs load in ``setup``: Lightning's ``configure_model`` runs inside
        ``deepspeed.zero.Init``, where from_pretrained cannot fill partitioned weights and peft's zero-init of
        LoRA B is a no-op.
        """
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        check_backbone(self.backbone)
        if zero3_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(zero3_config)  # transformers holds only a weak reference
        kwargs = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        if self.quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.quantization == "8bit", load_in_4bit=self.quantization == "4bit",
                bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, self.dtype_name),
            )
            kwargs["device_map"] = {"": torch.device("cuda", torch.cuda.current_device())}
        model = AutoModelForImageTextToText.from_pretrained(
            self.backbone, dtype=getattr(torch, self.dtype_name), trust_remote_code=self.trust_remote_code, **kwargs
        )
        add_grounding(model, self.grounding)
        if getattr(model.config, "vision_feature_layer", None) is not None:
            # LLaVA-style models read the vision tower's hidden states, never its pooled output: post_layernorm
            # gets no gradient, which DDP rejects ("parameters that were not used in producing the loss").
            for name, param in model.named_parameters():
                if "vision_tower" in name and "post_layernorm" in name:
                    param.requires_grad_(False)
        if self.freeze_vision:
            for name, module in model.named_children():
                if name in ("vision_tower", "vision_model", "qformer") or (
                    name == "model" and hasattr(module, "vision_tower")
                ):
                    target = module.vision_tower if name == "model" else module
                    target.requires_grad_(False)
        if self.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter, is_trainable=True)
        elif self.lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                    target_modules=self.lora.target_modules,
                    modules_to_save=["grounding_gate", *self.lora.modules_to_save],
                ),
            )
        if self.gradient_checkpointing:
            base = model.get_base_model() if self.peft else model
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.model = model
        self.encoder_decoder = bool(getattr(self._base().config.get_text_config(), "is_encoder_decoder", False))
        self.strict_loading = all(p.requires_grad for p in model.parameters())  # frozen ones reload from backbone
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbone, trust_remote_code=self.trust_remote_code)

    def _base(self) -> torch.nn.Module:
        return self.model.get_base_model() if self.peft else self.model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Where some parameters are frozen keep only the trainable ones: the rest reload from ``backbone``."""
        if not self.strict_loading and "state_dict" in checkpoint:
            trainable = self._trainable_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is not strict where checkpoints hold trainable parameters only: none of those may be missing."""
        if not self.strict_loading and "state_dict" in checkpoint:
            trainable = self._trainable_names()
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(
                    f"the checkpoint lacks {len(missing)} of this model's {len(trainable)} trained parameters "
                    f"(e.g. {missing[:3]}): it was written by a run with other LoRA, grounding or freezing settings"
                )

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------- training
    def _model_inputs(self, batch: dict) -> dict:
        skip = {"labels", "object_labels", "image_ids", "question_ids", "targets"}
        return {k: v for k, v in batch.items() if k not in skip and not k.startswith("neg_")}

    def _negative_inputs(self, batch: dict) -> dict:
        """Inputs of the negative captions: the positive rows' at ``neg_index``, replaced by every ``neg_*`` input."""
        index = batch["neg_index"]
        inputs = {k: v[index] for k, v in self._model_inputs(batch).items()}
        inputs.update({k[4:]: v for k, v in batch.items() if k.startswith("neg_") and k not in ("neg_index", "neg_object_labels")})
        if not self.encoder_decoder:
            inputs["logits_to_keep"] = 1  # only the grounding scores are used
        return inputs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.encoder_decoder and "decoder_input_ids" not in batch:
            raise ValueError(
                f"model.backbone {self.backbone} is an encoder-decoder (Flan-T5) but the batch has no decoder inputs: "
                "data.init_args.processor must name the backbone's hub id or a directory that also holds its "
                "config.json, so the collator builds the encoder-decoder layout"
            )
        grounded = self.grounding.enabled
        rec = GroundingRecorder() if grounded else None
        extra = {"grounding_scores": rec} if grounded else {}
        if self.lm_loss_reduction == "token":
            out = self.model(**self._model_inputs(batch), labels=batch["labels"], **extra)
            loss = out.loss
        else:
            out = self.model(**self._model_inputs(batch), **extra)
            loss = lm_loss(out.logits, batch["labels"], self.lm_loss_reduction, shift=not self.encoder_decoder)
        lm = loss.detach()
        logs = {"train/lm": lm}
        lam_g, lam_c = self.objective.lambda_grounding, self.objective.lambda_contrastive
        if grounded and (lam_g or lam_c):
            scores, logits = nanmean_layers(rec), nanmean_layers(rec, logits=True)
            neg_scores = neg_logits = None
            needs_negatives = lam_c > 0 or self.objective.grounding_loss == "bce"
            if needs_negatives and "neg_index" in batch:
                neg_rec = GroundingRecorder()
                self.model(**self._negative_inputs(batch), grounding_scores=neg_rec)
                neg_scores, neg_logits = nanmean_layers(neg_rec), nanmean_layers(neg_rec, logits=True)
            l_g = grounding_loss(self.objective.grounding_loss, scores, logits, batch["labels"],
                                 batch["object_labels"], neg_logits, batch.get("neg_object_labels"))
            loss = loss + lam_g * l_g
            logs["train/grounding"] = l_g.detach()
            if neg_scores is not None:
                l_c = contrastive_loss(scores, batch["object_labels"], neg_scores, batch["neg_object_labels"],
                                       batch["neg_index"], self.objective.margin)
                loss = loss + lam_c * l_c
                logs["train/contrastive"] = l_c.detach()
            logs["train/score_objects"] = masked_mean(scores.detach(), batch["object_labels"] == 1)
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 0
        factor = functools.partial(lr_factor, warmup=max(self.warmup_steps, 0), total=total, schedule=self.lr_schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- validation
    def setup(self, stage: str) -> None:
        from metrics import CHAIR, POPE

        check_backbone(self.backbone)  # after prepare_data (which may build the demo backbone), before any weight loads
        zero3 = self.zero3_config()
        if zero3 is not None and self.model is None:
            self.load_model(zero3)
        if self.trainer is not None and self.quantization != "none":
            strategy = type(self.trainer.strategy).__name__
            if "DeepSpeed" in strategy or "FSDP" in strategy:
                raise ValueError(
                    f"model.quantization {self.quantization} cannot be combined with {strategy}: quantized weights "
                    "are not sharded; use trainer.strategy ddp (LoRA adapters are small) or quantization none"
                )
            if self.trainer.accelerator.__class__.__name__ != "CUDAAccelerator":
                raise ValueError(f"model.quantization {self.quantization} needs trainer.accelerator gpu (bitsandbytes)")

        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "chair_ground_truth"):
            raise ValueError("GroundedVLM validation needs a datamodule with chair_ground_truth()")
        if stage in ("fit", "validate", "test"):
            self.chair = CHAIR(datamodule.chair_ground_truth(), mode=self.chair_mode, return_details=True)
            sets = datamodule.question_sets("test" if stage == "test" else "val") if hasattr(datamodule, "question_sets") else []
            self.pope = torch.nn.ModuleDict({name: POPE() for name in sets})  # question loader i + 1 = set i
            self.probes = datamodule.hallucination_probes()
        self._predictions: list[dict] = []

    def _generate(self, batch: dict, max_new_tokens: int) -> list[str]:
        inputs = self._model_inputs(batch)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=self.generation.num_beams,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        # decoder-only generate returns prompt + new tokens; encoder-decoder returns the decoder's tokens only
        new = out if self.encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True)]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            captions = self._generate(batch, self.generation.caption_max_new_tokens)
            self.chair.update(captions, batch["image_ids"])
            room = self.report_examples - len(self._examples)
            self._examples += [{"image_id": i, "caption": c} for i, c in zip(batch["image_ids"], captions)][:max(room, 0)]
        else:
            answers = self._generate(batch, self.generation.answer_max_new_tokens)
            list(self.pope.values())[dataloader_idx - 1].update(answers, batch["targets"])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        captions = self._generate(batch, self.generation.caption_max_new_tokens)
        rows = [{"image_id": i, "caption": c} for i, c in zip(batch["image_ids"], captions)]
        self._predictions += rows
        return rows

    def on_predict_epoch_end(self) -> None:
        """``predictions.jsonl`` (one per process under DDP) in the run directory, scorable with ``score chair``."""
        run_dir = self.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.jsonl" if self.trainer.world_size == 1 else f"predictions.rank{self.global_rank}.jsonl"
        with open(run_dir / name, "w") as handle:
            for row in self._predictions:
                handle.write(json.dumps(row) + "\n")
        log.info("wrote %d captions to %s", len(self._predictions), run_dir / name)
        print(f"predictions: {run_dir / name}")
        self._predictions = []

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def _evaluation_end(self, stage: str) -> None:
        chair = {k: float(v) for k, v in self.chair.compute().items()}
        details = self.chair.details()
        pope = {name: {k: float(v) for k, v in metric.compute().items()} for name, metric in self.pope.items()
                if int(metric.tp + metric.fp + metric.tn + metric.fn)}
        probes = probe_rates(details, self.chair.ground_truth, self.probes)
        metrics = {f"{stage}/{k}": v for k, v in chair.items()}
        for name, values in pope.items():  # one set named "pope" (the default questions file) logs as val/pope_*
            prefix = f"{stage}/pope_" if name == "pope" else f"{stage}/pope_{name}_"
            metrics.update({prefix + k: v for k, v in values.items() if k in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
        for name, probe in probes.items():
            metrics[f"{stage}/halluc_{name}"] = probe["rate_absent_with_anchor"]
        self.log_dict(metrics, prog_bar=False, sync_dist=False, rank_zero_only=True)
        self.chair.reset()
        for metric in self.pope.values():
            metric.reset()
        if self.trainer.sanity_checking:  # (validation only) no report from the sanity check
            self._examples = []
            return
        by_id = {d["image_id"]: d for d in details}
        examples = [{**e, **{k: by_id.get(e["image_id"], {}).get(k, []) for k in ("mentioned_objects", "hallucinated_objects")},
                     "gt_objects": sorted(self.chair.ground_truth.get(e["image_id"], []))} for e in self._examples]
        self._examples = []
        self.last_report = {
            "stage": stage,
            "epoch": self.current_epoch,
            "step": self.global_step,
            "chair": chair,
            "pope": pope,
            "probes": probes,
            "settings": self._settings(),
            "examples": examples,
        }
        run_dir = self.run_dir()  # trainer.log_dir is a broadcast under DDP: every rank must call it
        if self.trainer.is_global_zero:
            write_report(self.last_report, run_dir)

    def run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def _settings(self) -> dict:
        return {
            "backbone": self.backbone,
            "grounding": asdict(self.grounding),
            "objective": asdict(self.objective),
            "lora": asdict(self.lora) if self.lora else None,
            "freeze_vision": self.freeze_vision,
            "lm_loss_reduction": self.lm_loss_reduction,
            "lr": self.lr,
            "chair_mode": self.chair_mode,
        }

    def on_train_end(self) -> None:
        run_dir = self.run_dir()  # a broadcast under DDP: on every rank
        self.export(run_dir, self.trainer.is_global_zero)

    def export(self, run_dir: Path, writer: bool = True) -> None:
        """``grounding/`` and, with peft, ``adapter/`` (safetensors) in ``run_dir``, written by the ``writer`` rank.

        Every rank must call it: under ZeRO-3 the trainable parameters are gathered (a collective) first.
        """
        with gathered([p for p in self.model.parameters() if p.requires_grad]):
            if not writer:
                return
            if self.grounding.enabled:
                save_grounding(self._base(), run_dir / "grounding")
            if self.peft:  # adapters + modules_to_save (grounding gates, projector)
                self.model.save_pretrained(run_dir / "adapter")


def gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full values of ZeRO-3-partitioned ``params`` inside the context (on every rank); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


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


def write_report(report: dict, run_dir: Path) -> None:
    """``report.json`` and a readable ``report.md`` (hallucinated objects marked) in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(report_markdown(report))


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


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
    if report["examples"]:
        lines += ["Examples (hallucinated objects in **bold**):", ""]
        for e in report["examples"]:
            hallucinated = ", ".join(f"**{o}**" for o in e["hallucinated_objects"]) or "none"
            lines.append(f"- image {e['image_id']}: \"{e['caption']}\" (gt: {', '.join(e['gt_objects'])}; hallucinated: {hallucinated})")
    return "\n".join(lines) + "\n"
