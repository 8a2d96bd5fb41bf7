"""LightningDataModules: the synthetic hallucination world and caption-pair data."""
