"""Models: the grounded attention layer, backbone registry and LightningModules."""

from models.backbones import (
    BACKBONES,
    add_grounding,
    gate_modules,
    grounding_config,
    load_grounding,
    save_grounding,
    set_grounding_enabled,
)
from models.grounding import GroundingConfig, GroundingRecorder, GroundingState
from models.module import GenerationSettings, GroundedVLM, LoraSettings, ObjectiveConfig

__all__ = [
    "BACKBONES",
    "GenerationSettings",
    "GroundedVLM",
    "LoraSettings",
    "ObjectiveConfig",
    "GroundingConfig",
    "GroundingRecorder",
    "GroundingState",
    "add_grounding",
    "gate_modules",
    "grounding_config",
    "load_grounding",
    "save_grounding",
    "set_grounding_enabled",
]
