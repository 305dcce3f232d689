"""Chat rendering, in one place: the prompt of one user turn (`dspark generate --chat`, the demo), the
prompt of a sample (`dspark eval`, `dspark data regenerate`), and whole conversations with their response
loss mask (drafter training, feature caches).

Rendering uses the tokenizer's own chat template (`apply_chat_template` to text, then tokenised without
adding special tokens — exactly what HF does with `tokenize=True`). When the tokenizer has no chat template,
`FALLBACK_CHAT_TEMPLATE` is used instead:

    [bos_token]                                        (only if the tokenizer has one)
    "System:\\n<content>\\n\\n"   "User:\\n<content>\\n\\n"   "Assistant:\\n<content><eos_token>\\n\\n"
    generation prompt: "Assistant:\\n"

`DEFAULT_TEMPLATE_KWARGS` ({"enable_thinking": false}: the paper evaluates without thinking; templates that
do not know the variable ignore it) is what generate, the demo and eval render prompts with, so the same
user turn gives the same tokens in all three.

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
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from dspark.errors import ConfigError, RequestError

if TYPE_CHECKING:
    from dspark.data.samples import Sample

DEFAULT_TEMPLATE_KWARGS = MappingProxyType({"enable_thinking": False})  # read-only

FALLBACK_CHAT_TEMPLATE = (  # newlines as string expressions: HF renders with trim_blocks=True
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)


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


def json_type(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages ("null", "str", "list", ...)."""
    return "null" if value is None else type(value).__name__


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
        folder = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigError(f"{where}: the chat template of {folder} cannot render this conversation ({detail})") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the chat template returned {json_type(text)}, expected text")
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


def render_prompt(tokenizer, text: str, chat: bool, what: str = "prompt",
                  template_kwargs: Mapping[str, Any] | None = DEFAULT_TEMPLATE_KWARGS) -> list[int]:
    """Token ids of a prompt: with `chat`, one user turn through the chat template with the generation
    prompt (`render_text` + `encode`, as every command renders prompts); without, the raw text with the
    tokenizer's special tokens. `what` names the text in errors (RequestError when it is not valid UTF-8;
    ConfigError naming `what` when the chat template cannot render it)."""
    check_text(text, what)
    if chat:
        rendered = render_text(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True,
                               template_kwargs=template_kwargs, where=what)
        return encode(tokenizer, rendered)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def render_sample_prompt(tokenizer, sample: Sample, *, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of `prompt_messages(sample)` with the generation prompt (assistant header) on."""
    from dspark.data.samples import prompt_messages

    text = render_text(tokenizer, prompt_messages(sample), add_generation_prompt=True,
                       template_kwargs=template_kwargs, where=f"{sample.where} (id {sample.id!r})")
    return encode(tokenizer, text)
