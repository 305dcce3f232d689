"""Sampling (temperature, top-k, top-p) and lossless verification of drafted tokens (SPEC §1)."""
