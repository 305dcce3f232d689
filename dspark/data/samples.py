"""Prompt and conversation JSONL files: the one reader of the format every command takes (`dspark eval`
prompt sets, `dspark data regenerate` input and output, training conversations).

One JSON object per line (blank lines are ignored), in either of two shapes:

    {"id": ..., "turns": ["user message", ...]}                              (prompts only)
    {"id": ..., "conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

"id" is optional (a string or an integer); without it a sample's id is its 0-based index among the
file's non-blank lines, so it is stable across runs as long as the file is not edited. Ids must be
unique within a file. Other top-level keys (e.g. the "finish_reason" / "num_tokens" that
`dspark data regenerate` writes) are ignored. Every malformed line is reported as `FILE:LINE: problem`;
text that is not valid Unicode (a JSON "\\ud800" escape) is refused there too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark.data.chat import check_text, json_type
from dspark.errors import ConfigError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sample:
    """One line of a prompt / conversation file."""

    id: str | int  # the line's "id", else `index`
    index: int  # 0-based index among the file's non-blank lines
    messages: tuple[dict[str, str], ...]  # {"role": one of ROLES, "content": str}, in order
    where: str  # "FILE:LINE", for error messages


def parse_sample(obj: Any, *, index: int, where: str) -> Sample:
    """Validate one decoded JSON line (either format) and return it as a `Sample`."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {json_type(obj)}")
    sample_id = obj.get("id", index)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise ConfigError(f"{where}: \"id\" must be a string or an integer, got {json_type(sample_id)}")
    has_turns, has_conv = "turns" in obj, "conversations" in obj
    if has_turns == has_conv:
        problem = "both" if has_turns else "neither"
        raise ConfigError(f"{where}: a sample needs exactly one of \"turns\" or \"conversations\" (found {problem})")
    if has_turns:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{where}: \"turns\" must be a non-empty list of strings, got {json_type(turns)}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise ConfigError(f"{where}: \"turns\"[{i}] must be a string, got {json_type(turn)}")
            check_text(turn, f"{where}: \"turns\"[{i}]", ConfigError)
        messages = tuple({"role": "user", "content": turn} for turn in turns)
    else:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ConfigError(f"{where}: \"conversations\" must be a non-empty list of messages, got {json_type(conv)}")
        parsed = []
        for i, message in enumerate(conv):
            if not isinstance(message, dict):
                raise ConfigError(f"{where}: \"conversations\"[{i}] must be an object, got {json_type(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise ConfigError(f"{where}: \"conversations\"[{i}] has no \"{key}\"")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ConfigError(f"{where}: \"conversations\"[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ConfigError(f"{where}: \"conversations\"[{i}].content must be a string, got {json_type(content)}")
            check_text(content, f"{where}: \"conversations\"[{i}].content", ConfigError)
            parsed.append({"role": role, "content": content})
        messages = tuple(parsed)
    return Sample(id=sample_id, index=index, messages=messages, where=where)


def read_samples(path: str | Path) -> list[Sample]:
    """All samples of a JSONL file, in file order. Raises `ConfigError` naming FILE:LINE on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    samples: list[Sample] = []
    first_line: dict[str | int, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            sample = parse_sample(obj, index=len(samples), where=where)
            if sample.id in first_line:
                raise ConfigError(f"{where}: duplicate sample id {sample.id!r} (first used on line {first_line[sample.id]})")
            first_line[sample.id] = lineno
            samples.append(sample)
    if not samples:
        raise ConfigError(f"{path}: no samples (the file is empty)")
    return samples


def prompt_messages(sample: Sample) -> list[dict[str, str]]:
    """The messages a regenerated response answers: leading system message(s) + the first user turn."""
    leading = []
    for message in sample.messages:
        if message["role"] == "user":
            return leading + [dict(message)]
        if message["role"] != "system":
            break
        leading.append(dict(message))
    raise ConfigError(f"{sample.where}: sample {sample.id!r} does not start with a user turn (after optional system messages)")
