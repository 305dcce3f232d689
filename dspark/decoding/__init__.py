"""Sampling (temperature, top-k, top-p) and lossless verification of drafted tokens (docs/design.md §1)."""
