"""SGLang's DSpark side files from dspark's own: the SPS table (`--speculative-dspark-sps-table-path`) from an SPS
profile, and the STS file (`--speculative-dspark-confidence-sts-path`) from a calibration file
(docs/serving.md "Multi-GPU production"). Formats as SGLang reads them (2026-12):

* SPS table: {"sample_batch_tokens": [B ascending], "sample_steps_per_sec": [steps/s at B], "max_batch_tokens": N},
  looked up by floor (the largest sampled B ≤ the step's tokens). dspark's profile gives step time by target
  tokens B (a flat profile) or by requests × tokens each (a grid): there B tokens are read as B / (1 + γ)
  requests verifying γ drafts each — the shape of a speculative step — and the drafter's step for that many
  requests is added when the profile has it (dspark's `SPSProfile.step_ms`).
* STS: {"temperatures": [T_1..T_γ], "dataset", "num_samples", "ece_before", "ece_after"}: one temperature per
  position and no bias (the paper's Sequential Temperature Scaling, §3.2.1). A dspark calibration regime maps
  onto it when it was fitted with `--method sts` (biases all 0); a Platt fit's biases have no place there and
  are refused rather than dropped.
"""

from __future__ import annotations

import math

import numpy as np

from dspark.calibration.calibration_file import Calibration
from dspark.errors import ConfigError
from dspark.scheduling.sps import SPSProfile


def batch_token_samples(max_batch_tokens: int) -> list[int]:
    """B at which the table is sampled: every B to 64, then steps of max(8, B/32) rounded down to a multiple
    of 8, and the maximum. SGLang reads the table by floor, so between two samples it takes the smaller B's
    (faster) rate: the relative spacing bounds how optimistic that is (≤ 3 % of B beyond 256 tokens)."""
    points = list(range(1, min(64, max_batch_tokens) + 1))
    b = 64
    while b < max_batch_tokens:
        b = min(max_batch_tokens, b + max(8, b // 32 // 8 * 8))
        points.append(b)
    return points


def sps_table(profile: SPSProfile, *, max_batch_tokens: int = 2048, block_size: int = 7) -> dict:
    """SGLang's SPS table of `profile` up to `max_batch_tokens` target tokens per step (module docstring)."""
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ConfigError(f"max batch tokens must be an integer ≥ 1, got {max_batch_tokens!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block size must be an integer ≥ 1, got {block_size!r}")
    tokens = batch_token_samples(max_batch_tokens)
    if profile.is_grid:
        ms = [float(profile.step_ms(b, max(1, math.ceil(b / (1 + block_size))), include_draft=profile.has_draft_cost))
              for b in tokens]
    else:
        ms = [float(profile.step_ms(b)) for b in tokens]
    ms = np.maximum.accumulate(np.array(ms))  # a bigger step is never faster (the profile's own convention)
    return {"sample_batch_tokens": tokens, "sample_steps_per_sec": [1000.0 / m for m in ms.tolist()],
            "max_batch_tokens": max_batch_tokens}


def lookup_steps_per_sec(table: dict, batch_tokens: int) -> float:
    """SGLang's reading of an SPS table: the entry of the largest sampled B ≤ batch_tokens (the first below it)."""
    tokens = table["sample_batch_tokens"]
    index = max(0, int(np.searchsorted(tokens, min(batch_tokens, table["max_batch_tokens"]), side="right")) - 1)
    return table["sample_steps_per_sec"][index]


def sts_file(calibration: Calibration, sampling_temperature: float = 1.0) -> dict:
    """SGLang's STS file from the calibration regime fitted nearest `sampling_temperature`; ConfigError when that
    regime has biases (a Platt fit)."""
    regime = calibration.regime_for(sampling_temperature)
    where = f"{calibration.path or 'calibration'} (regime at sampling temperature {regime.sampling_temperature:g})"
    if regime.biases is not None and any(b != 0 for b in regime.biases):
        raise ConfigError(f"{where}: fitted with {regime.method}, whose biases SGLang's STS file cannot hold; fit an "
                          "STS calibration for it: dspark calibrate --method sts")

    def per_position(metrics: dict | None) -> list[float | None] | None:
        return None if metrics is None else [p.get("ece") for p in metrics.get("positions", [])]

    fitted = regime.fitted_on
    datasets = fitted.get("datasets")
    return {"temperatures": list(regime.temperatures),
            "dataset": ",".join(datasets) if isinstance(datasets, list) else str(datasets or ""),
            "num_samples": int(fitted.get("rounds", 0)),
            "ece_before": per_position(regime.ece_before), "ece_after": per_position(regime.ece_after),
            "sampling_temperature": regime.sampling_temperature}
