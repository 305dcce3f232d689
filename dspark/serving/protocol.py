"""OpenAI's request bodies, checked strictly, and the responses built from engine outputs (docs/serving.md).

Bodies are parsed by `parse_body`: bytes → UTF-8 → JSON object → a pydantic model with unknown fields
forbidden and no type coercion ("5" is not an integer, true is not a number, NaN is not a temperature).
Every failure is an `APIError` 400 naming the field in `param` and in the message — never FastAPI's 422.
OpenAI fields dspark does not implement (tools, response_format other than text, penalties, best_of, echo,
suffix, logit_bias) are refused with a 400 that says so, rather than silently ignored.

Extensions to OpenAI's fields (vLLM's habits where vLLM has one):
  top_k (0 or -1 = off), ignore_eos, stop_token_ids, request_id (vLLM's names);
  speculative: false — this request verifies no drafts (it still shares the batch; docs/serving.md);
  spec_decode_stats: true — the response carries a `speculative_decoding` object (per-request statistics);
  return_token_ids: true — each choice carries its prompt and output token ids (vLLM's name);
  stream_options.token_by_token: true — one chunk per token instead of one per engine step.
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspark.decoding.sampling import MAX_TOP_LOGPROBS
from dspark.engine.stats import SpecStats
from dspark.serving.errors import APIError

MAX_SEED = 2**63 - 1
MAX_N = 16  # choices per request (n), and prompts per completions request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`

UNSUPPORTED = {  # field → the value that means "not used" (any other value is refused)
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "parallel_tool_calls": None,
    "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "echo": False, "suffix": None,
    "audio": None, "modalities": None, "prediction": None, "web_search_options": None,
}
IGNORED = ("user", "metadata", "store", "service_tier", "reasoning_effort")  # accepted, no effect on generation
TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False
    token_by_token: bool = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class CommonRequest(StrictModel):
    """Fields both endpoints share; defaults are OpenAI's."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    request_id: str | None = Field(None, max_length=256)
    speculative: bool = True
    spec_decode_stats: bool = False
    return_token_ids: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_by_token(self) -> bool:
        return self.stream_options is not None and self.stream_options.token_by_token


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens (OpenAI)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts (text or token ids), at least one, at most MAX_N."""
        p = self.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items or any(len(x) == 0 for x in items):
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if len(items) > MAX_N:
            raise APIError(400, f"prompt: at most {MAX_N} prompts per request, got {len(items)}", param="prompt")
        return items


def _param(loc: tuple) -> str:
    """A pydantic error location without its union-member tags ("stop.list[str].0" → "stop.0")."""
    parts = [str(x) for x in loc if isinstance(x, int) or ("[" not in str(x) and str(x) not in TYPE_TAGS
                                                            and not str(x).startswith("function-"))]
    return ".".join(parts)


def parse_body(raw: bytes, model: type[StrictModel]) -> StrictModel:
    """Request body bytes → a checked request, or APIError 400 naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_body") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_body")
    for name, unused in UNSUPPORTED.items():
        if name in data and data[name] != unused and not (unused is None and data[name] in ({}, [])):
            raise APIError(400, f"{name} is not supported by dspark serve (only {json.dumps(unused)})", param=name,
                           code="unsupported_field")
    response_format = data.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise APIError(400, 'response_format is not supported by dspark serve (only {"type": "text"})',
                       param="response_format", code="unsupported_field")
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED and k != "response_format"}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(error["loc"])
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"unknown field {param!r}", param=param, code="unknown_field") from None
        message = error["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param or None,
                       code="invalid_value") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_body") from None


# -- responses --------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def spec_decode_report(stats: SpecStats) -> dict:
    """Per-request speculation statistics (vLLM's per-request spec-decode metrics; docs/design.md §6):
    mean acceptance length τ = 1 + accepted / steps that verified drafts, acceptance rate = accepted / verified,
    acceptance_histogram[k] = rounds that accepted exactly k drafts, per-position acceptance = P(slot k accepted |
    slot k verified)."""
    rounds, accepted = stats.rounds, stats.accepted_per_position
    reached = [rounds] + accepted  # rounds with ≥ k drafts accepted, k = 0, 1, ...
    histogram = [reached[k] - reached[k + 1] for k in range(len(accepted))] + ([reached[-1]] if rounds else [])
    return {
        "num_spec_steps": stats.drafts,
        "num_steps": rounds,
        "num_draft_tokens": stats.verified_tokens,
        "num_accepted_draft_tokens": stats.accepted_tokens,
        "num_proposed_draft_tokens": stats.drafted_tokens,
        "mean_acceptance_length": 1 + stats.accepted_tokens / stats.drafts if stats.drafts else None,
        "tokens_per_step": stats.mean_accepted_length,
        "draft_acceptance_rate": stats.acceptance_rate,
        "acceptance_histogram": histogram,
        "acceptance_rate_per_position": stats.prefix_survival,
        "verified_per_position": list(stats.verified_per_position),
        "accepted_per_position": list(accepted),
    }


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, token_ids: list[int], entries: list) -> dict:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [dict(item(t, lp), top_logprobs=[item(i, v) for i, v in top])
                        for t, (lp, top) in zip(token_ids, entries)]}


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, text_offset: int) -> dict:
    """OpenAI completions `logprobs`: parallel lists tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets, at = [], text_offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for _, top in entries:
        by_text: dict[str, float] = {}
        for i, v in top:  # most likely first; tokens that decode alike (partial bytes) keep the likeliest
            by_text.setdefault(token_text(tokenizer, i), _finite(v))
        tops.append(by_text)
    return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def _finite(value: float) -> float:
    """JSON has no -inf: a token of probability 0 (impossible under the target, e.g. after top-k) reports the
    smallest float, as OpenAI-compatible servers do."""
    return value if math.isfinite(value) else -9999.0
