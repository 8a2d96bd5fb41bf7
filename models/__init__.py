"""Models: the grounded attention layer, backbone registry and LightningModules."""
