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


def load_drafter(spec: str, *, num_draft_tokens: int | None = None, **kwargs) -> Drafter:
    """`spec`: "ngram", a built-in drafter name (`dspark.models.zoo.BUILTIN_DRAFTERS`) or a checkpoint folder
    (dispatched on its config's `architectures`); `kwargs` (device, dtype) go to the folder's loader. The
    drafter's `source` is the folder it was loaded from (None for ngram): calibration files are bound to it
    (`dspark.calibration.calibration_file.regimes_for`).
    """
    from dspark.models.zoo import DRAFTER_NAMES, resolve_drafter

    if spec == "ngram":
        from dspark.models.drafters.ngram import NgramDrafter

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
            drafter.source = folder
            return drafter
    known = ", ".join(sorted(_FOLDER_LOADERS)) or "none yet"
    raise CheckpointError(f"{config_path}: drafter architecture {archs!r} is not supported (supported: {known})")


def compile_drafter(drafter: Drafter) -> bool:
    """`--compile` for the drafter: a DSpark or DFlash drafter's block pass runs its dense parts through
    torch.compile (`DSparkModel.compile_dense_parts`). Returns False for the others, which run eagerly."""
    from dspark.models.drafters.dspark import DSparkDrafter

    if not isinstance(drafter, DSparkDrafter):
        return False
    drafter.model.compile_dense_parts()
    return True
