"""The random numbers one step consumes, drawn up front, one fixed-size block per request.

Every random choice of a step is a uniform in [0, 1): the drafter's draw of slot k (inverse CDF of q_k),
the acceptance test of slot k (u·q < p), and the correction / bonus token (inverse CDF). A `StepRandom`
holds, per request row, `draft_width` + `accept_width` + 1 uniforms in that order, so:

* `generate()` draws the whole block from its one seeded generator (one call per step);
* the engine draws each row from its request's own generator, the same count every step whatever
  happens in the step, so a request's random stream never depends on what else is in the batch, how
  many drafts were verified for the others, or whether the drafter ran (`from_generators`).

A prefill that emits a request's first token uses one more uniform (`first_token_uniforms`).
"""

from __future__ import annotations

from typing import Sequence

import torch


class StepRandom:
    """uniforms [B, draft_width + accept_width + 1] float64 on the CPU (row b: request b of the step)."""

    def __init__(self, uniforms: torch.Tensor, draft_width: int, accept_width: int):
        self.uniforms = uniforms
        self.draft_width = draft_width
        self.accept_width = accept_width

    @classmethod
    def from_generator(cls, generator: torch.Generator, rows: int, draft_width: int, accept_width: int) -> "StepRandom":
        width = draft_width + accept_width + 1
        return cls(torch.rand(rows, width, generator=generator, dtype=torch.float64), draft_width, accept_width)

    @classmethod
    def from_generators(cls, generators: Sequence[torch.Generator], draft_width: int, accept_width: int) -> "StepRandom":
        width = draft_width + accept_width + 1
        if not generators:
            return cls(torch.empty(0, width, dtype=torch.float64), draft_width, accept_width)
        rows = [torch.rand(width, generator=g, dtype=torch.float64) for g in generators]
        return cls(torch.stack(rows), draft_width, accept_width)

    def draft(self, row: int) -> torch.Tensor:
        """[draft_width] the uniforms row `row`'s drafter draws use (slot k: entry k)."""
        return self.uniforms[row, : self.draft_width]

    def verification(self) -> torch.Tensor:
        """[B, accept_width + 1]: acceptance uniforms of slots 0..accept_width−1, then the final token's."""
        return self.uniforms[:, self.draft_width:]


def first_token_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[N]: one uniform per request, from its own generator, for the token its prefill emits."""
    return torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]) if generators else torch.empty(0)
