"""Confidence-head calibration (docs/design.md §4, paper §3.2.1 and §5.2): metrics of the prefix survival
â_k = Π_{i≤k} c_i, Sequential Temperature Scaling (with an optional bias), calibration files, online
refitting, reliability plots.
Plots live in `dspark.calibration.plots` (imports matplotlib)."""

from dspark.calibration.calibration_file import (
    FORMAT,
    Calibration,
    CalibrationRegime,
    drafter_identity,
    load_calibration,
    nearest_regime,
    save_calibration,
)
from dspark.calibration.metrics import (
    ConfidenceMap,
    Rounds,
    brier_score,
    ece_noise_floor,
    ece_per_position,
    expected_calibration_error,
    position_metrics,
    prefix_survival,
    reliability_data,
    roc_auc,
)
from dspark.calibration.online import OnlineCalibrator
from dspark.calibration.sts import (
    DEFAULT_METHOD,
    METHODS,
    STSResult,
    apply_calibration,
    calibrate,
    fit_map,
    fit_sts,
    split_rounds,
)

__all__ = [
    "DEFAULT_METHOD", "FORMAT", "METHODS", "Calibration", "CalibrationRegime", "ConfidenceMap", "OnlineCalibrator",
    "Rounds", "STSResult", "apply_calibration", "brier_score", "calibrate", "drafter_identity", "ece_noise_floor", "ece_per_position",
    "expected_calibration_error", "fit_map", "fit_sts",
    "load_calibration", "nearest_regime", "position_metrics", "prefix_survival", "reliability_data", "roc_auc",
    "save_calibration", "split_rounds",
]
