"""`dspark calibrate`: fit Sequential Temperature Scaling for a drafter's confidence head (SPEC §4.2).

    dspark calibrate [--target DIR] [--drafter NAME|DIR] [--datasets NAMES|FILES] [--limit N]
        [--traces FILE] [--held-out F] [--seed N] [--out FILE] [--json] [...]

Records verification rounds of the *raw* head with the offline protocol (chain drafting, verify-all,
temperature 1.0 — or reads them from an `dspark eval --out` traces.json with --traces), splits them by
prompt into a fitting part and a held-out part (`--held-out`, default half), fits the per-position
temperatures left to right on the fitting part, and writes a versioned calibration file bound to the
drafter's weights and block size. ECE before and after are measured on the held-out prompts only.
`dspark eval`, `generate` and the scheduler apply the file when given (`--calibration FILE`); the built-in
calibration applies to the built-in DSpark drafter by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from dspark.cli import add_runtime_args, print_json
from dspark.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit per-position temperatures of a confidence head (STS)")
    p.add_argument("--target", default=None, help="target folder (default: the built-in target)")
    p.add_argument("--drafter", default=None, help="drafter folder or built-in name (default: built-in DSpark)")
    p.add_argument("--datasets", default=None, help="comma-separated set names or JSONL files (default: all known sets)")
    p.add_argument("--data-dir", default=None, help="folder with <name>.jsonl prompt sets")
    p.add_argument("--limit", type=int, default=16, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--traces", default=None, help="traces.json from `dspark eval --out` (skips generation)")
    p.add_argument("--held-out", type=float, default=0.5, help="share of prompts kept out of fitting, for ECE after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="calibration.json", help="calibration file to write")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_calibrate)


def record_traces(args, drafter: str) -> dict:
    """Raw-head rounds of `drafter` on the chosen sets ({set: round_arrays})."""
    from dspark.evaluation.datasets import DEFAULT_SETS, default_data_dir, load_set, resolve_set
    from dspark.evaluation.offline import EvalSettings, evaluate
    from dspark.models.zoo import resolve_target

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    specs = [s.strip() for s in args.datasets.split(",") if s.strip()] if args.datasets else list(DEFAULT_SETS)
    sets = []
    for spec in specs:
        name, domain, path = resolve_set(spec, data_dir)
        if path.is_file():
            sets.append(load_set(name, domain, path, limit=args.limit, seed=args.seed))
    if not sets:
        raise ConfigError("no data set could be read for calibration")
    settings = EvalSettings(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    _, traces = evaluate(resolve_target(args.target), [drafter], sets, settings, device=args.device, dtype=args.dtype,
                         progress=not args.no_progress, calibration="none")
    return next(iter(traces.values()))["datasets"]


def run_calibrate(args) -> int:
    from dspark.calibration.fitting import fit_and_save
    from dspark.models.drafters import load_drafter
    from dspark.models.zoo import resolve_drafter

    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out must be in (0, 1), got {args.held_out}")
    drafter = resolve_drafter(args.drafter)
    if not Path(drafter).is_dir():
        raise ConfigError(f"--drafter {drafter!r}: calibration needs a drafter folder with a confidence head")
    loaded = load_drafter(drafter, calibration="none")
    if not loaded.provides_confidence:
        raise ConfigError(f"--drafter {drafter}: has no confidence head, nothing to calibrate")
    block_size = loaded.max_draft_tokens
    if args.traces:
        try:
            stored = json.loads(Path(args.traces).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--traces {args.traces}: unreadable ({exc})") from None
        entry = next((e for e in stored.values() if Path(e.get("drafter", "")).resolve() == Path(drafter).resolve()), None)
        if entry is None:
            raise ConfigError(f"--traces {args.traces}: no rounds of drafter {drafter}")
        if entry.get("confidence_temperatures") is not None:
            raise ConfigError(f"--traces {args.traces}: recorded with a calibrated head; rerun eval with --calibration none")
        per_set = entry["datasets"]
    else:
        per_set = record_traces(args, drafter)
    summary = fit_and_save(per_set, drafter, block_size, args.out, held_out=args.held_out, seed=args.seed)
    if args.json:
        print_json(summary)
    else:
        def pct(v):
            return "  –  " if v is None else f"{100 * v:5.2f}"

        print(f"{'position':>8} {'T':>6} {'ECE before %':>13} {'ECE after %':>12}")
        for k, (t, b, a) in enumerate(zip(summary["temperatures"], summary["ece_before"]["per_position"], summary["ece_after"]["per_position"]), 1):
            print(f"{k:>8} {t:>6.2f} {pct(b):>13} {pct(a):>12}")
        print(f"{'mean':>8} {'':>6} {pct(summary['ece_before']['mean']):>13} {pct(summary['ece_after']['mean']):>12}")
        print(f"held-out rounds: {summary['fitted_on']['held_out_rounds']}; written {args.out}")
    return 0
