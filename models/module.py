"""GroundedVLM: the LightningModule that trains and validates a grounded VLM.

Loss: :mod:`models.objective`, the training step: :mod:`models.training`. Loading (``from_pretrained``,
grounding, LoRA, freezing, ZeRO-3): :mod:`models.loading`. Validation generates captions (CHAIR) and yes/no answers (POPE), tracks how often the
data's biased companions are named where absent, and writes ``report.json`` / ``report.md``
(:mod:`models.validation`, :mod:`models.report`) into the run directory.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from models.backbones import save_grounding
from models.decoding import DecodingSettings, decode
from models.diagnostics import MentionScores
from models.grounding import GroundingConfig
from models.loading import (
    BackboneSettings,
    LoraSettings,
    check_backbone,
    check_quantization,
    check_quantized_trainer,
    gathered,
    hold_zero3,
    load_backbone,
    trainable_names,
    zero3_config,
)
from models.objective import ObjectiveConfig, check_objective
from models.presence import PresenceHead, grounded_feature_dim, presence_dim
from models.training import lr_factor, model_inputs, training_loss
from models.validation import answer_update, caption_update, evaluation_end, evaluation_spec, set_up_metrics, write_predictions
from models.word_grounding import ObjectWords, object_words, set_object_words

@dataclass
class GenerationSettings(DecodingSettings):
    """How validation, test and predict decode: lengths, the method (``models.decoding.METHODS``: greedy, beam,
    vcd, pai, opera, dola, eah, aai, deco, vaf, m3id, grounded) and one settings block per method."""

    caption_max_new_tokens: int = 32
    answer_max_new_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("caption_max_new_tokens", "answer_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"generation.{name} must be a positive int, got {value!r}")


class GroundedVLM(LightningModule):
    """Any registry backbone (``models.BACKBONES``), grounded or plain, optionally with LoRA.

    Args:
        backbone: hub id or local directory for ``from_pretrained`` (model and processor); the CLI gives
            ``data.processor`` the same value. Left out where ``data.demo_backbone`` builds it: the CLI then sets
            the demo backbone's cache directory (``lightning_app.run_layout``).
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
        generation: how validation/test/predict decode (``GenerationSettings``: lengths, ``method`` and its block).
        chair_mode: ``reference`` or ``lemma`` (see docs/metrics.md).
        report_examples: captions shown in the report.
        trust_remote_code: passed to ``from_pretrained``; off unless you set it.
    """

    def __init__(
        self,
        backbone: str | None = None,
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
        if not backbone:
            raise ValueError("model.backbone is required: a hub id (llava-hf/llava-1.5-7b-hf) or a save_pretrained "
                             "directory; the demo configs leave it to data.demo_backbone")
        self.grounding = grounding if grounding is not None else GroundingConfig(enabled=False)
        self.objective = objective if objective is not None else ObjectiveConfig()
        check_objective(self.grounding, self.objective)
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
        self.categories: tuple[str, ...] = ()  # the dataset's object categories (EvaluationSpec), for word scores
        self._object_words: ObjectWords | None = None
        self.presence_head: PresenceHead | None = None  # objective.lambda_presence: a training-only control head
        self._examples: list[dict] = []
        self.mention_scores: MentionScores | None = None
        self.decoding_time: dict[str, float] = {}  # this process's decoding seconds (models.validation)
        self.last_report: dict | None = None

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Load the backbone, add grounding and LoRA (under ZeRO-3 ``setup`` has done it: see ``load_model``)."""
        if self.model is None:
            self.load_model()
        if self.objective.lambda_presence and self.presence_head is None:
            if not self.categories:
                raise ValueError("model.objective.lambda_presence needs the dataset's object categories: the "
                                 "datamodule's evaluation spec lists none (no instance annotations?)")
            grounded = self.objective.presence_site == "grounded"
            dim = grounded_feature_dim(self._base()) if grounded else presence_dim(self._base())
            self.presence_head = PresenceHead(dim, len(self.categories), self.objective.presence_pool)

    def zero3_config(self) -> dict | None:
        """The DeepSpeed config when the trainer shards parameters with ZeRO-3 (see ``models.loading``)."""
        return zero3_config(self._trainer)

    def backbone_settings(self) -> BackboneSettings:
        return BackboneSettings(
            backbone=self.backbone, grounding=self.grounding, lora=self.lora, adapter=self.adapter,
            freeze_vision=self.freeze_vision, dtype=self.dtype_name, attn_implementation=self.attn_implementation,
            quantization=self.quantization, gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
        )

    def load_model(self, zero3: dict | None = None) -> None:
        """Load the backbone (:func:`models.loading.load_backbone`) into ``self.model`` and ``self.tokenizer``.

        With ``zero3`` (a DeepSpeed config) the weights are partitioned across ranks as they load, and the handle
        that keeps transformers' ZeRO-3 integration active (``generate`` steps all ranks together) is kept here.
        """
        if zero3 is not None:
            self._hf_deepspeed_config = hold_zero3(zero3)
        self.model, self.tokenizer = load_backbone(self.backbone_settings())
        self.encoder_decoder = bool(getattr(self._base().config.get_text_config(), "is_encoder_decoder", False))
        self.strict_loading = all(p.requires_grad for p in self.model.parameters())  # frozen ones reload from backbone

    def _base(self) -> torch.nn.Module:
        return self.model.get_base_model() if self.peft else self.model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Where some parameters are frozen keep only the trainable ones: the rest reload from ``backbone``."""
        if not self.strict_loading and "state_dict" in checkpoint:
            trainable = trainable_names(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is not strict where checkpoints hold trainable parameters only: none of those may be missing."""
        if not self.strict_loading and "state_dict" in checkpoint:
            trainable = trainable_names(self)
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(
                    f"the checkpoint lacks {len(missing)} of this model's {len(trainable)} trained parameters "
                    f"(e.g. {missing[:3]}): it was written by a run with other LoRA, grounding or freezing settings"
                )

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = training_loss(self, batch)  # models.training: the LM loss and every other term
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
        check_backbone(self.backbone)  # after prepare_data (which may build the demo backbone), before any weight loads
        zero3 = self.zero3_config()
        if zero3 is not None and self.model is None:
            self.load_model(zero3)
        check_quantized_trainer(self.quantization, self._trainer)

        if stage in ("fit", "validate", "test"):
            set_up_metrics(self, evaluation_spec(self, stage))  # models.validation
        elif self.grounding.word_score:  # predict: the object-word table still comes from the dataset
            self.categories = tuple(evaluation_spec(self, stage).categories)
        self._predictions: list[dict] = []

    def object_words(self) -> ObjectWords:
        """The object-word table (tokenizer x the dataset's categories), built once and attached to the model."""
        if self._object_words is None:
            if not self.categories:
                raise ValueError("candidate-word scores need the dataset's object categories: the datamodule's "
                                 "evaluation spec lists none (no instance annotations?)")
            self._object_words = object_words(self.tokenizer, self.categories)
            set_object_words(self.model, self._object_words)
        return self._object_words

    def eos_token_id(self) -> int | list[int]:
        eos = self._base().generation_config.eos_token_id
        return eos if eos is not None else self.tokenizer.eos_token_id

    def generate_tokens(self, batch: dict, max_new_tokens: int) -> Tensor:
        """(B, new tokens) decoded with ``generation`` (rows that ended are padded with the pad token)."""
        inputs = model_inputs(batch)
        if self.grounding.word_score and self.grounding.enabled:
            self.object_words()
        return decode(self.model, inputs, self.generation, max_new_tokens=max_new_tokens,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_id())

    def _generate(self, batch: dict, max_new_tokens: int) -> list[str]:
        return self.decoded(self.generate_tokens(batch, max_new_tokens))

    def decoded(self, new: Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True)]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        question_set = self.evaluation_spec.question_set(dataloader_idx)
        if question_set is None:
            caption_update(self, batch)
        else:
            answer_update(self, batch, question_set)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        evaluation_end(self, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        captions = self._generate(batch, self.generation.caption_max_new_tokens)
        rows = [{"image_id": i, "caption": c} for i, c in zip(batch["image_ids"], captions)]
        self._predictions += rows
        return rows

    def on_predict_epoch_end(self) -> None:
        write_predictions(self, self._predictions)  # models.validation
        self._predictions = []

    def on_validation_epoch_end(self) -> None:
        evaluation_end(self, "val")

    def run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

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
