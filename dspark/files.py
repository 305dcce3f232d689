"""Output files, in one place: atomic writes (calibration files, SPS profiles), the checks every command
runs on its output paths before any work starts, and the lock that keeps two processes from writing one
output."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dspark.errors import ConfigError


def default_mode(base: int = 0o666) -> int:
    """`base` (0o666 for files, 0o777 for folders) under the process umask: the mode a plain open() or
    mkdir() would give; tempfile's mkstemp / mkdtemp give 0600 / 0700 instead."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary sibling file, fsync it, give it the usual file mode, then rename it over
    `path` in one step: a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_creatable(path: Path, what: str) -> None:
    """The folders missing above `path` can be made: the nearest existing ancestor is a writable folder."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: no permission to write in {ancestor}")


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """Validate a file the command will write, before any work starts: it is not an existing folder, and
    it or its missing parent folders can be created. Nothing is created. An existing file is replaced later.

    ConfigError naming `what` (the option or config key) and the path otherwise."""
    path = Path(path)
    if str(path) in ("", "."):
        raise ConfigError(f"{what}: an output file name is required")
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path}: the file exists and is not writable")
    _check_creatable(path, what)
    return path


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """Validate a folder the command will write into, before any work starts: it is an existing folder
    or can be created (it is not a file, nor below one). Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path}: no permission to write in this folder")
    else:
        _check_creatable(path, what)
    return path


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `path` (a file or folder being written) for the `with` block, so
    a second process writing the same output refuses at once (ConfigError) instead of interleaving with
    the first. The lock is the sibling file `.<name>.lock` (flock: released when the process exits, even
    killed); it holds the owner's pid for the message."""
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise ConfigError(f"{what} {path}: another process (pid {owner}) is writing it; wait for it to finish "
                              f"or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield lock_path
    finally:
        handle.close()
