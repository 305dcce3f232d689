"""Drafter training (paper §3.1): target-regenerated responses and the target feature cache (the training
data), anchor sampling, losses, the typed config, checkpoints and the training loop."""
