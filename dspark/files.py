"""Atomic file writes shared by the commands that keep state on disk (calibration files, SPS profiles)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
