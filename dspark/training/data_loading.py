"""Training samples for the trainer: token ids + loss mask per sequence.

Accepted JSONL rows (one per line, blank lines skipped):
- pre-tokenised: `{"input_ids": [...], "loss_mask": [0/1, ...]}` (same length);
- conversations: `{"conversations": [{"role", "content"}, ...]}` or `{"turns": [...]}`, rendered with the
  target's tokenizer and chat template by `dspark.training.prompts` (loss mask = response tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.errors import ConfigError
from dspark.training.trainer import Sample


def load_samples(path: str | Path, target_folder: str | Path, max_length: int) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.train: file not found: {path}")
    samples: list[Sample] = []
    conversations: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: each line must be a JSON object")
            if "input_ids" in row:
                ids, mask = row.get("input_ids"), row.get("loss_mask")
                if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask) or len(ids) < 2:
                    raise ConfigError(f"{path}:{number}: input_ids and loss_mask must be lists of equal length ≥ 2")
                samples.append(Sample(torch.tensor(ids[:max_length], dtype=torch.long),
                                      torch.tensor(mask[:max_length], dtype=torch.bool)))
            else:
                conversations.append((number, row))
    if conversations:
        samples.extend(_render_conversations(path, conversations, target_folder, max_length))
    if not samples:
        raise ConfigError(f"{path}: no training samples (the file is empty)")
    return samples


def _render_conversations(path: Path, rows: list[tuple[int, dict]], target_folder, max_length: int) -> list[Sample]:
    from dspark.models.tokenizer import load_tokenizer
    from dspark.training.prompts import render_training_sample

    tokenizer = load_tokenizer(target_folder)
    out = []
    for number, row in rows:
        ids, mask = render_training_sample(tokenizer, row, where=f"{path}:{number}")
        out.append(Sample(torch.tensor(ids[:max_length], dtype=torch.long), torch.tensor(mask[:max_length], dtype=torch.bool)))
    return out
