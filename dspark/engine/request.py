"""A generation request and its decoding state: the one type the scheduler, the speculative step,
`generate()` and the engine pass around."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Hashable

import torch

from dspark.decoding.sampling import SamplingParams
from dspark.engine.stats import RoundRecord, SpecStats


class Status(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted: its KV freed, its output kept)
    RUNNING = "running"  # admitted: prefilling (num_computed < prefill length) or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """What to generate (set by the caller) and how far it got (updated by every step). Compared by identity.

    prompt_ids: the prompt's token ids (≥ 1); max_new_tokens: tokens to generate at most; stop_token_ids:
    generation ends after one of these is emitted (kept in `output_ids`); stop: stop strings (need the
    engine's tokenizer; the text is cut before them); seed: the request's own random stream (None: one
    drawn from the engine's generator); speculate: False = this request verifies no drafts (ℓ = 0) in a
    speculative batch; record_rounds: keep a RoundRecord per step; logprobs: None, or the number of most
    likely alternatives to report with each emitted token's target log-probability (`output_logprobs`,
    `dspark.decoding.sampling.token_logprobs`); text_per_token: the engine's outputs split their new text
    into one piece per emitted token (token-by-token streaming).
    """

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop_token_ids: frozenset[int] = frozenset()
    speculate: bool = True
    request_id: Hashable = 0
    record_rounds: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    text_per_token: bool = False
    # -- state -----------------------------------------------------------------------------------------
    status: Status = Status.WAITING
    seq_id: int | None = None  # the target KV cache's handle (also the drafter's and the policy's key)
    output_ids: list[int] = field(default_factory=list)  # generated tokens, a stop token included
    output_logprobs: list = field(default_factory=list)  # with `logprobs`: one (logprob, top) per output token
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_computed: int = 0  # tokens in the target's cache (after each commit: prompt + output − 1)
    generator: torch.Generator | None = None  # this request's random stream (`dspark.decoding.randomness`)
    pending_features: list[torch.Tensor] = field(default_factory=list)  # [n_i, L·H] parts not yet given to the drafter
    stats: SpecStats = field(default_factory=SpecStats)
    rounds: list[RoundRecord] = field(default_factory=list)
    num_preemptions: int = 0
    detokenizer: object | None = None  # `dspark.engine.detokenizer.IncrementalDetokenizer` with a tokenizer
    arrival_time: float = 0.0  # time.perf_counter() seconds
    scheduled_time: float | None = None  # first admitted to run (the end of its queue time)
    first_token_time: float | None = None
    finish_time: float | None = None

    def drafter_features(self) -> torch.Tensor | None:
        """The target features the drafter has not seen, as one tensor [n, L·H] (None when there are none).
        Parts are joined only here, when the drafter runs: a request whose drafter is skipped for many steps
        (gate closed, speculation off) appends one part per step instead of copying its whole backlog."""
        if not self.pending_features:
            return None
        if len(self.pending_features) > 1:
            self.pending_features = [torch.cat(self.pending_features)]
        return self.pending_features[0]

    @property
    def last_token(self) -> int:
        """x0 of the next step: the newest token, not yet run by the target."""
        return self.output_ids[-1]

    @property
    def token_ids(self) -> list[int]:
        """Prompt + generated tokens."""
        return list(self.prompt_ids) + self.output_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What the target must hold before the request can decode: the prompt, or — after a preemption —
        the prompt and every generated token but the newest (x0 of the next step, not yet run)."""
        return list(self.prompt_ids) + self.output_ids[:-1]

    @property
    def prefill_length(self) -> int:
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def prefilling(self) -> bool:
        """Running and its target cache does not hold `prefill_ids` yet (a new request: no first token yet)."""
        return self.status is Status.RUNNING and (not self.output_ids or self.num_computed < self.prefill_length)

    @property
    def resuming(self) -> bool:
        """Recomputing after a preemption: its prefill emits no token."""
        return bool(self.output_ids)

    @property
    def room(self) -> int:
        """Tokens it may still generate."""
        return self.max_new_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def batch_invariant(self) -> bool:
        """A seeded sampled request: its tokens must not depend on the rest of the batch (planned as if alone)."""
        return self.seed is not None and not self.sampling.greedy

    def emit(self, tokens: list[int]) -> list[int]:
        """Append `tokens` cut at the first stop token (kept) and at max_new_tokens; set the finish reason.
        Returns the tokens actually appended."""
        room = self.room
        cut, reason = tokens, None
        for i, tok in enumerate(tokens):
            if tok in self.stop_token_ids:
                if i + 1 <= room:
                    cut, reason = tokens[: i + 1], "stop"
                break
        if reason is None and len(cut) >= room:
            cut, reason = cut[:room], "length"
        self.output_ids.extend(cut)
        self.finish_reason = reason
        return cut
