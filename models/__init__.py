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

__all__ = [
    "BACKBONES",
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
