"""`dspark simulate`: discrete-time serving simulator over recorded rounds (paper Fig. 7 and Fig. 8).

    dspark simulate [--traces FILE] [--drafter LABEL] [--profile FILE] [--concurrency 1,2,4,...,256]
        [--steps N] [--min-rounds N] [--policies LIST] [--online-calibration N] [--mtp-draft-scale F] [--out DIR]
        [--json] [--seed N] [...]

At each concurrency C, C request streams replay rounds of the DSpark traces (`dspark eval --out DIR` →
DIR/traces.json); every step the policy picks the verified lengths ℓ_r from the recorded confidences, the
step costs verify_ms(Σ(1 + ℓ_r) tokens, C requests) + draft_ms(C) from the SPS profile, and each request
emits min(accepted, ℓ_r) + 1 tokens (`dspark.evaluation.simulator`). Reported per C and policy: aggregate
throughput and per-user speed (tokens/s), mean verified drafts per request, mean step time (ms); goals
for causal-greedy (and causal-greedy-gated) against plain decoding, fixed lengths and MTP-1.

Policies (--policies, comma-separated; default all): plain, fixed (every n = 1..γ) or fixed-N, verify-all,
threshold-T (default 0.5), algorithm-1 (docs/design.md §5.2 as published), causal-greedy (Algorithm 1 with the
staircase lookahead, the default scheduler), causal-greedy-gated (the same behind the draft gate), async-topk,
mtp-1 (the traces' MTP drafter, else
the DSpark rounds cut to one slot; draft cost draft_ms(C) × --mtp-draft-scale, default 1 / the profile's
draft_layers). --profile: an SPS profile JSON (e.g. shared/data/profiles/h100-qwen3-4b-shape.json); without
it, this machine's cached profile of the built-in model (measured first if none). Without --traces, traces
are recorded with the built-in DSpark and MTP drafters. `--online-calibration N`: the confidence policies
refit the head's temperatures every N verified rounds from the replayed outcomes (docs/design.md §4.3), starting
from the calibration the traces were recorded with. `--out DIR` writes simulate.json,
throughput_vs_per_user.png (Fig. 7) and budget_vs_concurrency.png (Fig. 8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dspark.cli import add_runtime_args, print_json
from dspark.commands.sweep import add_recording_args, obtain_traces
from dspark.errors import ConfigError
from dspark.files import check_output_folder


def register(sub) -> None:
    from dspark.evaluation.simulator import (
        DEFAULT_CONCURRENCY,
        DEFAULT_MIN_ROUNDS,
        DEFAULT_POLICIES,
        DEFAULT_STEPS,
    )
    from dspark.calibration.sts import DEFAULT_METHOD, METHODS

    p = sub.add_parser("simulate", help="serving simulator: throughput vs per-user speed per policy (paper Fig. 7, 8)")
    p.add_argument("--traces", default=None, help="traces.json from `dspark eval --out` (default: record with the built-in model)")
    p.add_argument("--drafter", default=None, help="DSpark drafter label in the traces (default: the first with confidences)")
    p.add_argument("--profile", default=None, help="SPS profile JSON (default: this machine's profile of the built-in model)")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)), help="request counts C")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="simulated steps per concurrency (at least)")
    p.add_argument("--min-rounds", type=int, default=DEFAULT_MIN_ROUNDS,
                   help="request-rounds per concurrency at least: C runs max(steps, min-rounds / C) steps")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policies")
    p.add_argument("--online-calibration", type=int, default=None, metavar="N",
                   help="confidence policies refit the calibration online every N verified rounds, from the recorded one")
    p.add_argument("--calibration-method", default=DEFAULT_METHOD, choices=METHODS,
                   help="method of the online refits (dspark.calibration.sts)")
    p.add_argument("--extrapolate", action="store_true",
                   help="simulate concurrencies beyond the profile's largest measured request count (default: drop them)")
    p.add_argument("--mtp-draft-scale", type=float, default=None,
                   help="MTP-1 draft cost as a fraction of the profile's draft_ms (default: 1 / draft_layers)")
    add_recording_args(p)
    p.add_argument("--out", default=None, help="folder for simulate.json and the two plots")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_simulate)


def load_profile(args):
    """(SPSProfile, description)."""
    from dspark.scheduling import SPSProfile
    from dspark.scheduling.profiler import profile_with_cache

    if args.profile:
        profile = SPSProfile.load(args.profile)
        how = f"--profile {args.profile}"
    else:
        print("dspark simulate: no --profile given; using this machine's SPS profile of the built-in model "
              "(measured first if none is cached)", file=sys.stderr)
        data, path, measured = profile_with_cache(device=args.device, dtype=args.dtype,
                                                  progress=lambda line: print(line, file=sys.stderr))
        how = f"this machine's profile {path} ({'measured now' if measured else 'cached'})"
        print(f"dspark simulate: SPS profile: {how}", file=sys.stderr)
        profile = SPSProfile.from_dict(data, source=str(path))
    return profile, how


def measured_concurrency(concurrency: list[int], profile, extrapolate: bool) -> tuple[list[int], list[str]]:
    """(the concurrencies to simulate, warnings): those beyond the profile's largest measured request
    count are dropped, or kept and marked as extrapolated with `extrapolate`. ConfigError if none is left."""
    limit = profile.max_measured_requests
    beyond = [c for c in concurrency if limit is not None and c > limit]
    if not beyond:
        return concurrency, []
    listed = ", ".join(map(str, beyond))
    if extrapolate:
        return concurrency, [f"the profile measures up to {limit} requests; concurrency {listed} is extrapolated "
                             "from its last two rows (--extrapolate)"]
    kept = [c for c in concurrency if c <= limit]
    if not kept:
        raise ConfigError(f"--concurrency: the profile measures up to {limit} requests and every concurrency "
                          f"asked ({listed}) is beyond it; pass --extrapolate to simulate them anyway")
    return kept, [f"the profile measures up to {limit} requests; concurrency {listed} dropped "
                  "(pass --extrapolate to simulate it from the profile's last two rows)"]


def run_simulate(args) -> int:
    from dspark.evaluation.simulator import (
        goals,
        plot_budget,
        plot_frontier,
        simulate,
        simulation_table,
    )
    from dspark.evaluation.traces import select_dspark, select_mtp
    from dspark.scheduling.named import parse_policies
    from dspark.scheduling.profiler import parse_sizes

    concurrency = parse_sizes(args.concurrency, "--concurrency")
    if args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    if args.min_rounds < 0:
        raise ConfigError(f"--min-rounds must be ≥ 0, got {args.min_rounds}")
    parse_policies(args.policies, None)  # names checked before any recording or profiling
    if args.out:
        check_output_folder(args.out, "--out")
    # Cheap inputs first: a given profile, then the traces (recorded if absent), then this machine's profile.
    loaded = load_profile(args) if args.profile else None
    traces, traces_how = obtain_traces(args, "simulate", ("dspark", "mtp"))
    profile, profile_how = loaded or load_profile(args)
    concurrency, warnings = measured_concurrency(concurrency, profile, args.extrapolate)
    for warning in warnings:
        print(f"dspark simulate: warning: {warning}", file=sys.stderr)
    source = f"--traces {args.traces}" if args.traces else "recorded traces"
    rounds = select_dspark(traces, args.drafter, source=source)
    policies = parse_policies(args.policies, rounds.block_size)
    mtp = select_mtp(traces, exclude=rounds.label, source=source)
    result = simulate(rounds, profile, concurrency=concurrency, steps=args.steps, min_rounds=args.min_rounds, policies=policies, seed=args.seed,
                      mtp_rounds=mtp, mtp_scale=args.mtp_draft_scale, online_calibration=args.online_calibration,
                      calibration_method=args.calibration_method)
    result["warnings"] = warnings
    result["goals"] = goals(result)
    if "causal-greedy-gated" in result["policies"]:
        result["goals_gated"] = goals(result, "causal-greedy-gated")
    result["profile"] = {"source": profile_how, **{k: v for k, v in profile.metadata.items()
                                                   if isinstance(v, (str, int, float, bool)) or v is None}}
    result["traces"]["source"] = traces_how
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        title = f"\n{profile.metadata.get('device', 'profile')}, traces of {rounds.label}"
        result["plots"] = {
            "fig7": str(plot_frontier(result, out / "throughput_vs_per_user.png",
                                      "throughput vs per-user speed (paper Fig. 7)" + title)),
            "fig8": str(plot_budget(result, out / "budget_vs_concurrency.png",
                                    "throughput and verification budget vs concurrency (paper Fig. 8)" + title)),
        }
        (out / "simulate.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
    else:
        print(simulation_table(result, result["goals"], result.get("goals_gated")))
        if args.out:
            print(f"written {Path(args.out) / 'simulate.json'}, {result['plots']['fig7']}, {result['plots']['fig8']}")
    return 0
