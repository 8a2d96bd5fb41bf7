"""LightningDataModules: the synthetic hallucination world and caption-pair data.

Names load on first use (PEP 562), so ``python -m datamodules.world`` does not import torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaptionPairsDataModule": "datamodules.caption_pairs",
    "WorldConfig": "datamodules.world",
    "generate_world": "datamodules.world",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
