"""Training samples for the trainer: token ids + loss mask per sequence, and optionally cached features.

`data.train` may be:
- a JSONL file of pre-tokenised rows `{"input_ids": [...], "loss_mask": [0/1, ...]}` (token ids are
  integers in [0, the target's vocab_size), loss_mask values 0 or 1), or of conversations
  (`{"conversations": [...]}` / `{"turns": [...]}`) rendered with the target's chat template by
  `dspark.data.chat` (loss mask = response tokens) — target features are then computed online;
- a feature-cache folder written by `dspark data cache` — tokens, masks and target features come from
  disk, after `FeatureCache.validate` has checked its layers, hidden size and target against the run.

Data that gives the drafter kind nothing to learn from (`check_supervision`: no anchor position for DSpark /
DFlash, no label two tokens ahead for EAGLE-3 / MTP-1, in any sample) is refused with what was found, before
the target is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from dspark.errors import ConfigError
from dspark.training.trainer import Sample


@dataclass
class SupervisionCounts:
    """What a training set holds for the loss, as reported when it holds nothing to supervise."""

    rows: int = 0  # samples read
    rows_without_supervised_token: int = 0  # loss_mask all 0 (after truncation to data.max_length)
    supervised_tokens: int = 0
    without_assistant_content: int = 0  # conversations with no assistant turn, or only empty ones


def check_supervision(masks: Iterable[tuple[torch.Tensor, bool]], drafter: str, source: str | Path) -> None:
    """masks: (loss_mask [S] bool, has assistant content) per sample. Returns at the first sample with a
    supervised unit of the `drafter` kind (`supervised_units`); ConfigError naming `source` with the counts
    when there is none."""
    from dspark.training.recipes import RECIPES

    recipe = RECIPES[drafter]
    counts = SupervisionCounts()
    for mask, has_content in masks:
        if has_content and recipe.supervised_units(mask) > 0:
            return
        supervised = int(mask.sum())
        counts.rows += 1
        counts.rows_without_supervised_token += supervised == 0
        counts.supervised_tokens += supervised
        counts.without_assistant_content += not has_content
    raise ConfigError(
        f"data.train {source}: nothing to supervise for a {drafter} drafter: {counts.rows} rows read, "
        f"{counts.rows_without_supervised_token} with no supervised token (loss_mask all 0), "
        f"{counts.supervised_tokens} supervised tokens in total, {counts.without_assistant_content} "
        f"conversations with no assistant content, and 0 {recipe.unit} in the rest; the loss mask must mark the "
        "responses (conversations need assistant turns: `dspark data regenerate` writes them)"
    )


def _target_vocab_size(target_folder: str | Path) -> int:
    from dspark.models.config import parse_decoder_config, read_config_json

    folder = Path(target_folder)
    return parse_decoder_config(read_config_json(folder), where=str(folder / "config.json")).vocab_size


def _tokenised_row(row: dict, where: str, vocab_size: int, max_length: int) -> Sample:
    """A pre-tokenised row, checked: integer ids in [0, vocab_size), 0/1 loss mask, equal lengths ≥ 2."""
    ids, mask = row.get("input_ids"), row.get("loss_mask")
    if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask) or len(ids) < 2:
        raise ConfigError(f"{where}: input_ids and loss_mask must be lists of equal length ≥ 2")
    bad = next((i for i, x in enumerate(ids) if type(x) is not int or not 0 <= x < vocab_size), None)
    if bad is not None:
        raise ConfigError(f"{where}: input_ids[{bad}] is {json.dumps(ids[bad])}; token ids must be integers in "
                          f"[0, {vocab_size}) (the target's vocab_size)")
    bad = next((i for i, x in enumerate(mask) if type(x) not in (int, bool) or x not in (0, 1)), None)
    if bad is not None:
        raise ConfigError(f"{where}: loss_mask[{bad}] is {json.dumps(mask[bad])}; loss_mask values must be 0 or 1")
    return Sample(torch.tensor(ids[:max_length], dtype=torch.long), torch.tensor(mask[:max_length], dtype=torch.bool))


def load_samples(path: str | Path, target_folder: str | Path, max_length: int, drafter: str = "dspark"):
    """A sequence of samples (`Sample`, or the cache's `CachedSample` with features) for `Trainer`, checked
    to give a `drafter` kind's loss something to supervise (`check_supervision`)."""
    path = Path(path)
    if path.is_dir():
        from dspark.training.feature_cache import FeatureCache

        cache = FeatureCache(path)
        check_supervision(((cache.loss_mask(i)[:max_length], True) for i in range(len(cache))), drafter, path)
        return cache
    if not path.is_file():
        raise ConfigError(f"data.train: file not found: {path}")
    samples: list[Sample] = []
    conversations = []
    vocab_size = None
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
                vocab_size = vocab_size or _target_vocab_size(target_folder)
                samples.append(_tokenised_row(row, where, vocab_size, max_length))
            else:
                from dspark.data.samples import parse_sample

                conversations.append(parse_sample(row, index=index, where=where))
            index += 1
    content = [True] * len(samples)
    if conversations:
        from dspark.models.tokenizer import load_tokenizer
        from dspark.data.chat import tokenize_sample

        tokenizer = load_tokenizer(target_folder)
        for sample in conversations:
            tokenized = tokenize_sample(tokenizer, sample, max_length=max_length)
            samples.append(Sample(tokenized.input_ids, tokenized.loss_mask))
            content.append(any(m["role"] == "assistant" and m["content"].strip() for m in sample.messages))
    if not samples:
        raise ConfigError(f"{path}: no training samples (the file is empty)")
    check_supervision(((s.loss_mask, c) for s, c in zip(samples, content)), drafter, path)
    return samples
