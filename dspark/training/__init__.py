"""Drafter training (SPEC §2.5–2.6): the data pipeline (prompt files, target-regenerated responses, the
target feature cache), anchor sampling, losses and the training loop."""
