"""Tokenizer loading (HF `tokenizer.json` via transformers, local files only) and stop tokens; errors name
the tokenizer folder, on one line. Rendering prompts and conversations is `dspark.data.chat`'s."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.errors import CheckpointError


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json) in the model folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise CheckpointError(f"{folder}: cannot load tokenizer ({_one_line(exc)})") from None


def stop_token_ids(folder: str | Path, tokenizer=None, config_eos: tuple[int, ...] = ()) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, de-duplicated."""
    ids: list[int] = list(config_eos)
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            data = json.loads(gen.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{gen}: not valid JSON ({exc})") from None
        eos = data.get("eos_token_id") if isinstance(data, dict) else None
        found = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in found):
            raise CheckpointError(f"{gen}: field 'eos_token_id' must be a token id (integer ≥ 0) or a list of them, "
                                  f"got {eos!r}")
        ids.extend(found)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))
