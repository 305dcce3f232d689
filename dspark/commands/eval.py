"""`dspark eval`: the paper's offline protocol (docs/design.md §3) — τ per data set, per-position acceptance.

    dspark eval [--target DIR] [--drafter NAME|DIR ...] [--datasets NAMES|FILES] [--limit N]
        [--temperature F] [--block-size N] [--max-new-tokens N] [--seed N] [--batch-size N]
        [--data-dir DIR] [--json] [--out DIR] [--no-progress] [--device D] [--dtype T] [--threads N]

Defaults: the built-in target and DSpark drafter, every known set (the paper's nine + the built-in held-out
corpus prompts), temperature 1.0, 2048 new tokens. Named sets are read from --data-dir (default
$DSPARK_EVAL_DIR or the nearest shared/data/eval); a named set whose file is missing is reported and
skipped. A prompt that leaves no room in the target's context is skipped and counted per set (JSON
"skipped_too_long", and a line under the table); `--strict` refuses it instead, naming the set and line.
`--out DIR` writes eval.json, table.md, traces.json (per-round drafted / verified / accepted counts and
confidences, replayed by `dspark calibrate`, `dspark sweep` and `dspark simulate`), with several drafters
conditional_acceptance.png (paper Fig. 2), and for drafters with a confidence head
reliability_<drafter>.png (paper Fig. 6). Calibration metrics (per position ECE and its noise floor,
ROC-AUC, Brier, mean predicted vs observed) are in the JSON whenever the drafter has a confidence head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dspark.cli import add_runtime_args, add_seed_arg, print_json
from dspark.errors import ConfigError
from dspark.files import check_output_folder


def register(sub) -> None:
    p = sub.add_parser("eval", help="offline evaluation: τ and per-position acceptance per data set (paper Table 1)")
    p.add_argument("--target", default=None, help="target model folder (default: the built-in target)")
    p.add_argument("--drafter", action="append", default=None,
                   help="drafter folder, built-in name (dspark, dspark-rnn, dflash, eagle3, mtp) or 'ngram'; repeat to compare")
    p.add_argument("--datasets", default=None, help="comma-separated set names or JSONL files (default: all known sets)")
    p.add_argument("--data-dir", default=None, help="folder with <name>.jsonl prompt sets (default: $DSPARK_EVAL_DIR or shared/data/eval)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per set (after the seeded shuffle)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=None, help="drafts per round (default: each drafter's trained block size)")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    add_seed_arg(p)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--out", default=None, help="folder for eval.json, table.md and the per-position plot")
    p.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    p.add_argument("--calibration", default="auto",
                   help="calibration file for the confidence head; 'auto' = the drafter folder's own calibration.json when fitted for its weights; 'none' = raw")
    p.add_argument("--strict", action="store_true",
                   help="refuse a prompt that does not fit the target's context (default: skip it and count it per set)")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_eval)


def write_reliability_plots(traces: dict, out: Path) -> dict[str, str]:
    """One reliability diagram (paper Fig. 6: one panel per block position) per drafter with a confidence
    head: the raw head, and the calibrated one when a calibration was applied."""
    from dspark.calibration.metrics import Rounds
    from dspark.calibration.plots import plot_reliability
    from dspark.evaluation.traces import drafter_rounds

    paths = {}
    for label, entry in traces.items():
        if not entry["has_confidences"]:
            continue
        recorded = drafter_rounds(traces, label)
        rounds = Rounds.from_arrays(recorded.raw_confidences(), recorded.verified, recorded.accepted, drop_invalid=True)
        path = out / f"reliability_{label.replace('/', '_')}.png"
        paths[label] = str(plot_reliability(rounds, path, recorded.calibration,
                                            title=f"{label}: prefix-survival reliability"))
    return paths


def run_eval(args) -> int:
    from dspark.evaluation.datasets import DEFAULT_SETS, default_data_dir, load_set, resolve_set
    from dspark.evaluation.offline import EvalSettings, evaluate
    from dspark.evaluation.report import plot_conditional_acceptance, tau_table
    from dspark.models.zoo import resolve_drafter, resolve_target

    for name, value, low in (("--limit", args.limit, 1), ("--block-size", args.block_size, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be ≥ {low}, got {value}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be ≥ 0, got {args.temperature}")
    if args.out:
        check_output_folder(args.out, "--out")
    target = resolve_target(args.target)
    drafters = [resolve_drafter(d) for d in (args.drafter or [None])]
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    specs = [s.strip() for s in args.datasets.split(",") if s.strip()] if args.datasets else list(DEFAULT_SETS)
    prompt_sets, missing = [], []
    for spec in specs:
        name, domain, path = resolve_set(spec, data_dir)
        if not path.is_file():
            missing.append({"name": name, "path": str(path)})
            print(f"dspark eval: data set {name!r} not found at {path}; skipped", file=sys.stderr)
            continue
        prompt_sets.append(load_set(name, domain, path, limit=args.limit, seed=args.seed))
    if not prompt_sets:
        raise ConfigError("no data set could be read: " + ", ".join(f"{m['name']} ({m['path']})" for m in missing))
    settings = EvalSettings(temperature=args.temperature, block_size=args.block_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                            strict=args.strict)
    report, traces = evaluate(target, drafters, prompt_sets, settings, device=args.device, dtype=args.dtype,
                              progress=not args.no_progress, calibration=args.calibration)
    report["missing_datasets"] = missing
    report["settings"]["limit"] = args.limit
    table = tau_table(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "table.md").write_text(table + "\n")
        if len(report["drafters"]) > 1:
            report["plot"] = str(plot_conditional_acceptance(report, out / "conditional_acceptance.png"))
        if traces:
            (out / "traces.json").write_text(json.dumps(traces) + "\n")
            report["reliability_plots"] = write_reliability_plots(traces, out)
    if args.json:
        print_json(report)
    else:
        print(table)
        if missing:
            print("missing data sets: " + ", ".join(m["name"] for m in missing))
    return 0
