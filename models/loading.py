"""Loading a backbone for training or evaluation: ``from_pretrained`` + grounding + freezing + LoRA/adapter.

:func:`load_backbone` is the one place that turns :class:`BackboneSettings` into ``(model, tokenizer)``;
:class:`models.module.GroundedVLM` calls it from ``configure_model`` (or from ``setup`` under ZeRO-3, see
:func:`zero3_config`). Wherever parameters end up frozen, checkpoints keep only the trainable ones
(:func:`trainable_names`) and the rest reload from the backbone.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from models.backbones import add_grounding
from models.grounding import GroundingConfig

__all__ = [
    "BackboneSettings",
    "LoraSettings",
    "check_backbone",
    "check_quantization",
    "check_quantized_trainer",
    "gathered",
    "hold_zero3",
    "load_backbone",
    "trainable_names",
    "zero3_config",
]


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
class BackboneSettings:
    """What :func:`load_backbone` loads (the matching ``GroundedVLM`` arguments document each field)."""

    backbone: str
    grounding: GroundingConfig
    lora: LoraSettings | None = None
    adapter: str | None = None
    freeze_vision: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None
    quantization: Literal["none", "8bit", "4bit"] = "none"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @property
    def peft(self) -> bool:
        return self.lora is not None or self.adapter is not None


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
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.quantization {quantization} needs bitsandbytes: pip install bitsandbytes")


def check_quantized_trainer(quantization: str, trainer: Any) -> None:
    """Quantized weights need CUDA and a strategy that does not shard them."""
    if trainer is None or quantization == "none":
        return
    strategy = type(trainer.strategy).__name__
    if "DeepSpeed" in strategy or "FSDP" in strategy:
        raise ValueError(
            f"model.quantization {quantization} cannot be combined with {strategy}: quantized weights "
            "are not sharded; use trainer.strategy ddp (LoRA adapters are small) or quantization none"
        )
    if trainer.accelerator.__class__.__name__ != "CUDAAccelerator":
        raise ValueError(f"model.quantization {quantization} needs trainer.accelerator gpu (bitsandbytes)")


def zero3_config(trainer: Any) -> dict | None:
    """The DeepSpeed config (with the trainer's precision) when the trainer shards parameters with ZeRO-3.

    Such runs load in ``setup``, not ``configure_model``: Lightning's ``configure_model`` runs inside
    ``deepspeed.zero.Init``, where from_pretrained cannot fill partitioned weights and peft's zero-init of
    LoRA B is a no-op.
    """
    strategy = trainer.strategy if trainer is not None else None
    if not getattr(strategy, "zero_stage_3", False):
        return None
    config = copy.deepcopy(strategy.config)
    precision = str(trainer.precision)
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    elif precision.startswith("16"):
        config["fp16"] = {"enabled": True}
    return config


def hold_zero3(config: dict) -> Any:
    """transformers' ZeRO-3 handle: while the caller keeps it, ``from_pretrained`` partitions the weights as
    they load and ``generate`` steps all ranks together (transformers itself holds only a weak reference).

    The small new parameters (gates, LoRA) are created whole and initialised normally; DeepSpeed partitions
    them when the engine starts.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def _from_pretrained(settings: BackboneSettings) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"attn_implementation": settings.attn_implementation} if settings.attn_implementation else {}
    dtype = getattr(torch, settings.dtype)
    if settings.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=settings.quantization == "8bit", load_in_4bit=settings.quantization == "4bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": torch.device("cuda", torch.cuda.current_device())}
    return AutoModelForImageTextToText.from_pretrained(
        settings.backbone, dtype=dtype, trust_remote_code=settings.trust_remote_code, **kwargs
    )


def _freeze(model: torch.nn.Module, freeze_vision: bool) -> None:
    if getattr(model.config, "vision_feature_layer", None) is not None:
        # LLaVA-style models read the vision tower's hidden states, never its pooled output: post_layernorm
        # gets no gradient, which DDP rejects ("parameters that were not used in producing the loss").
        for name, param in model.named_parameters():
            if "vision_tower" in name and "post_layernorm" in name:
                param.requires_grad_(False)
    if freeze_vision:
        for name, module in model.named_children():
            if name in ("vision_tower", "vision_model", "qformer") or (name == "model" and hasattr(module, "vision_tower")):
                target = module.vision_tower if name == "model" else module
                target.requires_grad_(False)


def _with_peft(model: torch.nn.Module, settings: BackboneSettings) -> torch.nn.Module:
    if settings.adapter is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, settings.adapter, is_trainable=True)
        _check_adapter_matches(peft_model, settings.adapter)
        return peft_model
    if settings.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=["grounding_gate", *lora.modules_to_save],
    ))


def _check_adapter_matches(model: torch.nn.Module, adapter: str) -> None:
    """An adapter saved under another grounding recipe (e.g. ``grounding.word_score``) must not load half-way."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = set(load_peft_weights(adapter, device="cpu"))
    expected = set(get_peft_model_state_dict(model))
    unused, missing = sorted(saved - expected), sorted(expected - saved)
    if unused or missing:
        detail = "; ".join(f"{label}: {keys[:3]}" for label, keys in (("in the adapter only", unused),
                                                                        ("in the model only", missing)) if keys)
        raise ValueError(f"adapter {adapter} does not fit this model's grounding/LoRA settings ({detail}); "
                         "use the model.grounding and model.lora settings it was trained with")


def load_backbone(settings: BackboneSettings) -> tuple[torch.nn.Module, Any]:
    """``from_pretrained`` + grounding + freezing + LoRA (or ``adapter``) + gradient checkpointing, and the tokenizer.

    The model is returned in train mode (``from_pretrained`` returns eval mode; Lightning keeps submodule modes).
    Under ZeRO-3 call it while holding :func:`hold_zero3`.
    """
    from transformers import AutoTokenizer

    check_backbone(settings.backbone)
    model = _from_pretrained(settings)
    add_grounding(model, settings.grounding)
    _freeze(model, settings.freeze_vision)
    model = _with_peft(model, settings)
    if settings.gradient_checkpointing:
        base = model.get_base_model() if settings.peft else model
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(settings.backbone, trust_remote_code=settings.trust_remote_code)
    return model, tokenizer


def trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full values of ZeRO-3-partitioned ``params`` inside the context (on every rank); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
