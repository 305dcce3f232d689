"""Prompt / conversation JSONL files, chat-template rendering and the response loss mask (SPEC §2.6).

Input format: one JSON object per line (blank lines are ignored), in either of two shapes:

    {"id": ..., "turns": ["user message", ...]}                              (prompts only)
    {"id": ..., "conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

"id" is optional (a string or an integer); without it a sample's id is its 0-based index among the
file's non-blank lines, so it is stable across runs as long as the file is not edited. Ids must be
unique within a file. Other top-level keys (e.g. the "finish_reason" / "num_tokens" that
`dspark data regenerate` writes) are ignored. Every malformed line is reported as `FILE:LINE: problem`.

Rendering uses the target tokenizer's own chat template (`apply_chat_template`, text first, then
tokenised without adding special tokens — exactly what HF does with `tokenize=True`). When the tokenizer
has no chat template, `FALLBACK_CHAT_TEMPLATE` is used instead:

    [bos_token]                                        (only if the tokenizer has one)
    "System:\\n<content>\\n\\n"   "User:\\n<content>\\n\\n"   "Assistant:\\n<content><eos_token>\\n\\n"
    generation prompt: "Assistant:\\n"

Loss mask (1 = the token is supervised): exactly the tokens of every assistant response — its content
and the end-of-turn marker the template renders after it (e.g. `<|im_end|>\\n`), but not the assistant
header (`<|im_start|>assistant\\n`). It is derived from token counts of rendered prefixes, never from a
regex over the text: for the assistant message j, the response starts after
`render(messages[:j], add_generation_prompt=True)` and ends after `render(messages[:j+1])`. Both
prefixes are checked to tokenise to an exact prefix of the whole conversation's tokens; a template for
which that fails (one that renders earlier turns differently once later turns exist) is reported as a
`ConfigError` naming the sample instead of producing a wrong mask.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dspark.errors import ConfigError
from dspark.models.tokenizer import check_text

ROLES = ("system", "user", "assistant")

FALLBACK_CHAT_TEMPLATE = (  # newlines as string expressions: HF renders with trim_blocks=True
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Sample:
    """One line of a prompt / conversation file."""

    id: str | int  # the line's "id", else `index`
    index: int  # 0-based index among the file's non-blank lines
    messages: tuple[dict[str, str], ...]  # {"role": one of ROLES, "content": str}, in order
    where: str  # "FILE:LINE", for error messages


@dataclass
class TokenizedSample:
    """A rendered conversation: token ids and the response loss mask, both [S]."""

    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] bool, True on assistant response tokens (end-of-turn included)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


# -- reading -------------------------------------------------------------------------------------------


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_sample(obj: Any, *, index: int, where: str) -> Sample:
    """Validate one decoded JSON line (either format) and return it as a `Sample`."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_type(obj)}")
    sample_id = obj.get("id", index)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise ConfigError(f"{where}: \"id\" must be a string or an integer, got {_type(sample_id)}")
    has_turns, has_conv = "turns" in obj, "conversations" in obj
    if has_turns == has_conv:
        problem = "both" if has_turns else "neither"
        raise ConfigError(f"{where}: a sample needs exactly one of \"turns\" or \"conversations\" (found {problem})")
    if has_turns:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{where}: \"turns\" must be a non-empty list of strings, got {_type(turns)}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise ConfigError(f"{where}: \"turns\"[{i}] must be a string, got {_type(turn)}")
            check_text(turn, f"{where}: \"turns\"[{i}]", ConfigError)
        messages = tuple({"role": "user", "content": turn} for turn in turns)
    else:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ConfigError(f"{where}: \"conversations\" must be a non-empty list of messages, got {_type(conv)}")
        parsed = []
        for i, message in enumerate(conv):
            if not isinstance(message, dict):
                raise ConfigError(f"{where}: \"conversations\"[{i}] must be an object, got {_type(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise ConfigError(f"{where}: \"conversations\"[{i}] has no \"{key}\"")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ConfigError(f"{where}: \"conversations\"[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ConfigError(f"{where}: \"conversations\"[{i}].content must be a string, got {_type(content)}")
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


# -- rendering -----------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_info(tokenizer) -> dict[str, str]:
    """Which template renders conversations ("tokenizer" or "fallback") and the sha256 of its text."""
    if has_chat_template(tokenizer):
        template = tokenizer.chat_template
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        source = "tokenizer"
    else:
        text, source = FALLBACK_CHAT_TEMPLATE, "fallback"
    return {"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def render_text(
    tokenizer,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool,
    template_kwargs: dict | None = None,
    where: str = "",
) -> str:
    """The conversation as text, through the tokenizer's chat template (or `FALLBACK_CHAT_TEMPLATE`)."""
    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja2 raises several types (TemplateError, TypeError from filters, ...)
        raise ConfigError(f"{where}: the chat template cannot render this conversation ({type(exc).__name__}: {exc})") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the chat template returned {_type(text)}, expected text")
    return text


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text; the template already placed every special token it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _rendered_prefix(tokenizer, messages, full_text: str, *, add_generation_prompt: bool, template_kwargs,
                     where: str) -> int:
    """Length (characters) of the rendered first messages, checked to be a text prefix of the whole."""
    text = render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                       template_kwargs=template_kwargs, where=where)
    if not full_text.startswith(text):
        raise ConfigError(
            f"{where}: the chat template does not render this conversation incrementally (the first "
            f"{len(messages)} message(s){' plus the generation prompt' if add_generation_prompt else ''} do not "
            "render to a prefix of the whole conversation), so the response loss mask cannot be derived; "
            "use single-turn conversations (as `dspark data regenerate` writes) or another template"
        )
    return len(text)


def tokenize_conversation(
    tokenizer, messages: Sequence[dict[str, str]], *, template_kwargs: dict | None = None, where: str = ""
) -> TokenizedSample:
    """Render a whole conversation (no generation prompt) → token ids [S] and the response loss mask [S].

    The rendered text is cut where each assistant response starts (after its header, i.e. the generation
    prompt) and ends, and every piece is tokenised on its own: the prompt part gives exactly the ids that
    inference feeds the target (rendered with the generation prompt and tokenised alone), and a BPE merge
    can never straddle a prompt/response boundary (byte-level BPE would otherwise merge the header's
    newline with a response's leading indentation)."""
    full_text = render_text(tokenizer, messages, add_generation_prompt=False, template_kwargs=template_kwargs, where=where)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        kwargs = dict(template_kwargs=template_kwargs, where=where)
        start = _rendered_prefix(tokenizer, messages[:j], full_text, add_generation_prompt=True, **kwargs)
        end = _rendered_prefix(tokenizer, messages[: j + 1], full_text, add_generation_prompt=False, **kwargs)
        if end < start:
            raise ConfigError(f"{where}: assistant message {j} ends (character {end}) before its header ends ({start})")
        spans.append((start, end))
    cuts = sorted({0, len(full_text), *(c for span in spans for c in span)})
    ids: list[int] = []
    mask: list[bool] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = encode(tokenizer, full_text[a:b])
        ids.extend(piece)
        mask.extend([any(s <= a and b <= e for s, e in spans)] * len(piece))
    return TokenizedSample(input_ids=torch.tensor(ids, dtype=torch.long), loss_mask=torch.tensor(mask, dtype=torch.bool))


def tokenize_sample(
    tokenizer, sample: Sample, *, max_length: int | None = None, template_kwargs: dict | None = None
) -> TokenizedSample:
    """`tokenize_conversation` of a sample, right-truncated to `max_length` tokens (None = no limit)."""
    out = tokenize_conversation(tokenizer, sample.messages, template_kwargs=template_kwargs,
                                where=f"{sample.where} (id {sample.id!r})")
    if max_length is not None and out.num_tokens > max_length:
        out = TokenizedSample(out.input_ids[:max_length].clone(), out.loss_mask[:max_length].clone())
    return out


def regeneration_messages(sample: Sample) -> list[dict[str, str]]:
    """The messages a regenerated response answers: leading system message(s) + the first user turn."""
    leading = []
    for message in sample.messages:
        if message["role"] == "user":
            return leading + [dict(message)]
        if message["role"] != "system":
            break
        leading.append(dict(message))
    raise ConfigError(f"{sample.where}: sample {sample.id!r} does not start with a user turn (after optional system messages)")


def render_regeneration_prompt(tokenizer, sample: Sample, *, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of `regeneration_messages(sample)` with the generation prompt (assistant header) on."""
    text = render_text(tokenizer, regeneration_messages(sample), add_generation_prompt=True,
                       template_kwargs=template_kwargs, where=f"{sample.where} (id {sample.id!r})")
    return encode(tokenizer, text)
