"""Step-time profiles: SPS(B), the engine's steps per second at a verification forward of B tokens
(docs/design.md §5.1, §5.5; paper §3.2.2 "profiled step curve").

JSON formats (times in milliseconds, one engine step; other top-level keys are kept as metadata):

* grid (the shared H100 tables): ``"verify_ms": {"RxL": ms}`` — one target step over R requests × L new
  tokens each (B = R·L; L = 1 + ℓ verifies ℓ drafts), optional ``"draft_ms": {"R": ms}`` — one drafter
  step for R requests. Step time depends on both R and B.
* flat: ``"verify_ms_by_tokens": {"B": ms}`` (or ``"verify_ms_total_tokens"``, the name
  `dspark.scheduling.profiler` writes next to its grid) — target step time as a function of the total
  token count B only, optional ``"draft_ms": {"R": ms}`` as above. When a file has both, the grid is used.
* SGLang's SPS table (what `dspark export sglang` writes, docs/serving.md): ``"sample_batch_tokens": [B
  ascending]``, ``"sample_steps_per_sec": [steps/s at B]``, ``"max_batch_tokens"`` — read as a flat profile
  with step time 1000 / steps-per-second at each B. Its steps already include the drafter's (SGLang
  measures whole speculative steps), so it has no separate draft table: drafting is not charged again, and
  a plain-decoding step is charged as much as a speculative one of the same B (pessimistic for plain). dspark
  interpolates between samples where SGLang reads by floor.

Conversion: every table is made monotone non-decreasing (running maximum) along each axis, read by
linear interpolation between measured sizes, held constant below the smallest size and extrapolated
linearly (non-negative slope from the last two sizes) beyond the largest. In the grid format each
measured R is a curve over L; a query (R, B) reads those curves at L = B / R and interpolates between
the two bracketing R. `sps_table(R, B_max)` precomputes SPS for B = 0..B_max as a float64 tensor (the
scheduler's O(1) lookup, a float64 numpy array; entry 0 repeats entry 1).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dspark.errors import ConfigError

_GRID_KEY = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_FLAT_KEYS = ("verify_ms_by_tokens", "verify_ms_total_tokens")
SGLANG_KEYS = ("sample_batch_tokens", "sample_steps_per_sec")


class ProfileError(ConfigError):
    """An SPS profile is missing, malformed, or was measured for another model/device."""


def _positive_time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where} = {value!r}: times must be numbers (milliseconds)")
    if not math.isfinite(value) or value <= 0:
        raise ProfileError(f"{where} = {value!r}: times must be finite and > 0 ms")
    return float(value)


def _positive_int(text: Any, where: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        raise ProfileError(f"{where}: key {text!r} is not a positive integer") from None
    if n < 1:
        raise ProfileError(f"{where}: key {text!r} must be ≥ 1")
    return n


def _mapping(data: Mapping, key: str, source: str) -> Mapping:
    table = data[key]
    if not isinstance(table, Mapping) or not table:
        raise ProfileError(f"SPS profile {source}: '{key}' must be a non-empty mapping, got {table!r}")
    return table


class _Curve:
    """Monotone piecewise-linear y(x): constant below x[0], linear extrapolation beyond x[-1]."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        order = np.argsort(x)
        self.x = np.asarray(x, dtype=np.float64)[order]
        self.y = np.maximum.accumulate(np.asarray(y, dtype=np.float64)[order])
        self.slope = 0.0
        if self.x.size >= 2:
            self.slope = max(0.0, (self.y[-1] - self.y[-2]) / (self.x[-1] - self.x[-2]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        out = np.interp(x, self.x, self.y)
        beyond = x > self.x[-1]
        return np.where(beyond, self.y[-1] + self.slope * (x - self.x[-1]), out)


class SPSProfile:
    """Step-time tables of one (target, drafter, device, dtype). Build with `load` or `from_dict`."""

    def __init__(
        self,
        *,
        verify_grid: Mapping[tuple[int, int], float] | None = None,
        verify_by_tokens: Mapping[int, float] | None = None,
        draft_by_requests: Mapping[int, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        if (verify_grid is None) == (verify_by_tokens is None):
            raise ProfileError("an SPS profile needs exactly one of a (R, L) grid or a by-tokens table")
        self.metadata = dict(metadata or {})
        self.is_grid = verify_grid is not None
        self._draft = None
        if draft_by_requests:
            r = np.array(sorted(draft_by_requests), dtype=np.float64)
            self._draft = _Curve(r, np.array([draft_by_requests[int(k)] for k in r]))
        if verify_by_tokens is not None:
            b = np.array(sorted(verify_by_tokens), dtype=np.float64)
            self._by_tokens = _Curve(b, np.array([verify_by_tokens[int(k)] for k in b]))
            return
        rows = sorted({r for r, _ in verify_grid})
        lens = np.array(sorted({length for _, length in verify_grid}), dtype=np.float64)
        # Resample every R row on the union of measured L (each row monotone in L), then force the grid
        # monotone in R as well: more requests at the same L never make a step cheaper.
        grid = np.empty((len(rows), lens.size))
        for i, r in enumerate(rows):
            pts = sorted((length, t) for (rr, length), t in verify_grid.items() if rr == r)
            grid[i] = _Curve(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))(lens)
        grid = np.maximum.accumulate(grid, axis=0)
        self._rows = np.array(rows, dtype=np.float64)
        self._row_curves = [_Curve(lens, grid[i]) for i in range(len(rows))]
        # Beyond the largest R: add (R − R_hi)/(R_hi − R_lo) times the last row difference, made
        # non-decreasing in L so that the extrapolated curve stays monotone in B.
        self._top_step = _Curve(lens, grid[-1] - grid[-2]) if len(rows) >= 2 else None

    # ---------------------------------------------------------------------------------------------
    # Construction and validation
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, expect: Mapping[str, Any] | None = None,
                  source: str = "<dict>") -> "SPSProfile":
        """Validate a parsed profile. `expect` maps metadata keys (e.g. "device", "shape", "model",
        "dtype") to the values this engine needs; a missing or different value raises ProfileError."""
        if not isinstance(data, Mapping):
            raise ProfileError(f"SPS profile {source}: expected a JSON object, got {type(data).__name__}")
        flat_key = next((k for k in _FLAT_KEYS if k in data), None)
        if "verify_ms" not in data and flat_key is None and all(k in data for k in SGLANG_KEYS):
            for key, want in (expect or {}).items():
                raise ProfileError(f"SPS profile {source} is SGLang's table, which records no '{key}'; expected "
                                   f"{key}={want!r} (give a `dspark profile` of this engine instead)")
            return cls._from_sglang(data, source)
        if "verify_ms" not in data and flat_key is None:
            raise ProfileError(f"SPS profile {source}: missing 'verify_ms' (\"RxL\": ms) or 'verify_ms_by_tokens' (\"B\": ms)")
        for key, want in (expect or {}).items():
            if key not in data:
                raise ProfileError(f"SPS profile {source}: has no '{key}' field; expected {key}={want!r}")
            if data[key] != want:
                raise ProfileError(f"SPS profile {source} is for {key}={data[key]!r}, expected {key}={want!r}")
        draft = None
        if "draft_ms" in data:
            draft = {}
            for key, ms in _mapping(data, "draft_ms", source).items():
                draft[_positive_int(key, f"{source} draft_ms")] = _positive_time(ms, f"{source} draft_ms[{key!r}]")
        metadata = {k: v for k, v in data.items() if k not in ("verify_ms", "draft_ms")}
        if "verify_ms" not in data:
            flat = {}
            for key, ms in _mapping(data, flat_key, source).items():
                flat[_positive_int(key, f"{source} {flat_key}")] = _positive_time(ms, f"{source} {flat_key}[{key!r}]")
            return cls(verify_by_tokens=flat, draft_by_requests=draft, metadata=metadata)
        grid = {}
        for key, ms in _mapping(data, "verify_ms", source).items():
            match = _GRID_KEY.match(str(key))
            if match is None:
                raise ProfileError(f"{source} verify_ms: key {key!r} is not \"RxL\" (requests x tokens each)")
            r, length = int(match.group(1)), int(match.group(2))
            if r < 1 or length < 1:
                raise ProfileError(f"{source} verify_ms: key {key!r} needs R ≥ 1 and L ≥ 1")
            grid[(r, length)] = _positive_time(ms, f"{source} verify_ms[{key!r}]")
        return cls(verify_grid=grid, draft_by_requests=draft, metadata=metadata)

    @classmethod
    def _from_sglang(cls, data: Mapping[str, Any], source: str) -> "SPSProfile":
        """SGLang's SPS table (module docstring) → a flat profile without a draft table."""
        tokens, rates = data["sample_batch_tokens"], data["sample_steps_per_sec"]
        if not isinstance(tokens, list) or not isinstance(rates, list) or not tokens or len(tokens) != len(rates):
            raise ProfileError(f"SPS profile {source}: 'sample_batch_tokens' and 'sample_steps_per_sec' must be "
                               "non-empty lists of the same length")
        flat: dict[int, float] = {}
        for i, (b, rate) in enumerate(zip(tokens, rates)):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or (flat and b <= max(flat)):
                raise ProfileError(f"SPS profile {source}: sample_batch_tokens[{i}] = {b!r}; expected strictly "
                                   "increasing integers ≥ 1")
            flat[b] = 1000.0 / _positive_time(rate, f"{source} sample_steps_per_sec[{i}]")
        metadata = {k: v for k, v in data.items() if k not in SGLANG_KEYS}
        metadata["format"] = "sglang-sps"
        return cls(verify_by_tokens=flat, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None) -> "SPSProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"SPS profile {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ProfileError(f"SPS profile {path} is not readable JSON: {exc}") from None
        return cls.from_dict(data, expect=expect, source=str(path))

    # ---------------------------------------------------------------------------------------------
    # Lookups
    # ---------------------------------------------------------------------------------------------

    @property
    def has_draft_cost(self) -> bool:
        return self._draft is not None

    @property
    def max_measured_requests(self) -> int | None:
        """The largest request count R the grid measured (None for a by-tokens table, which has no R axis);
        beyond it every lookup is an extrapolation."""
        return int(self._rows[-1]) if self.is_grid else None

    def verify_ms(self, tokens, requests: int | None = None) -> np.ndarray:
        """Target step time (ms) for B = `tokens` (scalar or array) over `requests` requests (grid only)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if not self.is_grid:
            return self._by_tokens(tokens)
        if requests is None or requests < 1:
            raise ValueError(f"a (R, L) grid profile needs the number of requests (≥ 1), got {requests!r}")
        length = tokens / requests
        rows = self._rows
        if rows.size == 1 or requests <= rows[0]:
            return self._row_curves[0](length)
        if requests >= rows[-1]:
            w = (requests - rows[-1]) / (rows[-1] - rows[-2])
            return self._row_curves[-1](length) + w * self._top_step(length)
        hi = int(np.searchsorted(rows, requests))
        lo = hi - 1
        w = (requests - rows[lo]) / (rows[hi] - rows[lo])
        return (1 - w) * self._row_curves[lo](length) + w * self._row_curves[hi](length)

    def draft_ms(self, requests: int) -> float:
        """Drafter step time (ms) for R requests; 0 if the profile has no drafter table."""
        return float(self._draft(float(requests))) if self._draft is not None else 0.0

    def step_ms(self, tokens, requests: int | None = None, include_draft: bool = False) -> np.ndarray:
        """verify(B) (+ draft(R) if `include_draft`) in ms, monotone non-decreasing in B."""
        ms = self.verify_ms(tokens, requests)
        if include_draft:
            if requests is None:
                raise ValueError("the drafter's cost needs the number of requests")
            ms = ms + self.draft_ms(requests)
        return ms

    def sps(self, tokens, requests: int | None = None, include_draft: bool = False) -> np.ndarray:
        """Steps per second at B = `tokens`."""
        return 1000.0 / self.step_ms(tokens, requests, include_draft)

    def sps_table(self, requests: int, max_tokens: int, include_draft: bool = False) -> np.ndarray:
        """float64 array [max_tokens + 1]: SPS (steps/s) at B = 0..max_tokens tokens for `requests` requests
        (entry 0 repeats entry 1), non-increasing in B."""
        b = np.arange(max_tokens + 1, dtype=np.float64)
        b[0] = 1.0
        ms = np.maximum.accumulate(self.verify_ms(b, requests))
        if include_draft:
            ms = ms + self.draft_ms(requests)
        return 1000.0 / ms
