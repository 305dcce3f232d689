"""Host synchronisation: the one batched transfer a step may make, and a counter of everything else.

On a GPU every read of a device value by Python (`.item()`, `int(t)`, `bool(t)`, `.tolist()`), every
device-to-host copy and every operation whose output size depends on data (`nonzero`, boolean-mask
indexing, `masked_select`, `unique`, `repeat_interleave` without `output_size`) makes the CPU wait until
the GPU has finished all queued work; in a decoding loop each such wait leaves the GPU idle while Python
prepares the next launch (issue 17; docs/architecture.md "host syncs"). The engine's step therefore
reads device values through `to_host` only: once after the target forward, and once in the planning phase
when the drafter ran (the plan needs the drafts and their confidences before the forward).

`HostSyncCounter` is a `TorchDispatchMode` that records, while active:
* `syncs` — the ATen operations above (they reach the dispatcher on the CPU too: `item`, `int()`,
  `bool()` become `aten._local_scalar_dense`), device-to-host copies, host-to-device `.to()` copies without
  `non_blocking` (on a GPU only; `dspark.devices.to_device` is the asynchronous way), and calls of
  `Tensor.tolist` (which on the CPU does not dispatch, so it is counted at the Python level) outside
  `to_host`. `torch.tensor(values, device=cuda)` does not reach the dispatcher: the step builds host tensors
  and moves them with `to_device`;
* `transfers` — the calls of `to_host`.
Apart from host-to-device copies, the counts are the same on the CPU and on CUDA, so the CPU test suite
enforces what a GPU needs.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

DATA_DEPENDENT_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.multinomial.default,
}

_active: list["HostSyncCounter"] = []
_transferring = False  # inside `to_host`'s own copy, which is counted as the transfer, not as a sync


def to_host(tensors: Sequence[torch.Tensor]) -> list:
    """The one device-to-host transfer of a step: tensors of any shapes → their values as nested Python lists
    (a 0-d tensor → a number), read by one copy of one packed buffer: int64 when every tensor is integer or
    bool, else float64 (integers below 2**53, token ids included, are exact there and come back as int)."""
    if not tensors:
        return []
    floating = any(t.is_floating_point() for t in tensors)
    dtype = torch.float64 if floating else torch.long
    flat = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    flat = [t if t.dtype == dtype else t.to(dtype) for t in flat]
    packed = torch.cat(flat) if len(flat) > 1 else flat[0]
    for counter in _active:
        counter.transfers += 1
    global _transferring
    _transferring = True
    try:
        values = _untracked_tolist(packed.to("cpu") if packed.device.type != "cpu" else packed)
    finally:
        _transferring = False
    out, start = [], 0
    for t, f in zip(tensors, flat):
        chunk = values[start: start + f.numel()]
        start += f.numel()
        if floating and not t.is_floating_point():
            chunk = [int(v) for v in chunk]
        out.append(_nest(chunk, list(t.shape)))
    return out


def host_list(tensor: torch.Tensor) -> list:
    """The values of a tensor that is on the host by contract (the controller's plan, a proposal already
    read by `to_host`): not a synchronisation, so not counted. ValueError for a tensor on a device, where
    reading it would be one."""
    if tensor.device.type != "cpu":
        raise ValueError(f"host_list of a tensor on {tensor.device}: read device values with to_host")
    return _ORIGINAL_TOLIST(tensor)


def _nest(values: list, shape: list[int]):
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step: (i + 1) * step], shape[1:]) for i in range(shape[0])]


_ORIGINAL_TOLIST = torch.Tensor.tolist


def _untracked_tolist(tensor: torch.Tensor):
    return _ORIGINAL_TOLIST(tensor)


def _counting_tolist(self: torch.Tensor):
    for counter in _active:
        counter.record("Tensor.tolist")
    return _ORIGINAL_TOLIST(self)


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _caller() -> str:
    """file:line of the innermost frame in the dspark package outside this file."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE) and not frame.filename.endswith("host_syncs.py"):
            return f"{Path(frame.filename).relative_to(Path(_PACKAGE).parent)}:{frame.lineno}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """with HostSyncCounter() as c: ...  →  c.syncs ("op at dspark/file.py:line", in order), c.transfers
    (calls of to_host)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.transfers = 0

    def record(self, name: str) -> None:
        self.syncs.append(f"{name} at {_caller()}")

    def __enter__(self):
        if not _active:
            torch.Tensor.tolist = _counting_tolist
        _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        if not _active:
            torch.Tensor.tolist = _ORIGINAL_TOLIST
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _transferring:
            return func(*args, **kwargs)
        if func in DATA_DEPENDENT_OPS or _is_boolean_index(func, args) or _is_unsized_repeat(func, kwargs) \
                or _is_blocking_copy(func, args, kwargs):
            self.record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


def _is_boolean_index(func, args) -> bool:
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


def _is_unsized_repeat(func, kwargs) -> bool:
    return func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) and kwargs.get("output_size") is None


def _is_blocking_copy(func, args, kwargs) -> bool:
    """A copy the host waits for: device → host, or host → device without non_blocking (pageable memory:
    the copy, and so every kernel queued before it, finishes before the call returns; `devices.to_device`
    copies from pinned memory instead)."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        if target is None or torch.device(target).type == args[0].device.type:
            return False
        return torch.device(target).type == "cpu" or not kwargs.get("non_blocking", False)
    if func is aten.copy_.default:
        destination, source = args[0].device.type, args[1].device.type
        return destination != source and (destination == "cpu" or not (len(args) > 2 and args[2]))
    return False


class OpCounter(TorchDispatchMode):
    """Every ATen operation that reaches the dispatcher while active, by name (views included: on a GPU each
    other operation launches at least one kernel). May be entered again to keep counting."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_engine_steps(engine, steps: int, ops: OpCounter | None = None
                       ) -> tuple[list[HostSyncCounter], list[HostSyncCounter]]:
    """Run `steps` steps of `engine` (a `dspark.engine.engine.Engine`) → (a counter per whole step, a counter
    per forward-to-commit window, i.e. per `run_step` call); `ops`, when given, also counts every operation
    of the steps. For tests and benchmarks: the engine module's `run_step` is wrapped while it runs."""
    import dspark.engine.engine as engine_module

    windows: list[HostSyncCounter] = []
    run_step = engine_module.run_step

    def counted_run_step(*args, **kwargs):
        with HostSyncCounter() as counter:
            out = run_step(*args, **kwargs)
        windows.append(counter)
        return out

    engine_module.run_step = counted_run_step
    whole: list[HostSyncCounter] = []
    try:
        for _ in range(steps):
            with HostSyncCounter() as counter:
                if ops is None:
                    engine.step()
                else:
                    with ops:
                        engine.step()
            whole.append(counter)
    finally:
        engine_module.run_step = run_step
    return whole, windows
