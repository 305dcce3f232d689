"""`dspark calibrate`: fit Sequential Temperature Scaling for a drafter's confidence head (docs/design.md §4.2).

    dspark calibrate [--target DIR] [--drafter NAME|DIR] [--datasets NAMES|FILES] [--limit N]
        [--sampling-temperatures 1,0] [--traces FILE ...] [--method platt|sts] [--held-out F] [--seed N]
        [--out FILE] [--sglang-out DIR] [--json] [...]
    dspark calibrate --from-sglang STS.json --drafter DIR [--target DIR] [--sampling-temperatures T] [--out FILE] [--json]

Records verification rounds of the *raw* head with the offline protocol (chain drafting, verify-all) at each
sampling temperature of `--sampling-temperatures` (default 1 — the paper's protocol — and 0, greedy) or
reads them from `dspark eval --out` traces.json files (`--traces`, repeatable, one sampling temperature
each), splits each temperature's rounds by prompt into a fitting part and a held-out part (`--held-out`,
default half), fits the per-position maps left to right on the fitting part (`--method sts`: the paper's
temperatures, by the ECE of the prefix survival; `platt`, the default: a temperature and a logit bias per
position by maximum likelihood, which can move a position's mean across 0.5 where a temperature cannot and
keeps the head's resolution — `dspark.calibration.sts`), and writes a
versioned calibration file bound to the drafter's weights and block size, with one regime per sampling
temperature (`dspark.calibration.calibration_file`: a request uses the regime fitted nearest to its own
temperature). ECE before and after are measured on the held-out prompts only, next to the ECE's noise floor
(what a perfectly calibrated head would score on that many rounds, `ece_noise_floor`). `dspark eval`, `generate`
and the scheduler apply the file when given (`--calibration FILE`), and by default the drafter folder's own
`calibration.json` when it was fitted for those weights (`--out DRAFTER/calibration.json` puts it there; the
built-in DSpark and DSpark-RNN drafters ship theirs).

SGLang (docs/serving.md "Multi-GPU production"): `--sglang-out DIR` also writes DIR/confidence_sts.json,
SGLang's `--speculative-dspark-confidence-sts-path` file, from the regime fitted nearest sampling temperature 1
(`dspark export sglang --calibration` exports another). That file holds one temperature per position and no
bias, so it needs `--method sts`; with another method the command refuses before any work.
`--from-sglang STS.json` goes the other way: it fits nothing, reads SGLang's STS file (strictly:
`dspark.serving.sglang.read_sts_file`) and writes `--out` as a calibration file with one STS regime, at the
sampling temperature given (`--sampling-temperatures T`, one value — `--sampling-temperature T`, the spelling
of `dspark export sglang`, is accepted as argparse's unambiguous prefix; default the file's own
"sampling_temperature" when dspark wrote it, else 1), bound to `--drafter`'s weights like a fitted one.
SGLang's file names no drafter, so `--drafter` must be given and its block size must equal the number of
temperatures. This is an option of `calibrate` rather than a `dspark import sglang-sts` command beside
`dspark export sglang` because its result is exactly what `calibrate` writes — a calibration file bound to a
drafter's weights and block size, `--out`, `--json` — and the STS file is one more source of it beside
recorded rounds and `--traces`; `export` only ever writes other engines' files.
"""

from __future__ import annotations

from pathlib import Path

from dspark.calibration.calibration_file import DEFAULT_SAMPLING_TEMPERATURES, check_sampling_temperature
from dspark.cli import add_runtime_args, add_seed_arg, print_json
from dspark.errors import ConfigError
from dspark.files import check_output_file


def register(sub) -> None:
    from dspark.calibration.sts import DEFAULT_METHOD, METHODS

    p = sub.add_parser("calibrate", help="fit per-position temperatures of a confidence head (STS)")
    p.add_argument("--target", default=None, help="target folder (default: the built-in target)")
    p.add_argument("--drafter", default=None, help="drafter folder or built-in name (default: built-in DSpark)")
    p.add_argument("--datasets", default=None, help="comma-separated set names or JSONL files (default: all known sets)")
    p.add_argument("--data-dir", default=None, help="folder with <name>.jsonl prompt sets")
    p.add_argument("--limit", type=int, default=16, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sampling-temperatures", default=None,
                   help="comma-separated sampling temperatures to record and fit a regime at (default 1,0; 0 = greedy)")
    p.add_argument("--traces", action="append", default=None,
                   help="traces.json from `dspark eval --out --calibration none` (skips generation; repeatable)")
    p.add_argument("--method", default=None, choices=METHODS,
                   help=f"sts: the paper's per-position temperatures (ECE grid); platt: temperature and logit bias per "
                        f"position (likelihood); default {DEFAULT_METHOD}")
    p.add_argument("--held-out", type=float, default=0.5, help="share of prompts kept out of fitting, for ECE after")
    add_seed_arg(p)
    p.add_argument("--out", default="calibration.json", help="calibration file to write")
    p.add_argument("--sglang-out", default=None, metavar="DIR",
                   help="also write DIR/confidence_sts.json, SGLang's STS file (the temperature-1 regime; needs --method sts)")
    p.add_argument("--from-sglang", default=None, metavar="STS.json",
                   help="fit nothing: import SGLang's STS file as a calibration of --drafter (written to --out)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_calibrate)


def parse_sampling_temperatures(text: str | None) -> list[float]:
    if text is None:
        return list(DEFAULT_SAMPLING_TEMPERATURES)
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--sampling-temperatures: {part.strip()!r} is not a number") from None
        values.append(check_sampling_temperature(value, "--sampling-temperatures", ConfigError, name=part.strip()))
    if len(set(values)) != len(values):
        raise ConfigError(f"--sampling-temperatures: {text!r} repeats a temperature")
    return values


def record_traces(args, drafter: str, temperature: float):
    """Raw-head rounds (`FitData`) of `drafter` on the chosen sets at sampling `temperature`."""
    from dspark.evaluation.datasets import DEFAULT_SETS, default_data_dir, load_set, resolve_set
    from dspark.evaluation.offline import EvalSettings, evaluate
    from dspark.evaluation.traces import drafter_rounds
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
    settings = EvalSettings(temperature=temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    _, traces = evaluate(resolve_target(args.target), [drafter], sets, settings, device=args.device, dtype=args.dtype,
                         progress=not args.no_progress, calibration="none")
    return drafter_rounds(traces, next(iter(traces)), "recorded traces").fit_data()


def read_traces(paths: list[str], drafter: str) -> dict:
    """{sampling temperature: FitData} of `drafter`'s raw-head rounds in `dspark eval` traces files, each
    read and validated by `dspark.evaluation.traces` (the reader `sweep` and `simulate` use)."""
    from dspark.evaluation.traces import drafter_rounds, load_traces

    out: dict = {}
    for path in paths:
        stored = load_traces(path)
        label = next((name for name, e in stored.items()
                      if Path(str(e.get("drafter", ""))).resolve() == Path(drafter).resolve()), None)
        if label is None:
            raise ConfigError(f"--traces {path}: no rounds of drafter {drafter}")
        recorded = drafter_rounds(stored, label, f"--traces {path}")
        if recorded.calibration is not None:
            raise ConfigError(f"--traces {path}: recorded with a calibrated head; rerun eval with --calibration none")
        temperature = check_sampling_temperature(recorded.sampling_temperature, f"--traces {path}", ConfigError,
                                                 name="the recorded sampling temperature")
        if temperature in out:
            raise ConfigError(f"--traces {path}: a second traces file at sampling temperature {temperature:g}")
        out[temperature] = recorded.fit_data()
    return out


def load_calibratable(spec: str | None, target: str | None):
    """(folder, loaded drafter) of `--drafter spec`; ConfigError unless it is a drafter folder with a confidence
    head. `target` (`--target`, default the built-in) is read only for a drafter saved without the target's
    embedding and LM head."""
    from dspark.models.drafters import load_drafter
    from dspark.models.zoo import resolve_drafter, resolve_target

    drafter = resolve_drafter(spec)
    if not Path(drafter).is_dir():
        raise ConfigError(f"--drafter {drafter!r}: calibration needs a drafter folder with a confidence head")
    loaded = load_drafter(drafter, target=resolve_target(target))
    if not loaded.provides_confidence:
        raise ConfigError(f"--drafter {drafter}: has no confidence head, nothing to calibrate")
    return drafter, loaded


def import_sglang(args) -> int:
    """`--from-sglang STS.json`: SGLang's STS file → a calibration file of `--drafter` (module docstring)."""
    from dspark.calibration.calibration_file import save_calibration
    from dspark.serving.sglang import read_sts_file, sts_regime

    fitting = [flag for flag, value in (("--traces", args.traces), ("--sglang-out", args.sglang_out),
                                        ("--datasets", args.datasets), ("--data-dir", args.data_dir)) if value is not None]
    if fitting:
        raise ConfigError(f"--from-sglang imports a fitted file; {', '.join(fitting)} belong to fitting one")
    if args.method not in (None, "sts"):
        raise ConfigError(f"--from-sglang: SGLang's file is an STS fit (temperatures, no bias), not --method {args.method}")
    if args.drafter is None:
        raise ConfigError("--from-sglang: SGLang's STS file names no drafter; give --drafter DIR, the drafter it was "
                          "fitted for (the calibration is bound to its weights)")
    point = None
    if args.sampling_temperatures is not None:
        points = parse_sampling_temperatures(args.sampling_temperatures)
        if len(points) != 1:
            raise ConfigError(f"--from-sglang: one sampling temperature (the one the file was fitted at), got "
                              f"{args.sampling_temperatures!r}")
        point = points[0]
    check_output_file(args.out, "--out")
    if Path(args.out).resolve() == Path(args.from_sglang).resolve():
        raise ConfigError(f"--out {args.out}: is the --from-sglang file itself; write the calibration elsewhere")
    sts = read_sts_file(args.from_sglang)  # before the drafter loads: a bad file is named without that wait
    drafter, loaded = load_calibratable(args.drafter, args.target)
    regime = sts_regime(sts, loaded.block_size, point, path=args.from_sglang, source=f"--from-sglang {args.from_sglang}")
    save_calibration(args.out, regimes=[regime], drafter_folder=drafter, block_size=loaded.block_size)
    summary = {"calibration": str(args.out), "drafter": str(drafter), "method": "sts",
               "sampling_temperature": regime.sampling_temperature, "temperatures": regime.temperatures,
               "imported_from": str(args.from_sglang)}
    if args.json:
        print_json(summary)
    else:
        print(f"imported {len(regime.temperatures)} STS temperatures from {args.from_sglang} as the regime at sampling "
              f"temperature {regime.sampling_temperature:g} of drafter {drafter}")
        print(f"written {args.out}")
    return 0


def run_calibrate(args) -> int:
    from dspark.calibration.fitting import fit_and_save
    from dspark.calibration.sts import DEFAULT_METHOD

    if args.from_sglang is not None:
        return import_sglang(args)
    method = args.method or DEFAULT_METHOD
    if args.sglang_out is not None and method != "sts":
        raise ConfigError(f"--sglang-out: SGLang's confidence_sts.json holds one temperature per position and no bias, "
                          f"which only an STS fit gives; pass --method sts (this run would fit {method})")
    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out must be in (0, 1), got {args.held_out}")
    if args.traces and args.sampling_temperatures is not None:
        raise ConfigError("--sampling-temperatures records new rounds; with --traces the temperatures are the traces'")
    temperatures = parse_sampling_temperatures(args.sampling_temperatures)
    check_output_file(args.out, "--out")
    if args.sglang_out is not None:
        from dspark.files import check_output_folder

        check_output_folder(args.sglang_out, "--sglang-out")
    drafter, loaded = load_calibratable(args.drafter, args.target)
    block_size = loaded.block_size
    if args.traces:
        per_temperature = read_traces(args.traces, drafter)
    else:
        per_temperature = {t: record_traces(args, drafter, t) for t in temperatures}
    summary = fit_and_save(per_temperature, drafter, block_size, args.out, held_out=args.held_out, seed=args.seed,
                           method=method)
    if args.sglang_out is not None:
        from dspark.calibration.calibration_file import load_calibration
        from dspark.serving.sglang import STS_FILE, sts_file, write_files

        (written,) = write_files(args.sglang_out, {STS_FILE: sts_file(load_calibration(args.out))})
        summary["sglang_sts"] = str(written)
    if args.json:
        print_json(summary)
    else:
        def pct(v):
            return "  –  " if v is None else f"{100 * v:5.2f}"

        for regime in summary["regimes"]:
            print(f"sampling temperature {regime['sampling_temperature']:g}")
            after = regime["ece_after"]
            print(f"{'position':>8} {'T':>6} {'bias':>6} {'ECE before %':>13} {'ECE after %':>12} {'floor %':>8}")
            rows = zip(regime["temperatures"], regime["biases"], regime["ece_before"]["per_position"],
                       after["per_position"], after["floor_per_position"])
            for k, (t, bias, b, a, f) in enumerate(rows, 1):
                print(f"{k:>8} {t:>6.2f} {bias:>6.2f} {pct(b):>13} {pct(a):>12} {pct(f):>8}")
            print(f"{'mean':>8} {'':>6} {'':>6} {pct(regime['ece_before']['mean']):>13} {pct(after['mean']):>12} "
                  f"{pct(after['floor']):>8}")
            print("floor: the ECE a perfectly calibrated head would show on these held-out rounds (finite-sample bias)")
            print(f"held-out rounds: {regime['fitted_on']['held_out_rounds']}")
        print(f"written {args.out}")
        if args.sglang_out is not None:
            print(f"written {summary['sglang_sts']} (SGLang's STS file: the regime at sampling temperature "
                  f"{summary['sampling_temperature']:g})")
    return 0
