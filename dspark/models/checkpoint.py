"""Loading and saving HF-format model folders: `config.json` + one or several `*.safetensors`.

Weights are read with safetensors only (never pickle). Every tensor is checked against the shape the
config implies; a missing, unexpected or mis-shaped tensor fails with its name and file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: from `model.safetensors.index.json` if present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, path, handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None


def load_state_into(module: nn.Module, folder: Path, *, dtype: torch.dtype, device: torch.device | str, optional: tuple[str, ...] = ()) -> None:
    """Copy every tensor of the folder's safetensors files into `module`'s parameters and buffers.

    `module` may live on the meta device; it is materialised on `device` in `dtype` (integer buffers
    keep their dtype). Names in `optional` may be absent from the files.
    """
    expected = dict(module.named_parameters())
    expected.update({k: v for k, v in module.named_buffers() if k in module.state_dict()})
    files = safetensors_files(folder)
    loaded: dict[str, torch.Tensor] = {}
    for name, path, tensor in iter_tensors(files):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in expected:
            if name in optional:
                continue
            raise CheckpointError(f"{path}: unexpected tensor '{name}' (this checkpoint does not match the config)")
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the config implies {want}"
            )
        if not tensor.is_floating_point() and expected[name].is_floating_point():
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, expected a floating type")
        loaded[name] = tensor
    missing = [n for n in expected if n not in loaded and n not in optional]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: missing tensor(s) {shown}")
    module.to_empty(device=device)
    materialised = dict(module.named_parameters())
    materialised.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name in expected:
            target = materialised[name]
            if name in loaded:
                target.copy_(loaded[name].to(dtype if target.is_floating_point() else target.dtype))
    module.to(dtype=dtype)


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
