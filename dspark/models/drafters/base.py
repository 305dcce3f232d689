"""The drafter interface, shaped to fit every drafter of docs/design.md §2.

A round, per sequence: the generation loop hands the drafter the token history (the last token, x0 or
"anchor", is the target's newest token and not yet processed by the target), the target features of the
positions verified since the previous round (feature-conditioned drafters: DSpark, DFlash, EAGLE-3,
MTP), and how many tokens it may propose. The drafter returns tokens, the exact float32 distributions
it sampled them from (or None if deterministic), and optionally per-position confidences c_k
(DSpark's confidence head: the raw logits of P(slot k survives | slots < k accepted), docs/design.md §2.4;
calibration is the controller's, `dspark.scheduling.controller`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from dspark.decoding.sampling import SamplingParams
from dspark.errors import RequestError


@dataclass
class DraftInput:
    """What a drafter sees of one sequence in one round."""

    seq_id: int  # stable handle of the request for the drafter's own state (its KV cache, ...)
    token_ids: Sequence[int]  # prompt + generated so far; token_ids[-1] is x0, not yet run by the target
    new_features: torch.Tensor | None  # [n_new, L·H] target features of positions verified since the last call
    max_tokens: int  # at most this many drafts are useful this round (≥ 0; at 0 still ingest new_features)
    sampling: SamplingParams
    # [≥ block_size] uniforms in [0, 1): slot k's draft is the inverse CDF of q_k at uniforms[k]
    # (`dspark.decoding.randomness`); None: the drafter draws from the generator `propose` receives
    uniforms: torch.Tensor | None = None


def draft_uniforms(batch: list[DraftInput], width: int) -> torch.Tensor | None:
    """[B, width] the rows' draft uniforms, or None unless every row carries them."""
    if not batch or any(item.uniforms is None for item in batch):
        return None
    return torch.stack([item.uniforms[:width] for item in batch])


@dataclass
class DraftProposal:
    """Drafts for B sequences, padded to K = max proposed length."""

    tokens: torch.Tensor  # [B, K] long (padding: 0)
    lengths: torch.Tensor  # [B] long, proposed per sequence (≤ its max_tokens)
    probs: torch.Tensor | None = None  # [B, K, V] float32: the exact q each draft was sampled from
    # [B, K] float32: the raw (uncalibrated) logits of the conditional survivals c_k = σ(logit_k), paper
    # Eq. 7; calibration is applied by `dspark.scheduling.controller.SpeculationController`
    confidence_logits: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int) -> "DraftProposal":
        return cls(tokens=torch.zeros(batch, 0, dtype=torch.long), lengths=torch.zeros(batch, dtype=torch.long))


class Drafter(ABC):
    """Base class. Subclasses set `name`, `block_size` (γ: the most drafts per round, its trained block) and,
    if they read target features, `feature_layer_ids` (target decoder layers whose raw outputs they
    condition on, docs/design.md §2.1)."""

    name: str = "drafter"
    block_size: int = 7
    feature_layer_ids: tuple[int, ...] = ()
    provides_confidence: bool = False
    source = None  # the checkpoint folder it was loaded from (`load_drafter`), None for model-free drafters
    # Its own paged KV cache (PagedKVCache), if any: the engine sizes it together with the target's
    # (`dspark.engine.block_manager`); at most (verified context + block_size) positions per sequence.
    cache = None

    @property
    def needs_target_features(self) -> bool:
        return bool(self.feature_layer_ids)

    def check_num_draft_tokens(self, num: int) -> None:
        """Refuse to propose more tokens than the drafter was trained for (docs/design.md §6)."""
        if num > self.block_size:
            raise RequestError(
                f"drafter '{self.name}' proposes at most {self.block_size} tokens per round "
                f"(its trained block size); {num} were requested"
            )

    def check_target(self, target_config) -> None:
        """Raise if this drafter cannot serve the given target (vocabulary, hidden size, ...)."""

    @abstractmethod
    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        """Propose up to `max_tokens` drafts for every sequence of the batch."""

    def use_graphs(self, enabled: bool | None = None, *, max_batch: int = 256, attention="auto") -> None:
        """Replay the drafter's rounds of up to `max_batch` sequences from captured graphs, or run them eagerly
        (`--enforce-eager`); None: on CUDA only. attention: the rounds' attention kernel ("sdpa", "flex", "auto":
        `dspark.models.flex_paged.attention_kernel`); a paged kernel runs the rounds padded without graphs too.
        Drafters without a static round always run eagerly, with SDPA."""

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's state."""
