"""The mutation check: does the test suite catch the known bug classes? (`make mutants`)

For each mutant of tests/mutants/catalogue.py: copy the package and the tests to a temporary folder, apply
the one edit, run the mutant's tests there with pytest (stopping at the first failure), and call the
mutant killed when a test fails, survived when all pass. First the same tests run on an unmutated copy
(the baseline): they must pass, which also distils the test drafters once into a shared cache
(DSPARK_TEST_CACHE) that every mutant run reuses. Prints one line per mutant and `N/N mutants killed`;
exits 1 if any known-bug mutant survives, the equivalent mutant (a lossless change) is killed, or the
baseline fails, and 2 if the catalogue no longer matches the code.

    python tests/mutants/run.py [--jobs N] [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from catalogue import MUTANTS, Mutant  # noqa: E402

COPIED = ("dspark", "tests", "pyproject.toml")
LINKED = ("dspark/builtin",)  # large and never mutated: linked, not copied
PYTEST_EXIT_FAILED = 1  # pytest: tests were collected and run, some failed


@dataclass
class Outcome:
    mutant: Mutant | None  # None: the baseline
    code: int
    seconds: float
    failed: str  # the first failing test, or the tail of pytest's output when the run itself broke

    @property
    def killed(self) -> bool:
        return self.code == PYTEST_EXIT_FAILED

    @property
    def broken(self) -> bool:
        """pytest did not run the tests to an outcome (collection error, usage error, crash)."""
        return self.code not in (0, PYTEST_EXIT_FAILED)

    @property
    def ok(self) -> bool:
        if self.mutant is None:
            return self.code == 0
        return not self.broken and self.killed != self.mutant.equivalent


def make_copy(workdir: Path, mutant: Mutant | None) -> Path:
    """A copy of the repository's package and tests under `workdir`, with `mutant` applied."""
    copy = Path(tempfile.mkdtemp(prefix="mutant-", dir=workdir))
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "builtin"))
        else:
            shutil.copy2(source, copy / name)
    for name in LINKED:
        (copy / name).symlink_to(ROOT / name, target_is_directory=True)
    if mutant is not None:
        target = copy / mutant.path
        target.write_text(mutant.apply(target.read_text()))
    return copy


def run_tests(copy: Path, tests: tuple[str, ...], cache: Path) -> tuple[int, str]:
    """(pytest's exit status, the first failing test or the output's tail) of `tests` in `copy`."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", DSPARK_TEST_CACHE=str(cache),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    failed = next((line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith("FAILED ")), "")
    if proc.returncode not in (0, PYTEST_EXIT_FAILED):
        failed = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode, failed


def check(mutant: Mutant | None, tests: tuple[str, ...], workdir: Path, cache: Path) -> Outcome:
    started = time.perf_counter()
    copy = make_copy(workdir, mutant)
    try:
        code, failed = run_tests(copy, tests, cache)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return Outcome(mutant, code, time.perf_counter() - started, failed)


def verdict(outcome: Outcome) -> str:
    if outcome.broken:
        return "BROKEN"
    if outcome.mutant.equivalent:
        return "survived (as it must)" if not outcome.killed else "KILLED (a lossless change: a test is too strict)"
    return "killed" if outcome.killed else "SURVIVED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="mutants checked in parallel (default 2)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="check only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.name:<55} {m.path}: {m.bug}")
        return 0 if args.list else 2
    for m in mutants:  # every snippet still matches the code, before anything runs
        try:
            m.apply((ROOT / m.path).read_text())
        except ValueError as exc:
            print(f"mutants: error: {exc}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="dspark-mutants-") as tmp:
        workdir, cache = Path(tmp), Path(tmp) / "distilled"
        cache.mkdir()
        baseline_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        baseline = check(None, baseline_tests, workdir, cache)
        print(f"baseline: {'passed' if baseline.ok else 'FAILED'} ({len(baseline_tests)} test selections, "
              f"{baseline.seconds:.0f} s){'' if baseline.ok else ': ' + baseline.failed}", flush=True)
        if not baseline.ok:
            return 1
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(check, m, m.tests, workdir, cache) for m in mutants]
            outcomes = []
            for future in futures:
                outcome = future.result()
                outcomes.append(outcome)
                detail = outcome.failed if outcome.killed or outcome.broken else "all its tests passed"
                print(f"{verdict(outcome):<28} {outcome.mutant.name:<55} {outcome.seconds:5.0f} s  {detail}", flush=True)
    known = [o for o in outcomes if not o.mutant.equivalent]
    killed = sum(o.killed and not o.broken for o in known)
    equivalent = [o for o in outcomes if o.mutant.equivalent]
    summary = f"{killed}/{len(known)} mutants killed"
    if equivalent:
        survived = sum(o.ok for o in equivalent)
        summary += f"; {survived}/{len(equivalent)} equivalent mutant{'s' if len(equivalent) > 1 else ''} survived"
    print(summary)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
