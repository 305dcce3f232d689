"""Calibration file: the STS temperatures of one drafter (SPEC §4.2), bound to that drafter's weights.

JSON, format "dspark-calibration-v1":
  {"format", "drafter": {"name", "config_sha256", "weights_sha256"} (`target_identity` of the drafter
   folder), "block_size": γ, "temperatures": [γ] (T_k > 0, position 1 first), "fitted_on": {counts, data
   sets, ...}, "ece_before", "ece_after": metrics dicts or null, "created": ISO-8601 UTC time}
Written atomically (temporary sibling file, then os.replace). Loading checks the format, the drafter's
identity (both hashes; the name is informative) and the block size, and that every T_k is finite and > 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dspark.errors import CheckpointError

FORMAT = "dspark-calibration-v1"
_FORMAT_PREFIX = "dspark-calibration-v"
_IDENTITY_KEYS = ("config_sha256", "weights_sha256")


def drafter_identity(folder: str | Path) -> dict[str, str]:
    """{"name", "config_sha256", "weights_sha256"} of a model folder (`feature_cache.target_identity`)."""
    from dspark.training.feature_cache import target_identity

    return target_identity(folder)


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration file; temperatures [γ] floats, position 1 first."""

    temperatures: list[float]
    block_size: int
    drafter: dict
    fitted_on: dict = field(default_factory=dict)
    ece_before: dict | None = None
    ece_after: dict | None = None
    created: str = ""
    path: Path | None = None


def _check_temperatures(temperatures: Any, block_size: int | None, where: str, error: type[Exception]) -> list[float]:
    if isinstance(temperatures, (str, bytes, dict)):
        raise error(f"{where}: temperatures must be a list of numbers, got {temperatures!r}")
    try:
        temps = [float(t) for t in temperatures]
        numeric = all(not isinstance(t, bool) for t in temperatures)
    except (TypeError, ValueError):
        raise error(f"{where}: temperatures must be a list of numbers, got {temperatures!r}") from None
    if not numeric or not temps:
        raise error(f"{where}: temperatures must be a non-empty list of numbers, got {temperatures!r}")
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise error(f"{where}: temperatures must be finite and > 0, found {bad} in {temps}")
    if block_size is not None and len(temps) != block_size:
        raise error(f"{where}: {len(temps)} temperatures for block size {block_size}")
    return temps


def save_calibration(path: str | Path, temperatures: Any, *, drafter_folder: str | Path | None = None,
                     drafter: dict | None = None, block_size: int | None = None, fitted_on: dict | None = None,
                     ece_before: dict | None = None, ece_after: dict | None = None) -> dict:
    """Write the calibration file atomically and return its content.

    The drafter is named by its folder (identity computed here) or by an identity dict; block_size
    defaults to len(temperatures). ece_before/ece_after: e.g. `position_metrics(...)` dicts (JSON-able,
    no NaN). ValueError on bad arguments.
    """
    path = Path(path)
    if (drafter_folder is None) == (drafter is None):
        raise ValueError("give exactly one of drafter_folder and drafter (an identity dict)")
    identity = drafter_identity(drafter_folder) if drafter_folder is not None else dict(drafter)
    missing = [k for k in _IDENTITY_KEYS if not isinstance(identity.get(k), str)]
    if missing:
        raise ValueError(f"drafter identity lacks {missing}: {identity}")
    temps = _check_temperatures(list(temperatures), block_size, str(path), ValueError)
    content = {
        "format": FORMAT,
        "drafter": identity,
        "block_size": len(temps),
        "temperatures": temps,
        "fitted_on": dict(fitted_on or {}),
        "ece_before": ece_before,
        "ece_after": ece_after,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(content, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX):
            raise CheckpointError(f"{path}: calibration format {fmt!r} is not supported; this dspark reads {FORMAT!r}")
        raise CheckpointError(f"{path}: not a dspark calibration file (format {fmt!r}, expected {FORMAT!r})")
    identity = content.get("drafter")
    if not isinstance(identity, dict) or any(not isinstance(identity.get(k), str) for k in _IDENTITY_KEYS):
        raise CheckpointError(f"{path}: 'drafter' must be an identity object with {list(_IDENTITY_KEYS)}")
    size = content.get("block_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: 'block_size' must be a positive integer, got {size!r}")
    temps = _check_temperatures(content.get("temperatures"), size, str(path), CheckpointError)
    if block_size is not None and int(block_size) != size:
        raise CheckpointError(f"{path}: calibration was fitted for block size {size}, but the drafter runs with block "
                              f"size {block_size}; refit it (dspark calibrate) for this block size")
    if drafter_folder is not None:
        current = drafter_identity(drafter_folder)
        if any(current[k] != identity[k] for k in _IDENTITY_KEYS):
            raise CheckpointError(f"{path}: calibration was fitted for drafter {_describe(identity)}, but {drafter_folder} "
                                  f"is {_describe(current)}; refit it (dspark calibrate) for this drafter")
    if not isinstance(content.get("fitted_on", {}), dict):
        raise CheckpointError(f"{path}: 'fitted_on' must be an object")
    return Calibration(
        temperatures=temps,
        block_size=size,
        drafter=identity,
        fitted_on=content.get("fitted_on", {}),
        ece_before=content.get("ece_before"),
        ece_after=content.get("ece_after"),
        created=str(content.get("created", "")),
        path=path,
    )
