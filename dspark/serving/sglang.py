"""SGLang's DSpark side files from dspark's own and back: the SPS table (`--speculative-dspark-sps-table-path`)
from an SPS profile, and the STS file (`--speculative-dspark-confidence-sts-path`) from a calibration file and
into one (docs/serving.md "Multi-GPU production"). Formats as SGLang reads them (2026-12):

* SPS table: {"sample_batch_tokens": [B ascending], "sample_steps_per_sec": [steps/s at B], "max_batch_tokens": N},
  looked up by floor (the largest sampled B ≤ the step's tokens). dspark's profile gives step time by target
  tokens B (a flat profile) or by requests × tokens each (a grid): there B tokens are read as B / (1 + γ)
  requests verifying γ drafts each — the shape of a speculative step — and the drafter's step for that many
  requests is added when the profile has it (dspark's `SPSProfile.step_ms`). γ: the block size given, else
  the profile's drafter's ("gamma"), else 7. `dspark profile --sglang-out` and `dspark export sglang` both
  write it through `sps_table` / `write_files`.
* STS: {"temperatures": [T_1..T_γ], "dataset", "num_samples", "ece_before", "ece_after"}: one temperature per
  position and no bias (the paper's Sequential Temperature Scaling, §3.2.1). A dspark calibration regime maps
  onto it when it was fitted with `--method sts` (biases all 0); a Platt fit's biases have no place there and
  are refused rather than dropped. `dspark calibrate --sglang-out` and `dspark export sglang` write it
  through `sts_file`. dspark adds "sampling_temperature" (the regime's); SGLang's own files lack it. Read back by `read_sts_file` (strict: unknown keys, non-numbers, temperatures not finite and > 0 are
  refused) and turned into a regime by `sts_regime` for `dspark calibrate --from-sglang`, which binds it to a
  drafter's weights — the file itself names no drafter.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from dspark.calibration.calibration_file import PAPER_SAMPLING_TEMPERATURE, Calibration, CalibrationRegime
from dspark.errors import ConfigError
from dspark.scheduling.sps import SPSProfile

SPS_TABLE_FILE = "sps_table.json"  # --speculative-dspark-sps-table-path
STS_FILE = "confidence_sts.json"  # --speculative-dspark-confidence-sts-path
DEFAULT_MAX_BATCH_TOKENS = 2048
DEFAULT_BLOCK_SIZE = 7  # the released drafters' block size: used when neither the caller nor the profile gives one
STS_KEYS = ("temperatures", "dataset", "num_samples", "ece_before", "ece_after")  # SGLang's STS file
DSPARK_STS_KEYS = ("sampling_temperature",)  # dspark's addition, not part of SGLang's format


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_table_options(max_batch_tokens: Any = None, block_size: Any = None) -> None:
    """ConfigError naming --max-batch-tokens / --block-size unless each is None or an integer ≥ 1 (checked
    before a profile is measured or read)."""
    if max_batch_tokens is not None and not _positive_int(max_batch_tokens):
        raise ConfigError(f"--max-batch-tokens must be an integer ≥ 1, got {max_batch_tokens!r}")
    if block_size is not None and not _positive_int(block_size):
        raise ConfigError(f"--block-size must be an integer ≥ 1, got {block_size!r}")


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


def sps_table(profile: SPSProfile, *, max_batch_tokens: int | None = None, block_size: int | None = None) -> dict:
    """SGLang's SPS table of `profile` up to `max_batch_tokens` target tokens per step (default 2048); a grid
    profile's tokens are read as requests with `block_size` drafts each (default: the profile's "gamma", else
    7; module docstring)."""
    check_table_options(max_batch_tokens, block_size)
    max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
    if block_size is None:
        gamma = profile.metadata.get("gamma")
        block_size = gamma if _positive_int(gamma) else DEFAULT_BLOCK_SIZE
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


def sts_file(calibration: Calibration, sampling_temperature: float = PAPER_SAMPLING_TEMPERATURE) -> dict:
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


def write_files(folder: str | Path, files: dict[str, dict]) -> list[Path]:
    """Write each {name: content} as indented JSON into `folder` (created if missing), atomically; the paths.
    The caller checked the folder first (`dspark.files.check_output_folder`)."""
    from dspark.files import write_text_atomically

    return [write_text_atomically(Path(folder) / name, json.dumps(content, indent=2, allow_nan=False) + "\n")
            for name, content in files.items()]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def read_sts_file(path: str | Path, what: str = "--from-sglang") -> dict:
    """SGLang's STS file at `path`, validated: a JSON object with only the keys of STS_KEYS (and dspark's
    "sampling_temperature"), "temperatures" a non-empty list of finite numbers > 0, "dataset" a string,
    "num_samples" an integer ≥ 0, "ece_before" / "ece_after" null or one finite number ≥ 0 (or null) per
    temperature, "sampling_temperature" a finite number ≥ 0. Returns the object with the temperatures as
    floats; ConfigError naming `what` (the option), the file and the problem otherwise."""
    path = Path(path)
    where = f"{what} {path}"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a readable JSON file ({exc})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{where}: SGLang's STS file is a JSON object {{\"temperatures\": [...], ...}}, got "
                          f"{type(content).__name__}")
    unknown = sorted(k for k in content if k not in STS_KEYS + DSPARK_STS_KEYS)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise ConfigError(f"{where}: unknown key(s) {shown}; SGLang's STS file has {list(STS_KEYS)}")
    if "temperatures" not in content:
        raise ConfigError(f"{where}: no 'temperatures' (one per block position)")
    temps = content["temperatures"]
    if not isinstance(temps, list) or not temps or not all(_real(t) and t > 0 for t in temps):
        raise ConfigError(f"{where}: 'temperatures' must be a non-empty list of finite numbers > 0, got {temps!r}")
    if not isinstance(content.get("dataset", ""), str):
        raise ConfigError(f"{where}: 'dataset' must be a string, got {content['dataset']!r}")
    samples = content.get("num_samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"{where}: 'num_samples' must be an integer ≥ 0, got {samples!r}")
    for key in ("ece_before", "ece_after"):
        values = content.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != len(temps)
                                   or not all(v is None or (_real(v) and v >= 0) for v in values)):
            raise ConfigError(f"{where}: '{key}' must be null or {len(temps)} numbers ≥ 0 (one per position, null "
                              f"where unmeasured), got {values!r}")
    point = content.get("sampling_temperature")
    if point is not None and not (_real(point) and point >= 0):
        raise ConfigError(f"{where}: 'sampling_temperature' must be a finite number ≥ 0, got {point!r}")
    return dict(content, temperatures=[float(t) for t in temps])


def sts_regime(sts: dict, block_size: int, sampling_temperature: float | None = None, *,
               path: str | Path | None = None, source: str = "STS file") -> CalibrationRegime:
    """The calibration regime of a `read_sts_file` result for a drafter of `block_size`: its temperatures, no
    bias, method "sts", at `sampling_temperature` (default: the file's own, else 1 — the paper's protocol), its
    "fitted_on" naming the file (`path`), its data sets and sample count; ConfigError, naming `source`, when the
    file has another number of temperatures."""
    temps = sts["temperatures"]
    if len(temps) != block_size:
        raise ConfigError(f"{source}: {len(temps)} temperatures, but the drafter's block size is {block_size}; "
                          "this file was fitted for another drafter")
    if sampling_temperature is None:
        stored = sts.get("sampling_temperature")
        sampling_temperature = PAPER_SAMPLING_TEMPERATURE if stored is None else float(stored)

    def metrics(values: list | None) -> dict | None:
        return None if values is None else {"positions": [{"position": k, "ece": v} for k, v in enumerate(values, 1)]}

    dataset = sts.get("dataset", "")
    fitted_on = {"imported_from": "sglang-sts", "file": None if path is None else str(path),
                 "rounds": sts.get("num_samples", 0), "datasets": [d for d in dataset.split(",") if d]}
    return CalibrationRegime(float(sampling_temperature), list(temps), fitted_on, metrics(sts.get("ece_before")),
                             metrics(sts.get("ece_after")), None, "sts")
