"""Hardware-aware verification scheduling (SPEC §5): SPS step-time profiles and verification-length
policies that choose, per round, how many drafts of each request the target verifies."""

from dspark.scheduling.gate import DraftGate
from dspark.scheduling.policies import (
    AsyncTopK,
    CausalGreedy,
    ConfidenceThreshold,
    FixedLength,
    Scheduler,
    SurvivalThreshold,
    VerifyAll,
    sorted_candidates,
    throughput_path,
)
from dspark.scheduling.sps import ProfileError, SPSProfile

__all__ = [
    "AsyncTopK", "CausalGreedy", "ConfidenceThreshold", "DraftGate", "FixedLength", "ProfileError", "SPSProfile",
    "Scheduler", "SurvivalThreshold", "VerifyAll", "sorted_candidates", "throughput_path",
]
