"""The checkpoint folder of a training run, in one place for `Trainer` (drafters) and `Pretrainer` (targets).

Layout under `root`:
  step_<N>/   one saved optimizer step, written through a temporary sibling `.step_<N>.tmp-*` renamed in one
              step (`save_folder_atomically`); a replaced folder passes through `.step_<N>.old-*`
  latest      one line naming the newest step folder, replaced atomically after that folder is complete

A checkpoint is *complete* when every file its kind writes (`files`) is present. On start, leftovers of a
killed run (`.step_*.tmp-*`, `.step_*.old-*`, a temporary `latest`) are deleted with one note each. The
resume point is the folder `latest` names when complete, else the newest complete `step_<N>` (with a note),
else none. With `keep_last = K`, every save deletes all but the K newest step folders up to the one
`latest` names (that one is never deleted); folders beyond it (left by an abandoned run) are replaced as the
run reaches them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from dspark.files import exclusive_lock, write_text_atomically
from dspark.models.checkpoint import save_folder_atomically

STEP_NAME = re.compile(r"step_(\d+)")
STALE_PATTERNS = (".step_*.tmp-*", ".step_*.old-*", ".latest.*.tmp", "latest.tmp")
POINTER = "latest"


def stderr_note(label: str) -> Callable[[str], None]:
    """A `log` for `CheckpointFolder`: `<label>: note: <message>` on stderr."""
    return lambda message: print(f"{label}: note: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def output_lock(output_dir: str | Path, what: str = "train.output_dir") -> Iterator[None]:
    """`exclusive_lock(output_dir)` in the process that writes the run's output: the only one, or the one
    with RANK 0 under torchrun (the others write nothing)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with exclusive_lock(output_dir, what):
        yield


class CheckpointFolder:
    """`root`'s step folders and `latest` pointer. `files`: paths (relative to a step folder) that every
    complete checkpoint of this kind holds; `keep_last`: step folders kept (None = all); `log`: notes."""

    def __init__(self, root: str | Path, files: tuple[str, ...], keep_last: int | None = None,
                 log: Callable[[str], None] = stderr_note("dspark")):
        self.root = Path(root)
        self.files = files
        self.keep_last = keep_last
        self.log = log

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def steps(self) -> list[tuple[int, Path]]:
        """(N, folder) of every `step_<N>` folder, ascending N."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_NAME.fullmatch(p.name)) and p.is_dir()]
        return sorted(found)

    def missing_files(self, folder: Path) -> list[str]:
        return [name for name in self.files if not (folder / name).is_file()]

    def latest(self) -> Path | None:
        """The folder `latest` names (not checked to exist), or None without a readable pointer."""
        try:
            name = (self.root / POINTER).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.root / name if STEP_NAME.fullmatch(name) else None

    def remove_stale(self) -> list[Path]:
        """Delete the temporary folders / files a killed run left behind; one note per item."""
        stale = sorted({p for pattern in STALE_PATTERNS for p in self.root.glob(pattern)}) if self.root.is_dir() else []
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            self.log(f"removed {path}, left over from an interrupted run")
        return stale

    def resume_point(self) -> Path | None:
        """The complete checkpoint to resume from (see the module docstring), or None to start at step 0."""
        latest = self.latest()
        if latest is not None and latest.is_dir() and not self.missing_files(latest):
            return latest
        if latest is not None:
            problem = "is missing" if not latest.is_dir() else f"is incomplete (no {', '.join(self.missing_files(latest))})"
            reason = f"{self.root / POINTER} names {latest.name}, which {problem}"
        elif (self.root / POINTER).exists():
            reason = f"{self.root / POINTER} is unreadable"
        else:
            reason = f"{self.root / POINTER} is missing"
        complete = [folder for _, folder in self.steps() if not self.missing_files(folder)]
        if complete:
            self.log(f"{reason}: resuming from the newest complete checkpoint, {complete[-1]}")
            return complete[-1]
        if latest is not None or self.steps():
            self.log(f"{reason} and no complete checkpoint is left: starting from step 0")
        return None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(tmp)` fills step folder `step` (atomically); then `latest` names it; then `prune()`."""
        folder = self.folder(step)
        save_folder_atomically(folder, write)
        write_text_atomically(self.root / POINTER, folder.name + "\n")
        self.prune()
        return folder

    def prune(self) -> list[Path]:
        """With keep_last = K: delete the step folders older than the K newest up to `latest`'s."""
        latest = self.latest()
        if self.keep_last is None or latest is None:
            return []
        match = STEP_NAME.fullmatch(latest.name)
        older = [folder for n, folder in self.steps() if n <= int(match.group(1)) and folder != latest]
        doomed = older[: max(0, len(older) - (self.keep_last - 1))]
        for folder in doomed:  # renamed first: a kill mid-delete leaves a stale folder, not a torn checkpoint
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(trash)
            shutil.rmtree(trash)
        return doomed
