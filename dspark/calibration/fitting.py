"""Fit STS on recorded verification rounds and write the calibration file (used by `dspark calibrate` and
`dspark zoo rebuild`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dspark.calibration.calibration_file import save_calibration
from dspark.calibration.metrics import Rounds, valid_round_mask
from dspark.calibration.sts import calibrate
from dspark.errors import ConfigError


def fit_and_save(per_set: dict, drafter: str | Path, block_size: int, out: str | Path, *, held_out: float = 0.5,
                 seed: int = 0) -> dict:
    """per_set: {set name: round traces} as `dspark.evaluation.offline.round_arrays` makes them, of the raw
    head. Splits by prompt, fits on one part, measures ECE on the other, writes `out`; returns a summary
    {"calibration", "drafter", "temperatures", "ece_before", "ece_after" ({"per_position", "mean"}), "fitted_on"}."""
    from dspark.evaluation.offline import merge_traces

    merged = merge_traces(per_set.values())
    conf = np.array([[np.nan if v is None else v for v in row] for row in merged["confidences"]], dtype=float)[:, :block_size]
    verified, accepted = np.asarray(merged["verified"]), np.asarray(merged["accepted"])
    keep = valid_round_mask(conf, verified, accepted)  # a NaN / out-of-range confidence drops its round
    rounds = Rounds(conf[keep], verified[keep], accepted[keep], dropped=int((~keep).sum()))
    if len(rounds) < 20:
        raise ConfigError(f"only {len(rounds)} usable verification rounds; use more prompts (--limit, --datasets)")
    groups = np.asarray(merged["sample"])[keep]  # split by prompt: held-out prompts never inform the fit
    result = calibrate(rounds, held_out_fraction=held_out, seed=seed, groups=groups)
    temperatures = [float(t) for t in result.temperatures]
    fitted_on = {"rounds": result.fit_rounds, "held_out_rounds": result.held_out_rounds,
                 "datasets": sorted(per_set), "dropped_rounds": rounds.dropped}
    save_calibration(out, temperatures, drafter_folder=drafter, block_size=block_size, fitted_on=fitted_on,
                     ece_before=result.before, ece_after=result.after)
    summary = {
        "calibration": str(out), "drafter": str(drafter), "temperatures": temperatures,
        "ece_before": {"per_position": [p["ece"] for p in result.before["positions"]], "mean": result.before["mean"]["ece"]},
        "ece_after": {"per_position": [p["ece"] for p in result.after["positions"]], "mean": result.after["mean"]["ece"]},
        "fitted_on": fitted_on,
    }
    return summary
