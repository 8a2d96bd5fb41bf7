"""LightningDataModules: the synthetic hallucination world and caption-pair data."""

from datamodules.caption_pairs import CaptionPairsDataModule
from datamodules.world import WorldConfig, generate_world

__all__ = ["CaptionPairsDataModule", "WorldConfig", "generate_world"]
