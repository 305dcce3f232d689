"""Tokenizer loading (HF `tokenizer.json` via transformers, local files only) and stop tokens."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.errors import CheckpointError


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json) in the model folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise CheckpointError(f"{folder}: cannot load tokenizer ({type(exc).__name__}: {exc})") from None


def stop_token_ids(folder: str | Path, tokenizer=None, config_eos: tuple[int, ...] = ()) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, de-duplicated."""
    ids: list[int] = list(config_eos)
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{gen}: not valid JSON ({exc})") from None
        ids.extend(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def render_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, one user turn through the chat template (generation prompt on)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError("--chat was given but the tokenizer has no chat template")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
