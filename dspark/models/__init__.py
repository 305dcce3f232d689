"""Models: the target runner (decoder over a paged KV cache), model families, checkpoints, drafters."""
