"""`dspark sweep`: static confidence-threshold sweep over recorded rounds (paper Fig. 5).

    dspark sweep [--traces FILE] [--drafter LABEL] [--thresholds 0.05:0.95:0.05] [--kind confidence|survival]
        [--out DIR] [--json] [--datasets NAMES] [--limit N] [--max-new-tokens N] [--seed N] [...]

Replays verify-all traces (`dspark eval --out DIR` → DIR/traces.json) with a static threshold per t: verify
the longest prefix whose confidences c_k ≥ t (or whose prefix survival Π c_i ≥ t with --kind survival) and
report, per domain and over all rounds, accepted and rejected drafts per step, verified drafts per step and
the acceptance rate (accepted / verified). `--out DIR` writes sweep.json and sweep.png (stacked accepted /
rejected bars per threshold, acceptance rate on a twin axis, one panel per domain). Without --traces,
traces are recorded first with the built-in target and DSpark drafter (a few sets, --limit prompts each,
temperature 1.0, --max-new-tokens) and written to DIR/traces.json with --out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dspark.cli import add_runtime_args, add_seed_arg, print_json
from dspark.errors import ConfigError
from dspark.files import check_output_folder


def register(sub) -> None:
    p = sub.add_parser("sweep", help="static confidence-threshold sweep over recorded rounds (paper Fig. 5)")
    p.add_argument("--traces", default=None, help="traces.json from `dspark eval --out` (default: record with the built-in model)")
    p.add_argument("--drafter", default=None, help="drafter label in the traces (default: the first with confidences)")
    p.add_argument("--thresholds", default="0.05:0.95:0.05", help="start:stop:step (inclusive) or a comma-separated list")
    p.add_argument("--kind", default="confidence", choices=("confidence", "survival"),
                   help="threshold on each conditional confidence c_k, or on the prefix survival Π c_i")
    add_recording_args(p)
    p.add_argument("--out", default=None, help="folder for sweep.json and sweep.png")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_sweep)


def add_recording_args(p) -> None:
    """Options of the built-in recording used when --traces is not given (shared with `dspark simulate`)."""
    from dspark.evaluation.simulator import RECORD_SETS

    p.add_argument("--datasets", default=",".join(RECORD_SETS), help="sets to record when no --traces is given")
    p.add_argument("--data-dir", default=None, help="folder with <name>.jsonl prompt sets")
    p.add_argument("--limit", type=int, default=6, help="prompts per set when recording")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt when recording")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature when recording (0 = greedy; the calibration regime follows it)")
    add_seed_arg(p)
    p.add_argument("--no-progress", action="store_true")


def obtain_traces(args, command: str, drafters: tuple[str, ...]) -> tuple[dict, str]:
    """(traces, description of where they came from): --traces, or recorded now with the built-in model."""
    from dspark.evaluation.simulator import record_builtin_traces
    from dspark.evaluation.traces import load_traces

    if args.traces:
        return load_traces(args.traces), args.traces
    for name, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {value}")
    from dspark.calibration.calibration_file import check_sampling_temperature

    check_sampling_temperature(args.temperature, "dspark " + command, ConfigError, name="--temperature")
    sets = [s.strip() for s in args.datasets.split(",") if s.strip()]
    how = (f"the built-in target and drafter(s) {', '.join(drafters)} on {', '.join(sets)} "
           f"(--limit {args.limit}, temperature {args.temperature:g}, {args.max_new_tokens} new tokens)")
    print(f"dspark {command}: no --traces given; recording traces with {how}", file=sys.stderr)
    how = "recorded with " + how
    traces = record_builtin_traces(drafters, sets, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, seed=args.seed, data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                                   progress=not args.no_progress)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "traces.json").write_text(json.dumps(traces) + "\n")
    return traces, how


def run_sweep(args) -> int:
    from dspark.evaluation.traces import select_dspark
    from dspark.evaluation.sweep import (
        format_sweep_table,
        parse_thresholds,
        plot_sweep,
        sweep,
    )

    thresholds = parse_thresholds(args.thresholds)
    if args.out:
        check_output_folder(args.out, "--out")
    traces, source = obtain_traces(args, "sweep", ("dspark",))
    rounds = select_dspark(traces, args.drafter, source=f"--traces {args.traces}" if args.traces else "recorded traces")
    result = sweep(rounds, thresholds, args.kind)
    result["traces"] = source
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["plot"] = str(plot_sweep(result, out / "sweep.png"))
        (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
    else:
        print(format_sweep_table(result))
        if args.out:
            print(f"written {Path(args.out) / 'sweep.json'}, {result['plot']}")
    return 0
