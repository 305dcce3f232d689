"""Sampling parameters and the one function that turns logits into the distribution sampled from.

`logits_to_probs` is used for the target in plain decoding *and* in verification, and by drafters for
their proposal distribution q, so every path processes logits identically (docs/design.md §1, pitfall 2).
Order of operations, as in HF transformers: temperature → top-k → top-p, then softmax in float32.
Temperature 0 means greedy: the distribution is the one-hot of the argmax, which makes the rejection
rule reduce exactly to "accept while the draft equals the target's argmax" (docs/design.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from dspark.devices import to_device
from dspark.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 → greedy; top_k 0 → off; top_p 1.0 → off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number ≥ 0, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise RequestError(f"top_k must be an integer ≥ 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _probs_one_setting(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] → probs [N, V] float32 for one parameter setting."""
    logits = logits.to(torch.float32)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)  # no host read
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def logits_to_probs(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]) -> torch.Tensor:
    """Distribution actually sampled from. logits [..., V] (any float dtype) → float32 [..., V].

    `params` is one setting for all rows, or one per row of the leading dimension.
    """
    if isinstance(params, SamplingParams):
        shape = logits.shape
        return _probs_one_setting(logits.reshape(-1, shape[-1]), params).reshape(shape)
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} sampling settings for {logits.shape[0]} rows")
    if all(p == params[0] for p in params):
        return logits_to_probs(logits, params[0])
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    groups: dict[SamplingParams, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p, []).append(row)
    indices = to_device([torch.tensor(rows, dtype=torch.long) for rows in groups.values()], logits.device)
    for p, index in zip(groups, indices):
        out[index] = logits_to_probs(logits[index], p)
    return out


@dataclass
class RowSampling:
    """Per-row sampling parameters as tensors (on the logits' device), for code that must not branch on the host
    (a captured graph): `logits_to_probs_by_row`."""

    temperature: torch.Tensor  # [N] float32 (any value on greedy rows)
    top_k: torch.Tensor  # [N] long, 0 = off
    top_p: torch.Tensor  # [N] float32, 1 = off
    greedy: torch.Tensor  # [N] bool
    mode: str = "filtered"  # the work every row pays for: "greedy" | "temperature" | "filtered" (`mode_of`)

    @staticmethod
    def mode_of(params: Sequence[SamplingParams]) -> str:
        """"greedy" when every row is greedy, "temperature" when no row uses top-k or top-p, else "filtered"
        (the vocabulary sorts of top-k and top-p, paid by every row)."""
        if all(p.greedy for p in params):
            return "greedy"
        if all(p.greedy or (p.top_k == 0 and p.top_p == 1.0) for p in params):
            return "temperature"
        return "filtered"

    @staticmethod
    def host_tensors(params: Sequence[SamplingParams], padded_rows: int) -> list[torch.Tensor]:
        """The four fields for `params`, padded with greedy rows to `padded_rows`, as host tensors (to be moved
        with `to_device`)."""
        pad = padded_rows - len(params)
        return [torch.tensor([p.temperature if not p.greedy else 1.0 for p in params] + [1.0] * pad, dtype=torch.float32),
                torch.tensor([p.top_k for p in params] + [0] * pad, dtype=torch.long),
                torch.tensor([p.top_p for p in params] + [1.0] * pad, dtype=torch.float32),
                torch.tensor([p.greedy for p in params] + [True] * pad, dtype=torch.bool)]


def logits_to_probs_by_row(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """`logits_to_probs` with row n's parameters given as tensors: logits [N, V] → probs [N, V] float32, the
    same values row by row (the same operations in the same order: temperature → top-k → softmax → top-p;
    the k-th largest value read from a descending sort instead of `topk`), without a host read or a branch
    on the parameters' values. `rows.mode` picks the work all rows share: one-hot only ("greedy"), softmax at
    each row's temperature ("temperature"), or also the sorts of top-k and top-p ("filtered")."""
    logits = logits.to(torch.float32)
    vocab = logits.shape[-1]
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if rows.mode == "greedy":
        return one_hot
    scaled = logits / rows.temperature.unsqueeze(-1)
    if rows.mode == "temperature":
        return torch.where(rows.greedy.unsqueeze(-1), one_hot, torch.softmax(scaled, dim=-1))
    descending = torch.sort(scaled, dim=-1, descending=True).values
    use_k = (rows.top_k > 0) & (rows.top_k < vocab)
    kth = descending.gather(-1, (rows.top_k.clamp(1, vocab) - 1).unsqueeze(-1))
    scaled = torch.where(use_k.unsqueeze(-1) & (scaled < kth), float("-inf"), scaled)
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= rows.top_p.unsqueeze(-1)
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    nucleus = probs.masked_fill(drop, 0.0)
    nucleus = nucleus / nucleus.sum(-1, keepdim=True)
    probs = torch.where((rows.top_p < 1.0).unsqueeze(-1), nucleus, probs)
    return torch.where(rows.greedy.unsqueeze(-1), one_hot, probs)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from probs [N, V] (float32) → [N] long: by inverse CDF from `uniforms` [N] in
    [0, 1) when given (the engine draws them per request: `dspark.decoding.randomness`), else by
    torch.multinomial with `generator`. Both draw exactly from probs; a token of probability 0 is never
    drawn (the first index whose cumulative mass exceeds u·total)."""
    if uniforms is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = torch.cumsum(probs, dim=-1)
    point = uniforms.to(cdf.device, cdf.dtype).reshape(-1, 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from logits [N, V] under row n's `params[n]`, from uniforms [N] (on the host) → [N]
    long on the logits' device: greedy rows by argmax (the distribution `logits_to_probs` gives them is its one-hot, so
    this is the same token without a [N, V] temporary), the others by `sample` of `logits_to_probs`."""
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} sampling settings for {logits.shape[0]} rows")
    tokens = logits.argmax(-1)
    sampled = [n for n, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, dtype=torch.long)
        device_rows, row_uniforms = to_device([rows, uniforms.cpu()[rows]], logits.device)
        probs = logits_to_probs(logits[device_rows], [params[n] for n in sampled])
        tokens[device_rows] = sample(probs, uniforms=row_uniforms)
    return tokens


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Log-probabilities the *target* gives the emitted tokens, for OpenAI's `logprobs`: logits [N, V] (row i
    predicts tokens[i]) → per token (its log-probability, the `top` most likely tokens with theirs).

    They are the model's own distribution (log-softmax of the raw logits, as vLLM's default `raw_logprobs`):
    independent of temperature, top-k and top-p, and of whether a draft or the target proposed the token
    (speculation does not change them)."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    index = torch.as_tensor(list(tokens), dtype=torch.long, device=logp.device)
    chosen = logp.gather(-1, index[:, None]).squeeze(-1).tolist()
    if top <= 0:
        return [(c, []) for c in chosen]
    values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
