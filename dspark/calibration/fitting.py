"""Fit STS on recorded verification rounds and write the calibration file (used by `dspark calibrate` and
`dspark zoo rebuild`): one regime per sampling temperature the rounds were recorded at."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dspark.calibration.calibration_file import (
    PAPER_SAMPLING_TEMPERATURE,
    CalibrationRegime,
    nearest_regime,
    save_calibration,
)
from dspark.calibration.metrics import Rounds, valid_round_mask
from dspark.calibration.sts import DEFAULT_METHOD, calibrate, check_method
from dspark.errors import ConfigError

if TYPE_CHECKING:  # recorded rounds come from dspark.evaluation.traces; calibration does not import evaluation
    from dspark.evaluation.traces import RecordedRounds


def fit_regime(recorded: "RecordedRounds", sampling_temperature: float, *, held_out: float = 0.5,
               seed: int = 0, method: str = DEFAULT_METHOD) -> CalibrationRegime:
    """recorded: a drafter's validated rounds (`dspark.evaluation.traces.drafter_rounds`) of the raw head,
    recorded at `sampling_temperature`. Splits by prompt, fits the map (`method`: "sts" or "platt") on one
    part, measures the metrics before/after on the other."""
    conf, verified, accepted = recorded.confidences, recorded.verified, recorded.accepted
    keep = valid_round_mask(conf, verified, accepted)  # a NaN confidence on a verified slot drops its round
    rounds = Rounds(conf[keep], verified[keep], accepted[keep], dropped=int((~keep).sum()))
    if len(rounds) < 20:
        raise ConfigError(f"sampling temperature {sampling_temperature}: only {len(rounds)} usable verification rounds; "
                          "use more prompts (--limit, --datasets)")
    groups = recorded.prompt[keep]  # split by prompt: held-out prompts never inform the fit
    result = calibrate(rounds, held_out_fraction=held_out, seed=seed, groups=groups, method=method)
    fitted_on = {"rounds": result.fit_rounds, "held_out_rounds": result.held_out_rounds,
                 "datasets": sorted(recorded.sets), "dropped_rounds": rounds.dropped}
    temps, biases = result.calibration.to_lists()
    return CalibrationRegime(float(sampling_temperature), temps, fitted_on, result.before, result.after, biases, method)


def _ece(metrics: dict) -> dict:
    """{"per_position", "mean"} ECE, and {"floor_per_position", "floor"} where the metrics have a noise floor."""
    out = {"per_position": [p["ece"] for p in metrics["positions"]], "mean": metrics["mean"]["ece"]}
    if "ece_floor" in metrics["mean"]:
        out.update(floor_per_position=[p["ece_floor"] for p in metrics["positions"]], floor=metrics["mean"]["ece_floor"])
    return out


def fit_and_save(per_temperature: "dict[float, RecordedRounds]", drafter: str | Path, block_size: int, out: str | Path, *,
                 held_out: float = 0.5, seed: int = 0, method: str = DEFAULT_METHOD) -> dict:
    """per_temperature: {sampling temperature: the raw head's recorded rounds}. Fits one regime per
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
    for t, recorded in per_temperature.items():
        if recorded.block_size != block_size:
            raise ConfigError(f"rounds of {recorded.label!r} at sampling temperature {t:g} have block size "
                              f"{recorded.block_size}; the drafter's is {block_size}")
    regimes = [fit_regime(recorded, t, held_out=held_out, seed=seed, method=method)
               for t, recorded in sorted(per_temperature.items())]
    save_calibration(out, regimes=regimes, drafter_folder=drafter, block_size=block_size)
    rows = [{"sampling_temperature": r.sampling_temperature, "temperatures": r.temperatures, "biases": r.biases,
             "ece_before": _ece(r.ece_before), "ece_after": _ece(r.ece_after), "fitted_on": r.fitted_on}
            for r in regimes]
    main = rows[nearest_regime([r["sampling_temperature"] for r in rows], PAPER_SAMPLING_TEMPERATURE)]
    return {"calibration": str(out), "drafter": str(drafter), "method": method, **main, "regimes": rows}
