"""Training samples for the trainer: token ids + loss mask per sequence, and optionally cached features.

`data.train` may be:
- a JSONL file of pre-tokenised rows `{"input_ids": [...], "loss_mask": [0/1, ...]}`, or of conversations
  (`{"conversations": [...]}` / `{"turns": [...]}`) rendered with the target's chat template by
  `dspark.training.prompts` (loss mask = response tokens) — target features are then computed online;
- a feature-cache folder written by `dspark data cache` — tokens, masks and target features come from
  disk, after `FeatureCache.validate` has checked its layers, hidden size and target against the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.errors import ConfigError
from dspark.training.trainer import Sample


def load_samples(path: str | Path, target_folder: str | Path, max_length: int):
    """A sequence of samples (`Sample`, or the cache's `CachedSample` with features) for `Trainer`."""
    path = Path(path)
    if path.is_dir():
        from dspark.training.feature_cache import FeatureCache

        return FeatureCache(path)
    if not path.is_file():
        raise ConfigError(f"data.train: file not found: {path}")
    samples: list[Sample] = []
    conversations = []
    with path.open(encoding="utf-8") as handle:
        index = 0
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc})") from None
            if isinstance(row, dict) and "input_ids" in row:
                ids, mask = row.get("input_ids"), row.get("loss_mask")
                if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask) or len(ids) < 2:
                    raise ConfigError(f"{where}: input_ids and loss_mask must be lists of equal length ≥ 2")
                samples.append(Sample(torch.tensor(ids[:max_length], dtype=torch.long),
                                      torch.tensor(mask[:max_length], dtype=torch.bool)))
            else:
                from dspark.training.prompts import parse_sample

                conversations.append(parse_sample(row, index=index, where=where))
            index += 1
    if conversations:
        from dspark.models.tokenizer import load_tokenizer
        from dspark.training.prompts import tokenize_sample

        tokenizer = load_tokenizer(target_folder)
        for sample in conversations:
            tokenized = tokenize_sample(tokenizer, sample, max_length=max_length)
            samples.append(Sample(tokenized.input_ids, tokenized.loss_mask))
    if not samples:
        raise ConfigError(f"{path}: no training samples (the file is empty)")
    return samples
