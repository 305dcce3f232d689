"""Tokenizer loading (HF `tokenizer.json` via transformers, local files only), prompt rendering and stop
tokens. Errors name the tokenizer folder (a broken chat template, an unloadable tokenizer) or the prompt
(text that is not valid UTF-8), on one line."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.errors import CheckpointError, RequestError


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


def check_text(text, what: str, error: type[Exception] = RequestError) -> str:
    """`text` if it is a string a tokenizer can encode; else `error` naming `what`. Bytes that are not UTF-8
    reach Python as lone surrogates (argv, surrogateescape) and so do JSON "\\ud800" escapes: no UTF-8
    encoding exists for them."""
    if not isinstance(text, str):
        raise error(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        near = text[max(0, exc.start - 16): exc.start + 16]
        raise error(f"{what}: not valid UTF-8 text (an undecodable byte or lone surrogate at character {exc.start}, "
                    f"near {near!r})") from None
    return text


def render_prompt(tokenizer, text: str, chat: bool, what: str = "prompt") -> list[int]:
    """Token ids of a prompt; with `chat`, one user turn through the chat template (generation prompt on).

    `what` names the text in errors: RequestError when it is not valid UTF-8 text (argv bytes that are
    not UTF-8 arrive as lone surrogates), CheckpointError naming the tokenizer folder when its chat
    template does not compile or render."""
    check_text(text, what)
    if chat:
        folder = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(f"{folder}: --chat was given but the tokenizer has no chat template")
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
        except Exception as exc:  # jinja2 syntax/runtime errors, or any Python error the template raises
            raise CheckpointError(f"{folder}: the chat template cannot be rendered ({_one_line(exc)})") from None
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
