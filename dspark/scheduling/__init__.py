"""Hardware-aware verification scheduling (paper §3.2): SPS step-time profiles, verification-length policies
that choose, per round, how many drafts of each request the target verifies, policies by name, and the
draft gate."""

from dspark.scheduling.gate import DraftGate
from dspark.scheduling.policies import (
    AsyncTopK,
    CausalGreedy,
    ConfidenceThreshold,
    FixedLength,
    SurvivalThreshold,
    VerificationPolicy,
    VerifyAll,
    sorted_candidates,
    throughput_path,
)
from dspark.scheduling.sps import ProfileError, SPSProfile

__all__ = [
    "AsyncTopK", "CausalGreedy", "ConfidenceThreshold", "DraftGate", "FixedLength", "ProfileError", "SPSProfile",
    "SurvivalThreshold", "VerificationPolicy", "VerifyAll", "sorted_candidates", "throughput_path",
]
