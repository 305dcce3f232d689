"""Calibration file: the confidence-head calibration of one drafter (docs/design.md §4.2: STS temperatures, with the
optional bias of `dspark.calibration.sts`), bound to that drafter's weights, one map per sampling regime.

The head's raw confidences are trained (docs/design.md §2.4) on acceptance at sampling temperature 1; at another
temperature the same scores mean other acceptance rates (greedy verification accepts on an argmax match, far
more often than the T = 1 rule for a drafter that has learnt the target's mode: on the built-in drafter a map
fitted at T = 1 predicts 0.04 prefix survival at position 7 where 0.30 survive greedily, and Algorithm 1
then verifies 13 % less than it should — docs/benchmarks.md). So the file holds one fit per sampling
temperature it was fitted at (`dspark calibrate --sampling-temperatures 1,0`), and a request uses the regime
whose sampling temperature is nearest to its own (`regime_for`). The paper fits one set (§3.2.1, at its
evaluation temperature 1.0); a file with only that regime behaves exactly so. A drafter whose checkpoint has
a greedy confidence output (docs/design.md §2.4) reports it for greedy requests, so its temperature-0 regime
is fitted on that output's scores (the recording runs greedily too).
A drafter folder may carry its own file as DRAFTER_CALIBRATION (the built-in DSpark drafters do); commands
apply it by default when it was fitted for exactly those weights.

JSON, format "dspark-calibration-v2":
  {"format", "drafter": {"name", "config_sha256", "weights_sha256"} (`model_fingerprint` of the drafter
   folder), "block_size": γ, "regimes": [{"sampling_temperature": t ≥ 0 (0 = greedy), "temperatures": [γ]
   (T_k > 0, position 1 first), "fitted_on": {counts, data sets, ...}, "ece_before", "ece_after": metrics
   dicts or null, "biases": [γ] finite (absent = 0), "method": "sts" | "platt"}, ...] (distinct sampling
   temperatures, ascending), "created": ISO-8601 UTC time}
Version 1 files (one top-level "temperatures" list, always fitted at temperature 1.0 by `dspark calibrate`)
are read as a file with that one regime. Written atomically (temporary sibling file, then os.replace).
Loading checks the format, the drafter's identity (both hashes; the name is informative), the block size,
and that every T_k is finite and > 0 and every sampling temperature finite, ≥ 0 and distinct (numbers
must be JSON numbers: "1.0" or true is refused).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from dspark.calibration.metrics import ConfidenceMap
from dspark.models.fingerprint import model_fingerprint
from dspark.calibration.sts import check_method
from dspark.errors import CheckpointError, ConfigError
from dspark.files import write_text_atomically

FORMAT = "dspark-calibration-v2"
FORMAT_V1 = "dspark-calibration-v1"
_FORMAT_PREFIX = "dspark-calibration-v"
_IDENTITY_KEYS = ("config_sha256", "weights_sha256")
PAPER_SAMPLING_TEMPERATURE = 1.0  # the regime of a version-1 file and of a bare list of temperatures
DEFAULT_SAMPLING_TEMPERATURES = (1.0, 0.0)  # regimes `dspark calibrate` and the zoo fit: the paper's, and greedy
DRAFTER_CALIBRATION = "calibration.json"  # a drafter folder's own calibration, applied by default ("auto")


def drafter_identity(folder: str | Path) -> dict[str, str]:
    """{"name", "config_sha256", "weights_sha256"} of a drafter folder (`model_fingerprint`)."""
    return model_fingerprint(folder)


@dataclass(frozen=True)
class CalibrationRegime:
    """One fit: temperatures and biases [γ] (position 1 first) for requests sampled at about
    `sampling_temperature` (0 = greedy), the method, what it was fitted on and its held-out metrics."""

    sampling_temperature: float
    temperatures: list[float]
    fitted_on: dict = field(default_factory=dict)
    ece_before: dict | None = None
    ece_after: dict | None = None
    biases: list[float] | None = None  # None = zeros (the paper's STS)
    method: str = "sts"

    @property
    def map(self) -> ConfidenceMap:
        return ConfidenceMap.of(self.temperatures, self.biases)

    def to_dict(self) -> dict:
        return {"sampling_temperature": self.sampling_temperature, "method": self.method,
                "temperatures": list(self.temperatures),
                "biases": list(self.biases) if self.biases is not None else [0.0] * len(self.temperatures),
                "fitted_on": dict(self.fitted_on), "ece_before": self.ece_before, "ece_after": self.ece_after}


def nearest_regime(sampling_temperatures: Sequence[float], temperature: float) -> int:
    """Index of the regime whose sampling temperature is nearest to `temperature` (ties: the higher one)."""
    t = float(temperature)
    return min(range(len(sampling_temperatures)), key=lambda i: (abs(sampling_temperatures[i] - t), -sampling_temperatures[i]))


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration file: one `CalibrationRegime` per fitted sampling temperature (ascending)."""

    regimes: list[CalibrationRegime]
    block_size: int
    drafter: dict
    created: str = ""
    path: Path | None = None

    def regime_for(self, temperature: float) -> CalibrationRegime:
        """The regime a request sampled at `temperature` uses (nearest fitted sampling temperature)."""
        return self.regimes[nearest_regime([r.sampling_temperature for r in self.regimes], temperature)]

    def by_sampling_temperature(self) -> dict[float, ConfidenceMap]:
        """{sampling temperature: map [γ]}, what `SpeculationController` takes as its regimes."""
        return {r.sampling_temperature: r.map for r in self.regimes}


def _number_list(values: Any, name: str, where: str, error: type[Exception]) -> list[float]:
    """A non-empty list of real numbers (JSON numbers: no bools, strings or mappings), as floats."""
    items = list(values) if hasattr(values, "__iter__") and not isinstance(values, (str, bytes, dict)) else []
    if not items or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
        raise error(f"{where}: {name} must be a non-empty list of numbers, got {values!r}")
    return [float(v) for v in items]


def _check_temperatures(temperatures: Any, block_size: int | None, where: str, error: type[Exception]) -> list[float]:
    temps = _number_list(temperatures, "temperatures", where, error)
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise error(f"{where}: temperatures must be finite and > 0, found {bad} in {temps}")
    if block_size is not None and len(temps) != block_size:
        raise error(f"{where}: {len(temps)} temperatures for block size {block_size}")
    return temps


def _check_biases(biases: Any, count: int, where: str, error: type[Exception]) -> list[float] | None:
    if biases is None:
        return None
    values = _number_list(biases, "biases", where, error)
    if len(values) != count or not all(math.isfinite(b) for b in values):
        raise error(f"{where}: biases must be {count} finite numbers, got {biases!r}")
    return values


def _check_method(method: Any, where: str, error: type[Exception]) -> str:
    try:
        return check_method(method)
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None


def check_sampling_temperature(value: Any, where: str = "calibration", error: type[Exception] = ValueError,
                               name: str = "sampling_temperature") -> float:
    """`value` as a float when it is a real number, finite and ≥ 0 (0 = greedy); else `error` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise error(f"{where}: {name} must be a finite number ≥ 0 (0 = greedy), got {value!r}")
    return float(value)


def save_calibration(path: str | Path, temperatures: Any = None, *, regimes: Sequence[CalibrationRegime | dict] | None = None,
                     drafter_folder: str | Path | None = None, drafter: dict | None = None,
                     block_size: int | None = None, sampling_temperature: float = PAPER_SAMPLING_TEMPERATURE,
                     fitted_on: dict | None = None, ece_before: dict | None = None,
                     ece_after: dict | None = None) -> dict:
    """Write the calibration file atomically and return its content.

    Either `regimes` (CalibrationRegime or dicts of its fields, distinct sampling temperatures) or one set of
    `temperatures` [γ] fitted at `sampling_temperature` with its fitted_on / ece_before / ece_after. The
    drafter is named by its folder (identity computed here) or by an identity dict; block_size defaults to
    the number of temperatures. ece_*: e.g. `position_metrics(...)` dicts (JSON-able, no NaN). ValueError
    on bad arguments.
    """
    path = Path(path)
    if (drafter_folder is None) == (drafter is None):
        raise ValueError("give exactly one of drafter_folder and drafter (an identity dict)")
    if (temperatures is None) == (regimes is None):
        raise ValueError("give exactly one of temperatures and regimes")
    identity = drafter_identity(drafter_folder) if drafter_folder is not None else dict(drafter)
    missing = [k for k in _IDENTITY_KEYS if not isinstance(identity.get(k), str)]
    if missing:
        raise ValueError(f"drafter identity lacks {missing}: {identity}")
    if regimes is None:
        regimes = [CalibrationRegime(sampling_temperature, list(temperatures), dict(fitted_on or {}), ece_before, ece_after)]
    checked = []
    for regime in regimes:
        r = regime if isinstance(regime, CalibrationRegime) else CalibrationRegime(**regime)
        temps = _check_temperatures(list(r.temperatures), block_size, str(path), ValueError)
        block_size = len(temps)
        checked.append(CalibrationRegime(check_sampling_temperature(r.sampling_temperature, str(path), ValueError),
                                         temps, dict(r.fitted_on), r.ece_before, r.ece_after,
                                         _check_biases(r.biases, len(temps), str(path), ValueError),
                                         _check_method(r.method, str(path), ValueError)))
    if not checked:
        raise ValueError(f"{path}: no calibration regime to write")
    checked.sort(key=lambda r: r.sampling_temperature)
    points = [r.sampling_temperature for r in checked]
    if len(set(points)) != len(points):
        raise ValueError(f"{path}: sampling temperatures must be distinct, got {points}")
    content = {
        "format": FORMAT,
        "drafter": identity,
        "block_size": block_size,
        "regimes": [r.to_dict() for r in checked],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomically(path, json.dumps(content, indent=2, allow_nan=False) + "\n")
    return content


def _describe(identity: dict) -> str:
    return (f"{identity.get('name', '?')!r} (config sha256 {str(identity.get('config_sha256'))[:12]}…, "
            f"weights sha256 {str(identity.get('weights_sha256'))[:12]}…)")


def load_calibration(path: str | Path, drafter_folder: str | Path | None = None,
                     block_size: int | None = None) -> Calibration:
    """Read and validate a calibration file; CheckpointError naming the file and the problem when it is
    missing, not JSON, of another format/version, fitted for another drafter (drafter_folder given) or
    block size (block_size given), or holds a temperature that is not finite and > 0."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON calibration file ({e})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a dspark calibration file (top level is not an object)")
    fmt = content.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX):
            raise CheckpointError(f"{path}: calibration format {fmt!r} is not supported; this dspark reads "
                                  f"{FORMAT!r} and {FORMAT_V1!r}")
        raise CheckpointError(f"{path}: not a dspark calibration file (format {fmt!r}, expected {FORMAT!r})")
    identity = content.get("drafter")
    if not isinstance(identity, dict) or any(not isinstance(identity.get(k), str) for k in _IDENTITY_KEYS):
        raise CheckpointError(f"{path}: 'drafter' must be an identity object with {list(_IDENTITY_KEYS)}")
    size = content.get("block_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: 'block_size' must be a positive integer, got {size!r}")
    if fmt == FORMAT_V1:
        entries = [dict(content, sampling_temperature=PAPER_SAMPLING_TEMPERATURE)]
    else:
        entries = content.get("regimes")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise CheckpointError(f"{path}: 'regimes' must be a non-empty list of objects")
    regimes = []
    for i, entry in enumerate(entries):
        where = str(path) if fmt == FORMAT_V1 else f"{path}: regime {i + 1}"
        temps = _check_temperatures(entry.get("temperatures"), size, where, CheckpointError)
        point = check_sampling_temperature(entry.get("sampling_temperature"), where, CheckpointError)
        if not isinstance(entry.get("fitted_on", {}), dict):
            raise CheckpointError(f"{where}: 'fitted_on' must be an object")
        regimes.append(CalibrationRegime(point, temps, entry.get("fitted_on", {}), entry.get("ece_before"),
                                         entry.get("ece_after"), _check_biases(entry.get("biases"), size, where, CheckpointError),
                                         _check_method(entry.get("method", "sts"), where, CheckpointError)))
    points = [r.sampling_temperature for r in regimes]
    if len(set(points)) != len(points):
        raise CheckpointError(f"{path}: sampling temperatures must be distinct, got {points}")
    if block_size is not None and int(block_size) != size:
        raise CheckpointError(f"{path}: calibration was fitted for block size {size}, but the drafter runs with block "
                              f"size {block_size}; refit it (dspark calibrate) for this block size")
    if drafter_folder is not None:
        current = drafter_identity(drafter_folder)
        if any(current[k] != identity[k] for k in _IDENTITY_KEYS):
            raise CheckpointError(f"{path}: calibration was fitted for drafter {_describe(identity)}, but {drafter_folder} "
                                  f"is {_describe(current)}; refit it (dspark calibrate) for this drafter")
    return Calibration(
        regimes=sorted(regimes, key=lambda r: r.sampling_temperature),
        block_size=size,
        drafter=identity,
        created=str(content.get("created", "")),
        path=path,
    )


def regimes_for(drafter, calibration: str | None = "auto") -> dict[float, ConfidenceMap] | None:
    """The calibration regimes ({sampling temperature: map}) to apply to `drafter`'s confidences, or None
    for the raw head. calibration: a file (`dspark calibrate`), checked against the drafter's weights
    (`drafter.source`) and block size; "auto" = the drafter folder's own DRAFTER_CALIBRATION file when it was
    fitted for exactly these weights (the built-in DSpark drafters ship one), else none; None or "none" = the
    raw head. A file named for a drafter without a confidence head is refused (ConfigError)."""
    if calibration is None or calibration == "none":
        return None
    if not drafter.provides_confidence or drafter.source is None:
        if calibration == "auto":
            return None
        raise ConfigError(f"--calibration {calibration!r}: drafter {drafter.source or drafter.name} has no confidence "
                          "head to calibrate; omit --calibration (or give 'none')")
    folder = Path(drafter.source)
    if calibration == "auto":
        path = folder / DRAFTER_CALIBRATION
        if not path.is_file():
            return None
        stored = load_calibration(path).drafter
        mine = drafter_identity(folder)
        if any(stored.get(k) != mine[k] for k in ("config_sha256", "weights_sha256")):
            return None
        calibration = str(path)
    return load_calibration(calibration, drafter_folder=folder, block_size=drafter.block_size).by_sampling_temperature()
