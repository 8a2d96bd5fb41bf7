"""Hallucination metrics as torchmetrics: CHAIR, POPE, MME, AMBER."""
