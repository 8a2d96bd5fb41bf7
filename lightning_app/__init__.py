"""Command-line entry of the Grounded Attention suite (``python -m lightning_app``)."""
