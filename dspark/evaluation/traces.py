"""Traces: the per-round records of `dspark eval --out DIR` (DIR/traces.json), the one module that writes,
reads and validates them (`dspark calibrate --traces`, `dspark sweep`, `dspark simulate`, benchmarks).

Format: a JSON object {drafter label: entry}; each entry has "drafter" (the drafter spec), "block_size" γ,
"temperature" (the sampling temperature of the recording), "has_confidences", "confidence_temperatures" /
"confidence_biases" (the calibration map applied to the recorded confidences, null for the raw head) and
"datasets" {set name: rounds}. The rounds of one set are parallel lists, one item per verification round:
"confidences" (γ numbers in [0, 1] or null past the drafted slots / without a confidence head), "drafted",
"verified", "accepted", "emitted" (integers, accepted ≤ verified ≤ drafted ≤ γ), "sample" (the prompt index
within the set), plus the set's "domain". `round_arrays` writes one set, `merge_traces` concatenates sets,
`load_traces` + `drafter_rounds` read and validate a drafter's rounds into `RecordedRounds` (TraceError,
naming the file, drafter, set, key and round, on anything else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dspark.calibration.fitting import FitData
from dspark.calibration.metrics import ConfidenceMap
from dspark.calibration.sts import apply_calibration
from dspark.engine.stats import RoundRecord
from dspark.errors import ConfigError


class TraceError(ConfigError):
    """A traces file is missing, malformed, or lacks the drafter asked for."""


def load_traces(path: str | Path, what: str = "--traces") -> dict:
    """Read a traces.json and check its outline ({drafter label: {"block_size", "datasets", ...}}); the
    rounds themselves are checked by `drafter_rounds`. TraceError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{what} {path}: no such file (write one with `dspark eval --out DIR`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TraceError(f"{what} {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise TraceError(f"{what} {path}: expected a JSON object {{drafter label: traces}} as written by "
                         "`dspark eval --out`")
    for label, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("datasets"), dict) or not entry["datasets"]:
            raise TraceError(f"{what} {path}: drafter {label!r} has no 'datasets' object of recorded rounds")
        block_size = entry.get("block_size")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise TraceError(f"{what} {path}: drafter {label!r} has block_size {block_size!r}; expected an integer ≥ 1")
    return data


@dataclass
class RecordedRounds:
    """All recorded rounds of one drafter (arrays of length N, confidences [N, γ] with NaN where null)."""

    label: str
    block_size: int
    confidences: np.ndarray
    drafted: np.ndarray
    verified: np.ndarray
    accepted: np.ndarray
    emitted: np.ndarray
    prompt: np.ndarray  # global prompt id (distinct across sets)
    domain: np.ndarray  # domain name per round (str array)
    has_confidences: bool
    sets: list[str] = field(default_factory=list)
    calibration: ConfidenceMap | None = None  # the calibration the recording applied (None: the raw head)
    sampling_temperature: float | None = None  # the recording's sampling temperature (None: not recorded)
    drafter: str | None = None  # the drafter spec (folder or built-in name) the rounds were recorded with

    def fit_data(self) -> FitData:
        """These rounds as `dspark.calibration.fitting` fits a regime on them (the raw head's confidences)."""
        return FitData(self.raw_confidences(), self.verified, self.accepted, self.prompt, list(self.sets))

    def raw_confidences(self) -> np.ndarray:
        """[N, γ] the raw head's confidences: the recorded calibration undone."""
        if self.calibration is None:
            return self.confidences
        return apply_calibration(self.confidences, self.calibration.inverse())

    def __len__(self) -> int:
        return int(self.drafted.size)

    def prompts(self) -> list[np.ndarray]:
        """Round indices of each prompt, in recorded order."""
        order = np.argsort(self.prompt, kind="stable")
        cuts = np.flatnonzero(np.diff(self.prompt[order])) + 1
        return [part for part in np.split(order, cuts) if part.size]

    def domains(self) -> list[str]:
        from dspark.evaluation.datasets import DOMAIN_ORDER

        present = list(dict.fromkeys(self.domain.tolist()))
        return [d for d in DOMAIN_ORDER if d in present] + [d for d in present if d not in DOMAIN_ORDER]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_column(values: Any, where: str) -> np.ndarray:
    """A JSON list of non-negative integers → int64 [N] (no strings, booleans or fractions)."""
    if not isinstance(values, list):
        raise TraceError(f"{where}: expected a list of non-negative integers, got {type(values).__name__}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TraceError(f"{where}: round {i} is {value!r}; expected a non-negative integer")
    return np.array(values, dtype=np.int64).reshape(-1)


def confidence_matrix(rows: Any, block_size: int, where: str = "confidences") -> np.ndarray:
    """JSON confidence rows (one per round: a list of ≤ γ numbers in [0, 1] or nulls, or null) → float64
    [N, γ] with NaN for null and for slots past a short row. TraceError naming the round otherwise."""
    if not isinstance(rows, list):
        raise TraceError(f"{where}: expected a list with one row per round, got {type(rows).__name__}")
    conf = np.full((len(rows), block_size), np.nan)
    for i, row in enumerate(rows):
        if row is None:
            continue
        if not isinstance(row, list) or len(row) > block_size:
            raise TraceError(f"{where}: round {i} must be a list of ≤ {block_size} numbers or nulls, got {row!r}"[:300])
        for k, value in enumerate(row):
            if value is None:
                continue
            if not _is_number(value) or not 0 <= value <= 1:
                raise TraceError(f"{where}: round {i}, position {k + 1} is {value!r}; confidences must lie in [0, 1] (or be null)")
            conf[i, k] = value
    return conf


def _sampling_temperature(entry: dict, where: str) -> float | None:
    value = entry.get("temperature")
    if value is None:
        return None
    if not _is_number(value) or not np.isfinite(value) or value < 0:
        raise TraceError(f"{where}: 'temperature' is {value!r}; expected the sampling temperature, a number ≥ 0")
    return float(value)


def drafter_rounds(traces: dict, label: str, source: str = "traces") -> RecordedRounds:
    """Parse and validate every round of drafter `label` (TraceError naming the file, set, key and round)."""
    if label not in traces:
        raise TraceError(f"{source}: no drafter {label!r}; it has {', '.join(map(repr, traces))}")
    entry = traces[label]
    block_size = int(entry["block_size"])
    parts, prompt_offset = [], 0
    for set_name, data in entry["datasets"].items():
        where = f"{source}: drafter {label!r}, set {set_name!r}"
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected an object of per-round lists")
        missing = [k for k in ("confidences", "drafted", "verified", "accepted", "sample") if k not in data]
        if missing:
            raise TraceError(f"{where}: missing {', '.join(missing)}")
        cols = {k: _int_column(data[k], f"{where} '{k}'") for k in ("drafted", "verified", "accepted", "sample")}
        count = cols["drafted"].size
        emitted = _int_column(data["emitted"], f"{where} 'emitted'") if "emitted" in data else cols["accepted"] + 1
        for key, col in (*cols.items(), ("emitted", emitted)):
            if col.size != count:
                raise TraceError(f"{where}: '{key}' has {col.size} rounds, 'drafted' has {count}")
        if not isinstance(data["confidences"], list) or len(data["confidences"]) != count:
            raise TraceError(f"{where}: 'confidences' must hold one row per round ({count})")
        conf = confidence_matrix(data["confidences"], block_size, f"{where} 'confidences'")
        d, v, a = cols["drafted"], cols["verified"], cols["accepted"]
        bad = np.flatnonzero((d > block_size) | (v > d) | (a > v))
        if bad.size:
            i = int(bad[0])
            raise TraceError(f"{where}: round {i} has drafted={d[i]}, verified={v[i]}, accepted={a[i]}; "
                             f"need accepted ≤ verified ≤ drafted ≤ block_size {block_size}")
        domain = str(data.get("domain", "custom"))
        parts.append((conf, d, v, a, emitted, cols["sample"] + prompt_offset, np.full(count, domain, dtype=object)))
        prompt_offset += 1 + (int(cols["sample"].max()) if count else -1)
    cat = [np.concatenate([p[i] for p in parts]) for i in range(7)]
    if cat[1].size == 0:
        raise TraceError(f"{source}: drafter {label!r} has no recorded rounds")
    has_conf = bool(entry.get("has_confidences", True)) and bool(np.isfinite(cat[0]).any())
    cmap = None
    if entry.get("confidence_temperatures") is not None:
        try:
            cmap = ConfidenceMap.of(entry["confidence_temperatures"], entry.get("confidence_biases"))
        except (TypeError, ValueError):
            cmap = None
        if cmap is None or cmap.block_size != block_size:
            raise TraceError(f"{source}: drafter {label!r} has confidence_temperatures {entry['confidence_temperatures']!r} "
                             f"and confidence_biases {entry.get('confidence_biases')!r}; expected {block_size} finite numbers "
                             "(temperatures > 0) or null")
    drafter = entry.get("drafter")
    return RecordedRounds(label, block_size, cat[0], *cat[1:6], cat[6].astype(str), has_conf, list(entry["datasets"]), cmap,
                          _sampling_temperature(entry, f"{source}: drafter {label!r}"),
                          drafter if isinstance(drafter, str) else None)


def select_dspark(traces: dict, label: str | None, source: str = "traces") -> RecordedRounds:
    """The confidence-carrying drafter to schedule: `label`, or the first one with confidences."""
    if label is not None:
        rounds = drafter_rounds(traces, label, source)
        if not rounds.has_confidences:
            raise TraceError(f"{source}: drafter {label!r} was recorded without confidences (no confidence head); "
                             "sweeps and confidence schedulers need a DSpark drafter")
        return rounds
    for name, entry in traces.items():
        if entry.get("has_confidences", True) and entry.get("block_size", 0) > 1:
            rounds = drafter_rounds(traces, name, source)
            if rounds.has_confidences:
                return rounds
    raise TraceError(f"{source}: no drafter with confidences among {', '.join(map(repr, traces))}; "
                     "record DSpark traces with `dspark eval --out DIR`")


def select_mtp(traces: dict, exclude: str | None = None, source: str = "traces") -> RecordedRounds | None:
    """The MTP-1 drafter of the traces (block size 1, label containing "mtp"), or None."""
    for name, entry in traces.items():
        if name != exclude and "mtp" in name.lower() and entry.get("block_size") == 1:
            return drafter_rounds(traces, name, source)
    return None


def round_arrays(records: list[tuple[int, RoundRecord]], block_size: int) -> dict:
    """Replayable per-round traces (JSON lists): confidences [N, γ] (null past the drafted slots or without a
    confidence head), drafted, verified, accepted, emitted, and the prompt index of each round."""
    conf = np.full((len(records), block_size), np.nan)
    for i, (_, r) in enumerate(records):
        if r.confidences:
            conf[i, : len(r.confidences)] = r.confidences[:block_size]
    return {
        "confidences": [[None if np.isnan(v) else float(v) for v in row] for row in conf],
        "drafted": [r.drafted for _, r in records], "verified": [r.verified for _, r in records],
        "accepted": [r.accepted for _, r in records],
        "emitted": [r.emitted for _, r in records], "sample": [i for i, _ in records],
    }


def merge_traces(parts) -> dict:
    """Concatenate round traces of several sets (sample indices made distinct per set)."""
    merged = {"confidences": [], "drafted": [], "verified": [], "accepted": [], "emitted": [], "sample": []}
    offset = 0
    for part in parts:
        for key in ("confidences", "drafted", "verified", "accepted", "emitted"):
            merged[key].extend(part[key])
        merged["sample"].extend(offset + i for i in part["sample"])
        offset += 1 + max(part["sample"], default=-1)
    return merged
