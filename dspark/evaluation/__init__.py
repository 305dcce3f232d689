"""Offline evaluation (SPEC §3): τ tables, per-position acceptance, plots."""
