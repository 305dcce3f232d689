"""Model families: one small file per family, each calling `register(ModelFamily(...))`.

A family only states how its HF config maps onto the shared decoder (bias layout, q/k norm, which
config features it cannot run). Every module in this package is imported on first use, so adding a
family is adding one file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from dspark.errors import UnsupportedModelError


def _never(hf: dict[str, Any]) -> bool:
    return False


def _no_reason(hf: dict[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class ModelFamily:
    """How one HF architecture maps onto `dspark.models.decoder.DecoderModel`."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    qk_norm: bool = False
    qkv_bias: Callable[[dict[str, Any]], bool] = _never
    o_bias: Callable[[dict[str, Any]], bool] = _never
    mlp_bias: Callable[[dict[str, Any]], bool] = _never
    unsupported_reason: Callable[[dict[str, Any]], str | None] = _no_reason
    tie_word_embeddings_default: bool = False


_FAMILIES: dict[str, ModelFamily] = {}
_LOADED = False


def register(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.name] = family
    return family


def all_families() -> dict[str, ModelFamily]:
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True
    return dict(_FAMILIES)


def family_for_config(hf: dict[str, Any], where: str) -> ModelFamily:
    from dspark.models.config import architectures_field

    families = all_families().values()
    archs = architectures_field(hf, where)
    for family in families:
        if any(a in family.architectures for a in archs):
            return family
    model_type = hf.get("model_type")
    for family in families:
        if model_type in family.model_types:
            return family
    known = sorted(a for f in families for a in f.architectures)
    raise UnsupportedModelError(
        f"{where}: unsupported architecture {archs or model_type!r}; supported: {', '.join(known)}"
    )
