"""The built-in default model: a small Qwen3 target and its drafters, shipped inside the package.

Layout (`dspark/builtin/`, rebuilt from scratch by `dspark zoo rebuild`):
  target/                      HF folder: config.json, model.safetensors, tokenizer, pretrain_report.json
  drafters/<name>/             one folder per drafter in BUILTIN_DRAFTERS (config.json + model.safetensors;
                               the DSpark drafters also calibration.json, their fitted calibration)
  prompts/corpus-code.jsonl    held-out prompts from the corpus, in the evaluation format
  prompts/corpus-prose.jsonl
  manifest.json                what was built, by which recipe, with sizes

Every command that takes `--target`/`--model` or `--drafter` falls back to these when none is given, and
`--drafter NAME` accepts a name of BUILTIN_DRAFTERS (a model folder of that name in the working directory
wins; the `dspark/` package folder of a source checkout does not count, having no config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from dspark.errors import CheckpointError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_DRAFTERS = ("dspark", "dspark-rnn", "dflash", "eagle3", "mtp")
DRAFTER_NAMES = (*BUILTIN_DRAFTERS, "ngram", "none")  # every name `--drafter` takes besides a folder
DEFAULT_DRAFTER = "dspark"
BUILTIN_PROMPT_SETS = ("corpus-code", "corpus-prose")


def _missing(what: Path) -> CheckpointError:
    return CheckpointError(f"the built-in model is not installed ({what} is missing); run `dspark zoo rebuild`")


def builtin_target(root: Path = BUILTIN_DIR) -> Path:
    folder = root / "target"
    if not (folder / "config.json").is_file():
        raise _missing(folder)
    return folder


def builtin_drafter(name: str = DEFAULT_DRAFTER, root: Path = BUILTIN_DIR) -> Path:
    if name not in BUILTIN_DRAFTERS:
        raise CheckpointError(f"{name!r} is not a built-in drafter; choose one of {', '.join(BUILTIN_DRAFTERS)}")
    folder = root / "drafters" / name
    if not (folder / "config.json").is_file():
        raise _missing(folder)
    return folder


def builtin_prompt_file(name: str, root: Path = BUILTIN_DIR) -> Path:
    return root / "prompts" / f"{name}.jsonl"


def builtin_calibration(name: str = DEFAULT_DRAFTER, root: Path = BUILTIN_DIR) -> Path | None:
    """The calibration file shipped in built-in drafter `name`'s folder, or None."""
    path = root / "drafters" / name / "calibration.json"
    return path if path.is_file() else None


def resolve_target(value: str | None) -> str:
    """`--target`/`--model` value, or the built-in target when None."""
    return value if value is not None else str(builtin_target())


def resolve_drafter(value: str | None) -> str:
    """`--drafter` value: None → the built-in DSpark drafter; a built-in name (unless a model folder of that
    name, with a config.json, is in the working directory) → its folder; anything else ("ngram", a folder)
    unchanged."""
    if value is None:
        return str(builtin_drafter(DEFAULT_DRAFTER))
    if value in BUILTIN_DRAFTERS and not (Path(value) / "config.json").is_file():
        return str(builtin_drafter(value))
    return value


def listing(root: Path = BUILTIN_DIR) -> dict:
    """Paths and sizes of everything shipped (what `dspark zoo list --json` prints)."""

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0

    drafters = {name: str(root / "drafters" / name) for name in BUILTIN_DRAFTERS if (root / "drafters" / name / "config.json").is_file()}
    manifest = root / "manifest.json"
    return {
        "root": str(root),
        "installed": (root / "target" / "config.json").is_file(),
        "target": str(root / "target"),
        "tokenizer": str(root / "target"),
        "drafters": drafters,
        "default_drafter": DEFAULT_DRAFTER,
        "prompts": {name: str(builtin_prompt_file(name, root)) for name in BUILTIN_PROMPT_SETS if builtin_prompt_file(name, root).is_file()},
        "calibration": {name: str(builtin_calibration(name, root)) for name in drafters if builtin_calibration(name, root)},
        "total_bytes": size(root),
        "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }
