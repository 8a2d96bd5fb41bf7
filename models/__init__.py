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
from models.loading import BackboneSettings, LoraSettings, load_backbone
from models.module import GenerationSettings, GroundedVLM
from models.objective import ObjectiveConfig

__all__ = [
    "BACKBONES",
    "BackboneSettings",
    "GenerationSettings",
    "GroundedVLM",
    "LoraSettings",
    "ObjectiveConfig",
    "GroundingConfig",
    "GroundingRecorder",
    "GroundingState",
    "add_grounding",
    "load_backbone",
    "gate_modules",
    "grounding_config",
    "load_grounding",
    "save_grounding",
    "set_grounding_enabled",
]
