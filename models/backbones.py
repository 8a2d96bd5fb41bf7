"""``add_grounding``: make the language model of a Hugging Face VLM grounded, in forward and ``generate()``.

One registry dict maps each supported architecture (``config.model_type``) to how its decoder layers'
attention modules and its image positions are found. ``add_grounding`` attaches a ``GroundingGate`` to the
selected attention modules, switches the language model to the registered grounded attention function, and
instruments the model so that every call carries its image positions:

- ``forward``: a pre-hook reads ``input_ids`` (image placeholder tokens) and passes a ``GroundingState`` down
  as the ``grounding`` keyword argument (what gradient checkpointing needs);
- ``generate``: a wrapper computes the prompt's image mask once and holds it in a context variable while the
  model decodes (BLIP-2/InstructBLIP call their language model's own ``generate``).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig, PreTrainedModel

from models.grounding import ATTN_IMPLEMENTATION, GATE_ATTR, META_ATTR, GroundingConfig, GroundingGate, GroundingMeta
from models.grounding_state import _ACTIVE_RECORDER, _ACTIVE_STATE, GroundingRecorder, GroundingState

GROUNDING_WEIGHTS = "grounding.safetensors"
GROUNDING_CONFIG = "grounding_config.json"


@dataclass(frozen=True)
class BackboneSpec:
    """How to find a VLM's grounded attention modules and image positions."""

    language_model: Callable[[PreTrainedModel], nn.Module]
    fixed_image_tokens: Callable[[PreTrainedModel], int | None]  # image tokens per prompt, if fixed


def _layers_of(language_model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The attention module of every decoder layer and whether it is cross-attention (T5's decoder)."""
    if getattr(language_model.config, "is_encoder_decoder", False):
        blocks = language_model.get_decoder().block
        return [block.layer[1].EncDecAttention for block in blocks], True
    for name, module in language_model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            attn = [getattr(layer, "self_attn", None) for layer in module]
            if all(a is not None for a in attn):
                return attn, False
    raise ValueError(f"no decoder layers with `self_attn` found in {type(language_model).__name__}")


def _blip_tokens(model: PreTrainedModel) -> int:
    return model.config.num_query_tokens


BACKBONES: dict[str, BackboneSpec] = {
    "llava": BackboneSpec(lambda m: m.model.language_model, lambda m: None),
    "llava_next": BackboneSpec(lambda m: m.model.language_model, lambda m: None),
    "blip-2": BackboneSpec(lambda m: m.language_model, _blip_tokens),
    "instructblip": BackboneSpec(lambda m: m.language_model, _blip_tokens),
}


def backbone_spec(model: PreTrainedModel) -> BackboneSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(
            f"grounding does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {sorted(BACKBONES)}"
        )
    return BACKBONES[model_type]


def image_token_mask(model: PreTrainedModel, input_ids: Tensor, has_pixels: bool) -> Tensor:
    """(B, L) bool: positions of image placeholder tokens; checks what silently goes wrong otherwise."""
    spec = backbone_spec(model)
    mask = input_ids == model.config.image_token_id
    per_row = mask.sum(dim=1)
    if has_pixels and bool((per_row == 0).any()):
        rows = (per_row == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"prompt rows {rows} contain no image placeholder token (id {model.config.image_token_id}) although "
            "pixel_values were given: the model would ignore the image. Build prompts with the model's processor."
        )
    expected = spec.fixed_image_tokens(model)
    if has_pixels and expected is not None and bool((per_row != expected).any()):
        raise ValueError(
            f"each prompt must hold exactly {expected} image placeholder tokens (num_query_tokens), "
            f"got {per_row.tolist()}"
        )
    return mask


def _grounded_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, META_ATTR, None) is not None]


def _stash_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a grounded attention module: keep its inputs for the `hidden`/cross features."""
    meta: GroundingMeta = getattr(module, META_ATTR)
    meta.hidden = args[0] if args else kwargs["hidden_states"]
    meta.key_hidden = kwargs.get("key_value_states")


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Arguments of a call by name, ``**kwargs`` flattened in."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound


def _forward_pre_hook(model: PreTrainedModel, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    recorder: GroundingRecorder | None = kwargs.pop("grounding_scores", None)
    state: GroundingState | None = kwargs.pop("grounding", None)
    if state is None:
        state = _ACTIVE_STATE.get()  # inside our generate()
    if state is None:
        bound = _bind(model.forward, args, kwargs)
        input_ids = bound.get("input_ids")
        past = bound.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            raise RuntimeError(
                "grounded model called with a non-empty KV cache outside generate(): pass the prefill's "
                "grounding=GroundingState(image_mask=...) or decode with model.generate()"
            )
        if input_ids is None:
            raise ValueError("a grounded model needs input_ids to locate the image placeholder tokens")
        has_pixels = bound.get("pixel_values") is not None
        recorder = recorder or _ACTIVE_RECORDER.get()
        state = GroundingState(image_token_mask(model, input_ids, has_pixels), recorder, recording=True)
        model._grounding_owned_state = state
    kwargs["grounding"] = state
    return args, kwargs


def _forward_hook(model: PreTrainedModel, args: tuple, kwargs: dict, output):
    state = getattr(model, "_grounding_owned_state", None)
    if state is not None:
        state.recording = False  # a checkpoint recompute in backward must not record again
        model._grounding_owned_state = None
    return output


def _check_cache(model: PreTrainedModel, bound: dict) -> None:
    """Grounded layers locate queries at the end of the keys: only dynamic KV caches keep that true."""
    config = bound.get("generation_config") or model.generation_config
    implementation = bound.get("cache_implementation") or getattr(config, "cache_implementation", None)
    if implementation not in (None, "dynamic"):
        raise ValueError(
            f"grounded generation supports the dynamic KV cache only, got cache_implementation={implementation!r}"
        )
    past = bound.get("past_key_values")
    if past is not None:
        if isinstance(past, EncoderDecoderCache):
            past = past.self_attention_cache
        if not isinstance(past, DynamicCache) or past.get_seq_length() > 0:
            raise ValueError("grounded generation needs an empty DynamicCache (or none) as past_key_values")


def _grounded_generate(model: PreTrainedModel, original: Callable, *args, **kwargs):
    recorder = kwargs.pop("grounding_scores", None) or _ACTIVE_RECORDER.get()
    bound = _bind(original, args, kwargs)
    _check_cache(model, bound)
    input_ids = bound.get("input_ids", bound.get("inputs"))
    has_pixels = bound.get("pixel_values") is not None
    if input_ids is None and backbone_spec(model).fixed_image_tokens(model) is not None and has_pixels:
        # BLIP-2 / InstructBLIP default prompt: the query placeholders followed by BOS
        n = backbone_spec(model).fixed_image_tokens(model)
        batch = bound["pixel_values"].shape[0]
        input_ids = torch.full((batch, n), model.config.image_token_id)
    if input_ids is None:
        raise ValueError("a grounded model's generate() needs input_ids to locate the image placeholder tokens")
    state = GroundingState(image_token_mask(model, input_ids, has_pixels), recorder, recording=True)
    token = _ACTIVE_STATE.set(state)
    try:
        return original(*args, **kwargs)
    finally:
        _ACTIVE_STATE.reset(token)


def _set_attn_implementation(language_model: nn.Module, name: str) -> None:
    """Every config inside the language model (T5 stacks hold their own copies)."""
    for module in language_model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            config._attn_implementation = name


def _feature_dim(attn: nn.Module, feature: str, language_model: nn.Module) -> int:
    config = language_model.config
    hidden = getattr(config, "hidden_size", None) or config.d_model
    if feature == "hidden":
        return hidden
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    if feature == "qk":
        return heads * head_dim
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads * head_dim


def add_grounding(model: PreTrainedModel, config: GroundingConfig | None = None) -> PreTrainedModel:
    """Make ``model``'s language model grounded (in place) and return it.

    Supported: LLaVA, LLaVA-NeXT, BLIP-2 (OPT, Flan-T5), InstructBLIP (Llama/Vicuna, Flan-T5). Layers are
    indices into the language model's decoder layers (negative from the end); for Flan-T5 grounding acts on the
    decoder's cross-attention.
    """
    config = config or GroundingConfig()
    spec = backbone_spec(model)
    if getattr(model, "_grounding_config", None) is not None:
        raise RuntimeError("add_grounding() was already applied to this model")
    language_model = spec.language_model(model)
    attns, cross = _layers_of(language_model)
    n = len(attns)
    selected = []
    for index in config.layers:
        if not -n <= index < n:
            raise ValueError(f"GroundingConfig.layers: index {index} out of range for a language model of {n} layers")
        selected.append(index % n)
    if len(set(selected)) != len(selected):
        raise ValueError(f"GroundingConfig.layers selects a layer twice: {config.layers}")
    param = next(model.parameters())
    for layer in sorted(selected):
        attn = attns[layer]
        embed = language_model.get_input_embeddings().embedding_dim if config.word_score else None
        gate = GroundingGate(config, _feature_dim(attn, config.feature, language_model), embed)
        attn.add_module(GATE_ATTR, gate.to(device=param.device))
        meta = GroundingMeta(layer, config.score, config.feature, cross, enabled=config.enabled)
        setattr(attn, META_ATTR, meta)
        if config.feature == "hidden" or (cross and config.feature == "value"):
            attn.register_forward_pre_hook(_stash_inputs, with_kwargs=True)
    _set_attn_implementation(language_model, ATTN_IMPLEMENTATION)
    model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    model.register_forward_hook(_forward_hook, with_kwargs=True)
    model.generate = functools.partial(_grounded_generate, model, model.generate)
    model._grounding_config = config
    model._grounding_owned_state = None
    return model


def grounding_config(model: nn.Module) -> GroundingConfig:
    base = _unwrap(model)
    config = getattr(base, "_grounding_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no grounding: call add_grounding() first")
    return config


def _unwrap(model: nn.Module) -> nn.Module:
    """The PreTrainedModel under peft wrappers."""
    while not hasattr(model, "_grounding_config") and hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
    if not hasattr(model, "_grounding_config") and hasattr(model, "model"):
        model = model.model
    return model


def set_grounding_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every grounded layer on or off (off = exactly the untouched attention)."""
    modules = _grounded_modules(model)
    if not modules:
        raise ValueError("model has no grounded layers: call add_grounding() first")
    for module in modules:
        getattr(module, META_ATTR).enabled = enabled


def gate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> the active GroundingGate of every grounded layer (unwrapping peft's modules_to_save)."""
    out = {}
    for module in model.modules():
        if getattr(module, META_ATTR, None) is None:
            continue
        gate = getattr(module, GATE_ATTR)
        copies = getattr(gate, "modules_to_save", None)
        if copies is not None:
            gate = copies[gate.active_adapters[0]] if gate.active_adapters else gate.original_module
        out[f"layer{getattr(module, META_ATTR).layer}"] = gate
    return out


def grounding_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {
        f"{layer}.{key}": value.detach().contiguous().cpu()
        for layer, gate in gate_modules(model).items()
        for key, value in gate.state_dict().items()
    }


def save_grounding(model: nn.Module, directory: str | Path) -> Path:
    """Write ``grounding.safetensors`` and ``grounding_config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(grounding_state_dict(model), str(directory / GROUNDING_WEIGHTS))
    (directory / GROUNDING_CONFIG).write_text(json.dumps(asdict(grounding_config(model)), indent=2))
    return directory


def load_grounding(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """``add_grounding`` with the saved config, then load the saved gate parameters (strictly)."""
    directory = Path(directory)
    config_path, weights_path = directory / GROUNDING_CONFIG, directory / GROUNDING_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {directory}")
    try:
        config = GroundingConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from err
    if getattr(model, "_grounding_config", None) is None:
        add_grounding(model, config)
    tensors = load_file(str(weights_path))
    gates = gate_modules(model)
    for layer, gate in gates.items():
        own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == layer}
        expected = gate.state_dict()
        missing = set(expected) - set(own)
        if missing:
            raise ValueError(f"{weights_path}: missing {sorted(missing)} for {layer}")
        own = {k: v.reshape(expected[k].shape) if v.dim() == 0 and k in expected else v for k, v in own.items()}  # 0-d: older files
        gate.load_state_dict(own)
    extra = {k.split(".", 1)[0] for k in tensors} - set(gates)
    if extra:
        raise ValueError(f"{weights_path}: has gates for {sorted(extra)} which this model's config does not ground")
    return model
