"""Loading and saving HF-format model folders: `config.json` + one or several `*.safetensors`.

Weights are read with safetensors only (never pickle). Loading goes in three steps, so that a bad folder
fails fast and names its culprit (tensor and file):
  1. `read_tensor_index` reads the files' headers only (names, shapes, dtypes; no tensor data);
  2. `check_index` compares the layer count and a few key shapes with the config, before any module is
     built (a config claiming 10⁹ layers is refused at once instead of building them);
  3. `load_state_into` checks every name, shape and dtype against the (meta-device) module, materialises
     it and copies the tensors in one at a time.
Every floating tensor is checked to be finite once copied (one NaN would make decoding emit garbage with
no error). Set the environment variable DSPARK_SKIP_WEIGHT_CHECK=1 to skip that check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dspark.errors import CheckpointError
from dspark.files import default_mode

# Keys some exporters write that carry no weights of ours (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SKIP_WEIGHT_CHECK_ENV = "DSPARK_SKIP_WEIGHT_CHECK"
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def weight_check_enabled() -> bool:
    """False when DSPARK_SKIP_WEIGHT_CHECK is set to 1 (or true/yes): loaded weights are then not checked
    for NaN/inf."""
    return os.environ.get(SKIP_WEIGHT_CHECK_ENV, "").strip().lower() not in ("1", "true", "yes")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: from `model.safetensors.index.json` if present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed shard index ('weight_map' must map tensor names to file names)")
        files = sorted({folder / name for name in weight_map.values()})
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index}: lists shard {path.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{folder}: no *.safetensors weight file{hint}")
    return files


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it: file, shape, safetensors dtype name ("F32", "BF16", "I64")."""

    path: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def read_tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Name → `TensorEntry` for every tensor of the folder's safetensors files, from the headers only
    (no tensor data is read). CheckpointError for an unreadable file or a name in two files."""
    index: dict[str, TensorEntry] = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    if name in index:
                        raise CheckpointError(f"{path}: tensor '{name}' is also in {index[name].path.name}")
                    index[name] = TensorEntry(path, tuple(int(d) for d in view.get_shape()), str(view.get_dtype()))
        except _READ_ERRORS as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
    return index


def iter_tensors(index: dict[str, TensorEntry], names: set[str]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(name, file, tensor) for each of `names`, read one at a time, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, entry in index.items():
        if name in names:
            by_file.setdefault(entry.path, []).append(name)
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    yield name, path, handle.get_tensor(name)
        except _READ_ERRORS as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None


@dataclass(frozen=True)
class IndexExpectation:
    """What a config fixes about a checkpoint's tensor index before its model is built.

    layer_prefix: tensors `{layer_prefix}{i}.*` are decoder layer i (None: no numbered layers), and there
    must be exactly `num_layers` of them (config field `layer_field`). shapes: tensors every checkpoint of
    this config holds, name → the shape the config implies.
    """

    layer_prefix: str | None
    num_layers: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layer_field: str = "num_hidden_layers"


def check_index(index: dict[str, TensorEntry], expect: IndexExpectation, folder: Path, where: str) -> None:
    """Refuse, before any module is built, a tensor index whose layer count or key shapes contradict the
    config at `where`. CheckpointError naming the tensor and file (or the missing layers)."""
    for name, shape in expect.shapes.items():
        if name not in index:
            raise CheckpointError(f"{folder}: missing tensor(s) {name}")
        _check_entry(name, index[name], shape, True)
    if expect.layer_prefix is None:
        return
    pattern = re.compile(re.escape(expect.layer_prefix) + r"(\d+)\.")
    first_of_layer: dict[int, str] = {}
    for name in index:
        match = pattern.match(name)
        if match:
            first_of_layer.setdefault(int(match.group(1)), name)
    n, layers = expect.num_layers, sorted(first_of_layer)
    beyond = [i for i in layers if i >= n]
    if beyond:
        name = first_of_layer[beyond[0]]
        raise CheckpointError(
            f"{index[name].path}: unexpected tensor '{name}' ({where} has {expect.layer_field}={n}, the weights hold "
            f"{len(layers)} layers; this checkpoint does not match the config)"
        )
    held = layers[-1] + 1 if layers else 0  # a gap below it is reported tensor by tensor by load_state_into
    if held < n:
        shown = [f"{expect.layer_prefix}{i}.*" for i in range(held, min(n, held + 5))]
        more = n - held - len(shown)
        raise CheckpointError(
            f"{folder}: missing tensor(s) {', '.join(shown)}{f' and {more} more layers' if more else ''} "
            f"({where} has {expect.layer_field}={n}, the weights hold {len(layers)} layers)"
        )


def _check_entry(name: str, entry: TensorEntry, want: tuple[int, ...], want_float: bool) -> None:
    if entry.shape != tuple(want):
        raise CheckpointError(f"{entry.path}: tensor '{name}' has shape {entry.shape}, the config implies {tuple(want)}")
    if want_float and not entry.is_floating_point:
        raise CheckpointError(f"{entry.path}: tensor '{name}' has dtype {entry.dtype}, expected a floating type")


def load_state_into(
    module: nn.Module, folder: Path, *, dtype: torch.dtype, device: torch.device | str, optional: tuple[str, ...] = (),
    index: dict[str, TensorEntry] | None = None,
) -> None:
    """Copy every tensor of the folder's safetensors files into `module`'s parameters and buffers.

    `module` may live on the meta device; it is materialised on `device` in `dtype` (integer buffers keep
    their dtype). Names in `optional` may be absent from the files. `index`: the folder's
    `read_tensor_index`, when already read. Every name, shape and dtype is checked against the header
    index before any tensor data is read; tensors are then read and copied one at a time (no second copy
    of the whole state in memory) and checked to be finite (`weight_check_enabled`).
    """
    expected = dict(module.named_parameters())
    expected.update({k: v for k, v in module.named_buffers() if k in module.state_dict()})
    if index is None:
        index = read_tensor_index(folder)
    wanted: set[str] = set()
    for name, entry in index.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in expected:
            if name in optional:
                continue
            raise CheckpointError(f"{entry.path}: unexpected tensor '{name}' (this checkpoint does not match the config)")
        _check_entry(name, entry, tuple(expected[name].shape), expected[name].is_floating_point())
        wanted.add(name)
    missing = [n for n in expected if n not in wanted and n not in optional]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: missing tensor(s) {shown}")
    module.to(dtype=dtype)
    module.to_empty(device=device)
    materialised = dict(module.named_parameters())
    materialised.update(dict(module.named_buffers()))
    check = weight_check_enabled()
    with torch.no_grad():
        for name, path, tensor in iter_tensors(index, wanted):
            target = materialised[name]
            target.copy_(tensor)
            if check and target.is_floating_point() and not all_finite(target):
                raise _non_finite(name, path, tensor, target.dtype)


FINITE_CHECK_ELEMENTS = 1 << 24  # elements checked at once: a 16 MB temporary, not one as large as the tensor


def all_finite(tensor: torch.Tensor, chunk: int = FINITE_CHECK_ELEMENTS) -> bool:
    """No NaN or inf in `tensor`, checked `chunk` elements at a time, so the check of a loaded weight on its device
    adds at most `chunk` bytes to the loading peak (a whole Qwen3-4B embedding at once would add 389 MB)."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def _non_finite(name: str, path: Path, source: torch.Tensor, dtype: torch.dtype) -> CheckpointError:
    if source.is_floating_point() and not bool(torch.isfinite(source).all()):
        bad = int((~torch.isfinite(source)).sum())
        return CheckpointError(
            f"{path}: tensor '{name}' holds {bad} non-finite value(s) (NaN/inf); the checkpoint is corrupt "
            f"(set {SKIP_WEIGHT_CHECK_ENV}=1 to load it anyway)"
        )
    return CheckpointError(f"{path}: tensor '{name}' overflows {str(dtype).removeprefix('torch.')} (values beyond its "
                           "range); load the model in a wider dtype")


def save_folder_atomically(folder: Path, write: "callable[[Path], None]") -> None:
    """Run `write(tmp_dir)` into a temporary sibling folder, then move it to `folder` in one rename.

    A crash mid-write leaves no half-written model folder behind. An existing `folder` is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, default_mode(0o777))  # mkdtemp makes it 0700; the final folder follows the umask
        write(tmp)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(backup)
            tmp.rename(folder)
            shutil.rmtree(backup)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata or {"format": "pt"})
