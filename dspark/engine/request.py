"""A generation request and its decoding state: the one type the speculative step, `generate()` and the
engine pass around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from dspark.decoding.sampling import SamplingParams
from dspark.engine.stats import RoundRecord, SpecStats


@dataclass
class Request:
    """What to generate (set by the caller) and how far it got (updated by every step).

    prompt_ids: the prompt's token ids (≥ 1); max_new_tokens: tokens to generate at most; stop_token_ids:
    generation ends after one of these is emitted (kept in the output); speculate: False = this request
    verifies no drafts (ℓ = 0) in a speculative batch; record_rounds: keep a RoundRecord per step.
    """

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop_token_ids: frozenset[int] = frozenset()
    speculate: bool = True
    request_id: Hashable = 0
    record_rounds: bool = False
    # -- state -----------------------------------------------------------------------------------------
    seq_id: int | None = None  # the target KV cache's handle (also the drafter's and the policy's key)
    output_ids: list[int] = field(default_factory=list)  # generated tokens, a stop token included
    finish_reason: str | None = None  # "stop" (stop token) | "length" (max_new_tokens or the context)
    pending_features: torch.Tensor | None = None  # [n, L·H] target features not yet given to the drafter
    stats: SpecStats = field(default_factory=SpecStats)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def last_token(self) -> int:
        """x0 of the next step: the newest token, not yet run by the target."""
        return self.output_ids[-1]

    @property
    def token_ids(self) -> list[int]:
        """Prompt + generated tokens."""
        return list(self.prompt_ids) + self.output_ids

    @property
    def room(self) -> int:
        """Tokens it may still generate."""
        return self.max_new_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

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
