"""The one place a device or compute dtype named by the user becomes a `torch.device` / `torch.dtype`.

Every command (`--device`), every YAML config (`train.device`) and every loader goes through
`resolve_device`, so a device this machine lacks is refused with one line before any work starts:

    auto      CUDA device 0 when CUDA is available, else the CPU (the default everywhere)
    cpu
    cuda      the current CUDA device;  cuda:N  device N

`resolve_dtype` gives the compute dtype: float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU,
unless one is named.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = f"{DEVICE_CHOICES} (default auto: CUDA when available, else CPU)"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """`device` ("auto", "cpu", "cuda", "cuda:N" or a torch.device; None = "auto") → torch.device.

    ConfigError naming `what` (e.g. "--device", "train.device") when the name is unknown, CUDA is absent,
    or the index is beyond this machine's devices.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif device is None:
        spec = "auto"
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ConfigError(f"{what}: expected a device name ({DEVICE_CHOICES}), got {device!r}")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {device!r}: unknown device; use {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ConfigError(f"{what} {device!r}: unknown device; use {DEVICE_CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                              "use cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{what} {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cpu") if dev.type == "cpu" else dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None) -> torch.dtype:
    """None or "auto" → float32 on CPU, bfloat16 on GPU; otherwise one of DTYPES (ConfigError naming it)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if resolve_device(device).type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors → `device` without making the host wait: one pinned buffer per dtype and one asynchronous
    copy each (a plain `.to(cuda)` of pageable memory waits for the copy, and so for every kernel queued
    before it). Returns the tensors on `device`, in their shapes (on the CPU: the tensors themselves)."""
    out: list[torch.Tensor] = list(tensors)
    if device.type == "cpu":
        return out
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":  # a tensor already on a device stays where it is
            by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        packed = torch.cat([tensors[i].reshape(-1) for i in indices]).pin_memory().to(device, non_blocking=True)
        for i, part in zip(indices, packed.split([tensors[i].numel() for i in indices])):
            out[i] = part.view(tensors[i].shape)
    return out
