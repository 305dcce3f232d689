"""Speculative-decoding statistics, with the paper's and vLLM's definitions (docs/design.md §1, §3, §6).

τ (accepted length, "mean acceptance length") of a round = tokens the round emits = accepted drafts + 1
(the correction or bonus token), or the accepted drafts up to and including a stop token when one is
accepted (no bonus then). Acceptance rate = accepted drafts / verified drafts (no bonus).
Position-wise *conditional* acceptance at slot k = P(slot k accepted | slots < k accepted);
*prefix survival* at slot k = P(slots ≤ k all accepted), both over rounds that verified slot k.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundRecord:
    drafted: int  # tokens the drafter proposed
    verified: int  # tokens sent to the target for verification (ℓ)
    accepted: int  # drafts accepted by the rejection rule (≤ verified)
    emitted: int  # tokens the round added to the output (after stop-token / length cut)
    # The drafter's conditional confidences c_k of the drafted slots (len = drafted, as reported, before any
    # scheduling), recorded with generate(record_rounds=True) when the drafter gives them; else None.
    # With `verified` and `accepted` this replays the round for calibration (docs/design.md §4) and simulation (§5).
    confidences: list[float] | None = None


@dataclass
class SpecStats:
    """Aggregates over rounds. Per-position lists are indexed by slot (0 = first draft)."""

    rounds: int = 0
    drafts: int = 0  # rounds that verified at least one draft (vLLM's num_drafts)
    drafted_tokens: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    verified_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    reached_per_position: list[int] = field(default_factory=list)  # slot k verified and slots < k accepted

    def add(self, record: RoundRecord) -> None:
        self.rounds += 1
        self.drafts += record.verified > 0
        self.drafted_tokens += record.drafted
        self.verified_tokens += record.verified
        self.accepted_tokens += record.accepted
        self.emitted_tokens += record.emitted
        grow = record.verified - len(self.verified_per_position)
        if grow > 0:
            self.verified_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
            self.reached_per_position.extend([0] * grow)
        for k in range(record.verified):
            self.verified_per_position[k] += 1
            if record.accepted >= k:
                self.reached_per_position[k] += 1
        for k in range(record.accepted):
            self.accepted_per_position[k] += 1

    def merge(self, other: "SpecStats") -> None:
        self.rounds += other.rounds
        self.drafts += other.drafts
        self.drafted_tokens += other.drafted_tokens
        self.verified_tokens += other.verified_tokens
        self.accepted_tokens += other.accepted_tokens
        self.emitted_tokens += other.emitted_tokens
        width = max(len(self.verified_per_position), len(other.verified_per_position))
        for name in ("verified_per_position", "accepted_per_position", "reached_per_position"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([0] * (width - len(mine)))
            for k, v in enumerate(theirs):
                mine[k] += v

    @property
    def mean_accepted_length(self) -> float | None:
        """τ: emitted tokens per round (includes the bonus/correction token)."""
        return self.emitted_tokens / self.rounds if self.rounds else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.verified_tokens if self.verified_tokens else None

    @property
    def prefix_survival(self) -> list[float]:
        """P(slots ≤ k all accepted | slot k verified) for each slot k."""
        return [a / v if v else 0.0 for a, v in zip(self.accepted_per_position, self.verified_per_position)]

    @property
    def conditional_acceptance(self) -> list[float]:
        """P(slot k accepted | slots < k accepted and slot k verified)."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_per_position, self.reached_per_position)]

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafts": self.drafts,
            "drafted_tokens": self.drafted_tokens,
            "verified_tokens": self.verified_tokens,
            "accepted_tokens": self.accepted_tokens,
            "emitted_tokens": self.emitted_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": self.acceptance_rate,
            "verified_per_position": list(self.verified_per_position),
            "accepted_per_position": list(self.accepted_per_position),
            "reached_per_position": list(self.reached_per_position),
            "prefix_survival": self.prefix_survival,
            "conditional_acceptance": self.conditional_acceptance,
        }
