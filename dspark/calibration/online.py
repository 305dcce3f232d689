"""Online calibration (docs/design.md §4.3): every verification round labels the head's confidences for free, so the
engine keeps the last `window` rounds in a ring buffer and refits the head's map (`fit_map`: Platt scaling
or STS) on them every `refit_every` rounds; `drift_report` compares the ECE of the current map on the most
recent rounds with the ECE right after the last refit.

Selecting ℓ from the confidences (the prefix scheduler) does not bias the fit: the events are conditioned
on the scores, and selection on the scores only changes which scores are seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dspark.calibration.calibration_file import check_sampling_temperature
from dspark.calibration.metrics import (
    DEFAULT_BINS,
    ConfidenceMap,
    Rounds,
    as_map,
    ece_per_position,
    integer_counts,
    to_numpy,
    valid_round_mask,
)
from dspark.calibration.sts import DEFAULT_METHOD, MIN_COUNT, apply_calibration, check_method, fit_map


def _ece_summary(values: list[float | None], rounds: int) -> dict:
    kept = [v for v in values if v is not None]
    return {"rounds": rounds, "per_position": values, "mean": float(np.mean(kept)) if kept else None}


class OnlineCalibrator:
    """Running calibration of one drafter's confidence head.

    block_size γ; refit_every: rounds kept between refits; window: rounds the ring buffer holds (the refit
    data); initial: the starting map (a `ConfidenceMap` or temperatures [γ]; default T = 1, b = 0); method:
    "platt" or "sts" (`dspark.calibration.sts`); recent: rounds `drift_report` measures the current map on
    (default refit_every; ECE noise ≈ 0.4/√(recent/bins)); min_count: see `fit_map`; sampling_temperature:
    the sampling regime it calibrates (`calibration_file`; the generation loop then feeds it only requests
    sampled at that temperature), None = every request. observe() is O(B·γ); a refit costs about γ·58
    passes over the window with "sts" (≈ 0.05–0.1 s for 16k rounds, γ = 7, one core), a few passes with
    "platt".
    """

    def __init__(self, block_size: int, refit_every: int = 4096, window: int = 16384, initial: Any = None, *,
                 method: str = DEFAULT_METHOD, recent: int | None = None, min_count: int = MIN_COUNT,
                 bins: int = DEFAULT_BINS, sampling_temperature: float | None = None):
        for name, value in (("block_size", block_size), ("refit_every", refit_every), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.sampling_temperature = (None if sampling_temperature is None
                                     else check_sampling_temperature(sampling_temperature, "OnlineCalibrator"))
        self.method = check_method(method)
        self.block_size = int(block_size)
        self.refit_every = int(refit_every)
        self.window = int(window)
        self.recent = min(self.window, int(recent) if recent is not None else self.refit_every)
        self.min_count = int(min_count)
        self.bins = int(bins)
        self._map = ConfidenceMap.of(np.ones(self.block_size))
        if initial is not None:
            size = initial.block_size if isinstance(initial, ConfidenceMap) else to_numpy(initial, np.float64).size
            if size != self.block_size:
                raise ValueError(f"the initial calibration must have {self.block_size} positions, got {size}")
            self._map = as_map(initial, self.block_size)
        self._conf = np.full((self.window, self.block_size), np.nan)
        self._ver = np.zeros(self.window, dtype=np.int64)
        self._acc = np.zeros(self.window, dtype=np.int64)
        self._next = 0
        self._filled = 0
        self.rounds_seen = 0
        self.rounds_kept = 0
        self.rows_dropped = 0
        self.rows_unverified = 0
        self.refits = 0
        self._since_refit = 0
        self._at_refit: dict | None = None
        self._before_refit: dict | None = None

    @property
    def calibration(self) -> ConfidenceMap:
        """The current map (temperatures and biases [γ])."""
        return ConfidenceMap(self._map.temperatures.copy(), self._map.biases.copy())

    @property
    def temperatures(self) -> np.ndarray:
        """Current temperatures [γ] (a copy)."""
        return self._map.temperatures.copy()

    @property
    def biases(self) -> np.ndarray:
        """Current biases [γ] (a copy; zeros with method "sts")."""
        return self._map.biases.copy()

    def apply(self, confidences: Any) -> Any:
        """Calibrated confidences σ(logit(c_k)/T_k + b_k) of [..., m ≤ γ] (torch or numpy), see
        `apply_calibration`."""
        return apply_calibration(confidences, self._map)

    def observe(self, confidences: Any, verified: Any, accepted: Any) -> int:
        """Record B rounds: raw confidences [B, m ≤ γ] (NaN past the drafted slots), verified ℓ [B],
        accepted n [B]. Invalid rows (non-integer or out-of-range counts, a non-finite or out-of-[0, 1]
        confidence on a verified slot) are dropped and counted, rounds with ℓ = 0 are skipped and counted;
        refits when refit_every rounds were kept since the last refit. Returns the number of rows kept.
        Shapes that cannot be rounds (wrong rank, m > γ, B mismatch) raise ValueError."""
        conf = np.array(to_numpy(confidences, np.float64), dtype=np.float64, ndmin=2)
        ver_i, acc_i, integral = integer_counts(verified, accepted)
        if conf.size == 0 and ver_i.size == 0:
            return 0
        if conf.ndim != 2 or conf.shape[1] > self.block_size or ver_i.shape != (conf.shape[0],):
            raise ValueError(f"expected confidences [B, ≤{self.block_size}], verified [B], accepted [B]; got "
                             f"{conf.shape}, {ver_i.shape}")
        if conf.shape[1] < self.block_size:
            conf = np.pad(conf, ((0, 0), (0, self.block_size - conf.shape[1])), constant_values=np.nan)
        ok = integral & valid_round_mask(conf, ver_i, acc_i)
        unverified = ok & (ver_i == 0)
        keep = ok & ~unverified
        self.rounds_seen += len(ok)
        self.rows_dropped += int((~ok).sum())
        self.rows_unverified += int(unverified.sum())
        self._append(conf[keep], ver_i[keep], acc_i[keep])
        kept = int(keep.sum())
        self.rounds_kept += kept
        self._since_refit += kept
        if self._since_refit >= self.refit_every:
            self.refit()
        return kept

    def _append(self, conf: np.ndarray, ver: np.ndarray, acc: np.ndarray) -> None:
        b = len(ver)
        if b == 0:
            return
        if b > self.window:
            conf, ver, acc, b = conf[-self.window:], ver[-self.window:], acc[-self.window:], self.window
        index = (self._next + np.arange(b)) % self.window
        self._conf[index], self._ver[index], self._acc[index] = conf, ver, acc
        self._next = int((self._next + b) % self.window)
        self._filled = min(self.window, self._filled + b)

    def _last(self, count: int) -> Rounds:
        """The last `count` kept rounds (fewer if the buffer holds fewer), oldest first."""
        count = min(count, self._filled)
        index = (self._next - count + np.arange(count)) % self.window
        return Rounds(self._conf[index], self._ver[index], self._acc[index])

    def window_rounds(self) -> Rounds:
        """The rounds in the buffer, oldest first."""
        return self._last(self._filled)

    def refit(self) -> ConfidenceMap:
        """Refit the map on the window now (positions with < min_count rounds keep theirs); returns it."""
        data = self.window_rounds()
        self._before_refit = _ece_summary(ece_per_position(data, self._map, self.bins), len(data))
        self._map = fit_map(data, method=self.method, bins=self.bins, min_count=self.min_count, initial=self._map)
        self._at_refit = _ece_summary(ece_per_position(data, self._map, self.bins), len(data))
        self.refits += 1
        self._since_refit = 0
        return self.calibration

    def drift_report(self, recent: int | None = None) -> dict:
        """JSON-able state: counters, the current map (temperatures, biases), ECE (per position and mean) of
        the current map on the last `recent` rounds (default self.recent; "ece_recent"), on the window at the
        last refit ("ece_at_refit") and of the previous map on that window ("ece_before_refit"),
        drift = recent − at-refit mean (None before the first refit)."""
        recent = self._last(self.recent if recent is None else max(0, int(recent)))
        ece_recent = _ece_summary(ece_per_position(recent, self._map, self.bins), len(recent))
        at_refit = self._at_refit
        drift = (ece_recent["mean"] - at_refit["mean"]
                 if at_refit is not None and ece_recent["mean"] is not None and at_refit["mean"] is not None else None)
        return {
            "block_size": self.block_size,
            "sampling_temperature": self.sampling_temperature,
            "method": self.method,
            "rounds_seen": self.rounds_seen,
            "rounds_kept": self.rounds_kept,
            "rows_dropped": self.rows_dropped,
            "rows_unverified": self.rows_unverified,
            "rounds_in_window": self._filled,
            "refits": self.refits,
            "rounds_since_refit": self._since_refit,
            "temperatures": self._map.temperatures.tolist(),
            "biases": self._map.biases.tolist(),
            "ece_recent": ece_recent,
            "ece_at_refit": at_refit,
            "ece_before_refit": self._before_refit,
            "drift": drift,
        }

    def metrics(self, prefix: str = "calibration") -> dict[str, float]:
        """Flat {name: number} view of `drift_report` for a metrics exporter (undefined values left out);
        positions are 1-based: {prefix}_temperature_1, {prefix}_ece_recent_1, ..."""
        report = self.drift_report()
        out: dict[str, float] = {
            f"{prefix}_{key}": float(report[key])
            for key in ("rounds_seen", "rows_dropped", "rows_unverified", "rounds_in_window", "refits")
        }
        for k, (t, b) in enumerate(zip(report["temperatures"], report["biases"]), start=1):
            out[f"{prefix}_temperature_{k}"] = t
            out[f"{prefix}_bias_{k}"] = b
        for name in ("ece_recent", "ece_at_refit"):
            summary = report[name]
            if summary is None:
                continue
            if summary["mean"] is not None:
                out[f"{prefix}_{name}_mean"] = summary["mean"]
            for k, value in enumerate(summary["per_position"], start=1):
                if value is not None:
                    out[f"{prefix}_{name}_{k}"] = value
        if report["drift"] is not None:
            out[f"{prefix}_ece_drift"] = report["drift"]
        return out
