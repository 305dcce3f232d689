"""Fit STS on recorded verification rounds and write the calibration file (used by `dspark calibrate` and
`dspark zoo rebuild`): one regime per sampling temperature the rounds were recorded at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark.calibration.calibration_file import (
    PAPER_SAMPLING_TEMPERATURE,
    CalibrationRegime,
    nearest_regime,
    save_calibration,
)
from dspark.calibration.metrics import Rounds, valid_round_mask
from dspark.calibration.sts import DEFAULT_METHOD, calibrate, check_method
from dspark.errors import ConfigError


@dataclass
class FitData:
    """The rounds a regime is fitted on: a drafter's raw-head verification rounds at one sampling
    temperature (confidences [N, γ] with NaN where not drafted, verified [N], accepted [N]), the prompt of
    each round (the fit / held-out split is by prompt) and the names of the sets they came from.
    `dspark.evaluation.traces.RecordedRounds.fit_data()` makes one from recorded traces."""

    confidences: np.ndarray
    verified: np.ndarray
    accepted: np.ndarray
    prompt: np.ndarray
    datasets: list[str]

    @property
    def block_size(self) -> int:
        return int(self.confidences.shape[1])


def fit_regime(data: FitData, sampling_temperature: float, *, held_out: float = 0.5,
               seed: int = 0, method: str = DEFAULT_METHOD) -> CalibrationRegime:
    """Fit one regime on `data` (recorded at `sampling_temperature`): split by prompt, fit the map (`method`:
    "sts" or "platt") on one part, measure the metrics before/after on the other."""
    keep = valid_round_mask(data.confidences, data.verified, data.accepted)  # a NaN on a verified slot drops its round
    rounds = Rounds(data.confidences[keep], data.verified[keep], data.accepted[keep], dropped=int((~keep).sum()))
    if len(rounds) < 20:
        raise ConfigError(f"sampling temperature {sampling_temperature}: only {len(rounds)} usable verification rounds; "
                          "use more prompts (--limit, --datasets)")
    groups = data.prompt[keep]  # split by prompt: held-out prompts never inform the fit
    result = calibrate(rounds, held_out_fraction=held_out, seed=seed, groups=groups, method=method)
    fitted_on = {"rounds": result.fit_rounds, "held_out_rounds": result.held_out_rounds,
                 "datasets": sorted(data.datasets), "dropped_rounds": rounds.dropped}
    temps, biases = result.calibration.to_lists()
    return CalibrationRegime(float(sampling_temperature), temps, fitted_on, result.before, result.after, biases, method)


def _ece(metrics: dict) -> dict:
    """{"per_position", "mean"} ECE, and {"floor_per_position", "floor"} where the metrics have a noise floor."""
    out = {"per_position": [p["ece"] for p in metrics["positions"]], "mean": metrics["mean"]["ece"]}
    if "ece_floor" in metrics["mean"]:
        out.update(floor_per_position=[p["ece_floor"] for p in metrics["positions"]], floor=metrics["mean"]["ece_floor"])
    return out


def fit_and_save(per_temperature: dict[float, FitData], drafter: str | Path, block_size: int, out: str | Path, *,
                 held_out: float = 0.5, seed: int = 0, method: str = DEFAULT_METHOD) -> dict:
    """per_temperature: {sampling temperature: the raw head's rounds}. Fits one regime per
    sampling temperature (`fit_regime`), writes `out`; returns a summary {"calibration", "drafter", "method",
    "regimes": [{"sampling_temperature", "temperatures", "biases", "ece_before", "ece_after" ({"per_position",
    "mean"}; ece_after also "floor_per_position", "floor": `ece_noise_floor`), "fitted_on"}], and the same
    keys at the top level for the regime nearest temperature 1.0 (the paper's protocol)}."""
    if not per_temperature:
        raise ConfigError("no recorded rounds to calibrate on")
    try:
        check_method(method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for t, data in per_temperature.items():
        if data.block_size != block_size:
            raise ConfigError(f"the rounds at sampling temperature {t:g} have block size {data.block_size}; "
                              f"the drafter's is {block_size}")
    regimes = [fit_regime(data, t, held_out=held_out, seed=seed, method=method)
               for t, data in sorted(per_temperature.items())]
    save_calibration(out, regimes=regimes, drafter_folder=drafter, block_size=block_size)
    rows = [{"sampling_temperature": r.sampling_temperature, "temperatures": r.temperatures, "biases": r.biases,
             "ece_before": _ece(r.ece_before), "ece_after": _ece(r.ece_after), "fitted_on": r.fitted_on}
            for r in regimes]
    main = rows[nearest_regime([r["sampling_temperature"] for r in rows], PAPER_SAMPLING_TEMPERATURE)]
    return {"calibration": str(out), "drafter": str(drafter), "method": method, **main, "regimes": rows}
