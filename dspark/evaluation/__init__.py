"""Offline evaluation (docs/design.md §3): τ tables, per-position acceptance, plots."""
