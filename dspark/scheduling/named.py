"""Verification policies by name: what users write (`dspark generate --scheduler`, `dspark simulate
--policies`, `dspark bench engine --policies`) → `VerificationPolicy` objects.

Names: plain (no drafter), verify-all, fixed-N (every fixed length 1..γ with "fixed"), threshold-T
("threshold" = threshold-0.5), algorithm-1 (paper §3.2.2 as published), causal-greedy (Algorithm 1 with the
staircase lookahead), causal-greedy-gated (the same behind the draft gate; the serving engine's default),
async-topk (paper §5.2), mtp-1 (an MTP-1 drafter verifying its one draft).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from dspark.errors import ConfigError
from dspark.scheduling.policies import (
    AsyncTopK,
    CausalGreedy,
    ConfidenceThreshold,
    FixedLength,
    VerificationPolicy,
    VerifyAll,
)
from dspark.scheduling.sps import SPSProfile

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class PolicySpec:
    """One simulated policy: kind ∈ plain | fixed | verify-all | threshold | algorithm-1 | causal-greedy |
    causal-greedy-gated | async-topk | mtp-1; param = n (fixed) or t (threshold)."""

    kind: str
    param: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "fixed":
            return f"fixed-{int(self.param)}"
        if self.kind == "threshold":
            return f"threshold-{self.param:g}"
        return self.kind


SIMPLE_NAMES = ("plain", "verify-all", "algorithm-1", "causal-greedy", "causal-greedy-gated", "async-topk", "mtp-1")
CONFIDENCE_POLICIES = ("threshold", "algorithm-1", "causal-greedy", "causal-greedy-gated", "async-topk")


def parse_policies(text: str | Sequence[str], block_size: int | None, option: str = "--policies") -> list[PolicySpec]:
    """"plain,fixed,fixed-3,verify-all,threshold,threshold-0.7,causal-greedy,async-topk,mtp-1" → specs
    ("fixed" = every fixed length 1..γ; "threshold" = threshold-0.5; "mtp" = mtp-1). block_size=None checks the
    names only (no fixed length is expanded or bounded). Errors name `option`, the flag that gave `text`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"{option}: give at least one policy")
    out: list[PolicySpec] = []
    for item in items:
        low = item.lower()
        if low in SIMPLE_NAMES or low == "mtp":
            out.append(PolicySpec("mtp-1" if low == "mtp" else low))
        elif low == "fixed":
            out.extend(PolicySpec("fixed", n) for n in range(1, (block_size or 0) + 1))
        elif low == "threshold":
            out.append(PolicySpec("threshold", DEFAULT_THRESHOLD))
        elif (m := re.fullmatch(r"fixed[-:](\d+)", low)):
            n = int(m.group(1))
            if n < 1 or (block_size is not None and n > block_size):
                bound = "" if block_size is None else f" ≤ the block size {block_size}"
                raise ConfigError(f"{option}: {item!r} needs a length n ≥ 1{bound}")
            out.append(PolicySpec("fixed", n))
        elif (m := re.fullmatch(r"threshold[-:]([0-9.]+)", low)):
            try:
                t = float(m.group(1))
            except ValueError:
                t = math.nan
            if not 0 <= t <= 1:
                raise ConfigError(f"{option}: {item!r} needs a threshold in [0, 1]")
            out.append(PolicySpec("threshold", t))
        else:
            raise ConfigError(f"{option}: unknown policy {item!r}; use plain, fixed, fixed-N, verify-all, "
                              "threshold, threshold-T, algorithm-1, causal-greedy, causal-greedy-gated, async-topk, mtp-1")
    return list(dict.fromkeys(out))


def make_policy(spec: PolicySpec, profile: SPSProfile | None) -> VerificationPolicy | None:
    """The policy object of a spec (None for plain decoding); algorithm-1, causal-greedy and async-topk need a
    profile."""
    if spec.kind == "fixed":
        return FixedLength(int(spec.param))
    if spec.kind == "verify-all":
        return VerifyAll()
    if spec.kind == "threshold":
        return ConfidenceThreshold(float(spec.param))
    if spec.kind in ("causal-greedy", "causal-greedy-gated"):
        return CausalGreedy(profile)
    if spec.kind == "algorithm-1":
        return CausalGreedy(profile, lookahead=False)
    if spec.kind == "async-topk":
        return AsyncTopK(profile)
    if spec.kind == "mtp-1":
        return FixedLength(1)
    return None  # plain
