"""Prompt sets of the paper's offline evaluation (docs/design.md §3), plus the built-in corpus's held-out prompts.

A set is named (resolved in the evaluation data folder, or the built-in prompts for `corpus-*`) or given as
a JSONL path (`{"turns": [...]}` or `{"conversations": [...]}` lines). Only the first user turn is used.
A file longer than the set's cap (or `--limit`) is shuffled with the run's seed and truncated.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import ConfigError
from dspark.models.zoo import BUILTIN_PROMPT_SETS, builtin_prompt_file
from dspark.data.samples import Sample, read_samples

# name → (domain, cap): the paper's nine sets and their caps, and the built-in held-out corpus prompts.
KNOWN_SETS: dict[str, tuple[str, int]] = {
    "gsm8k": ("math", 500), "math500": ("math", 500), "aime25": ("math", 30),
    "mbpp": ("code", 256), "humaneval": ("code", 164), "livecodebench": ("code", 500),
    "mt-bench": ("chat", 80), "alpaca": ("chat", 500), "arena-hard": ("chat", 500),
    "corpus-code": ("corpus", 80), "corpus-prose": ("corpus", 80),
}
DEFAULT_SETS = tuple(KNOWN_SETS)
DOMAIN_ORDER = ("math", "code", "chat", "corpus", "custom")


@dataclass
class PromptSet:
    name: str
    domain: str
    path: Path
    samples: list[Sample]


def default_data_dir() -> Path | None:
    """$DSPARK_EVAL_DIR, else the first `shared/data/eval` found next to the working or the source tree."""
    env = os.environ.get("DSPARK_EVAL_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        for parent in (base, *base.parents):
            candidate = parent / "shared" / "data" / "eval"
            if candidate.is_dir():
                return candidate
    return None


def resolve_set(spec: str, data_dir: Path | None) -> tuple[str, str, Path]:
    """(name, domain, path) of a set name or a JSONL path. Unknown names raise ConfigError."""
    if spec in KNOWN_SETS:
        domain = KNOWN_SETS[spec][0]
        if spec in BUILTIN_PROMPT_SETS:
            return spec, domain, builtin_prompt_file(spec)
        return spec, domain, (data_dir or Path(".")) / f"{spec}.jsonl"
    path = Path(spec)
    if path.suffix == ".jsonl" or path.is_file():
        return path.stem, "custom", path
    raise ConfigError(f"unknown data set {spec!r}: give one of {', '.join(KNOWN_SETS)} or a JSONL file path")


def load_set(name: str, domain: str, path: Path, *, limit: int | None, seed: int) -> PromptSet:
    samples = read_samples(path)
    if not samples:
        raise ConfigError(f"{path}: no prompts")
    cap = KNOWN_SETS.get(name, (domain, len(samples)))[1]
    if limit is not None:
        cap = min(cap, limit)
    if len(samples) > cap:
        samples = list(samples)
        random.Random(seed).shuffle(samples)
        samples = samples[:cap]
    return PromptSet(name, domain, path, samples)
