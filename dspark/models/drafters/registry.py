"""Resolve `--drafter` values: the model-free "ngram", a built-in drafter name, or a drafter checkpoint folder
dispatched on `architectures` in its config.json to the loader a drafter module registered."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dspark.errors import CheckpointError, ConfigError
from dspark.models.config import architectures_field, read_json_object
from dspark.models.drafters.base import Drafter

_FOLDER_LOADERS: dict[str, Callable[..., Drafter]] = {}
BUILTIN_DRAFTER_MODULES = ("dspark.models.drafters.dspark", "dspark.models.drafters.eagle3", "dspark.models.drafters.mtp")


def _import_builtin_drafters() -> None:
    import importlib

    for module in BUILTIN_DRAFTER_MODULES:
        importlib.import_module(module)


def register_drafter(architecture: str, loader: Callable[..., Drafter]) -> None:
    """Register `loader(folder, **kwargs) -> Drafter` for checkpoints whose config names `architecture`."""
    _FOLDER_LOADERS[architecture] = loader


def load_drafter(spec: str, *, num_draft_tokens: int | None = None, calibration: str | None = "auto", **kwargs) -> Drafter:
    """`spec`: "ngram", a built-in drafter name (`dspark.models.zoo.BUILTIN_DRAFTERS`) or a checkpoint folder.

    calibration (drafters with a confidence head): a calibration file (`dspark calibrate`) to apply, checked
    against this drafter's weights and block size; "auto" = the built-in calibration when it was fitted for
    exactly this drafter, else the raw head; None or "none" = the raw head. A file given for a drafter
    without a confidence head is refused (ConfigError).
    """
    from dspark.models.zoo import DRAFTER_NAMES, resolve_drafter

    if spec == "ngram":
        from dspark.models.drafters.ngram import NgramDrafter

        _refuse_calibration(calibration, spec)
        return NgramDrafter(num_draft_tokens=7 if num_draft_tokens is None else num_draft_tokens)
    folder = Path(resolve_drafter(spec))
    if not folder.is_dir():
        raise ConfigError(f"--drafter {spec!r}: neither a built-in drafter name ({', '.join(DRAFTER_NAMES)}) "
                          "nor an existing folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a drafter folder needs config.json and model.safetensors")
    archs = architectures_field(read_json_object(config_path), str(config_path))
    _import_builtin_drafters()
    for arch in archs:
        if arch in _FOLDER_LOADERS:
            drafter = _FOLDER_LOADERS[arch](folder, **kwargs)
            if num_draft_tokens is not None:
                drafter.check_num_draft_tokens(num_draft_tokens)
            if drafter.provides_confidence:
                drafter.set_calibration(_calibration_regimes(calibration, folder, drafter.block_size))
            else:
                _refuse_calibration(calibration, f"{folder} ({arch})")
            return drafter
    known = ", ".join(sorted(_FOLDER_LOADERS)) or "none yet"
    raise CheckpointError(f"{config_path}: drafter architecture {archs!r} is not supported (supported: {known})")


def _refuse_calibration(calibration: str | None, drafter: str) -> None:
    """ConfigError when a calibration file was named for a drafter that has no confidence head."""
    if calibration not in (None, "auto", "none"):
        raise ConfigError(f"--calibration {calibration!r}: drafter {drafter} has no confidence head to calibrate; "
                          "omit --calibration (or give 'none')")


def _calibration_regimes(calibration: str | None, folder: Path, block_size: int) -> dict[float, list[float]] | None:
    """{sampling temperature: temperatures [γ]} of the calibration to apply, or None (the raw head)."""
    from dspark.calibration.calibration_file import drafter_identity, load_calibration

    if calibration is None or calibration == "none":
        return None
    if calibration == "auto":
        from dspark.models.zoo import builtin_calibration

        path = builtin_calibration()
        if path is None:
            return None
        stored = load_calibration(path).drafter
        mine = drafter_identity(folder)
        if any(stored.get(k) != mine[k] for k in ("config_sha256", "weights_sha256")):
            return None
        calibration = str(path)
    return load_calibration(calibration, drafter_folder=folder, block_size=block_size).by_sampling_temperature()
