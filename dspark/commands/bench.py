"""`dspark bench engine`: the serving engine measured under load, per verification policy (paper Figs. 7–8);
`dspark bench serve`: any OpenAI-compatible HTTP server measured under load (like `vllm bench serve`).

    dspark bench engine [--model DIR] [--drafter D] [--mtp-drafter D] [--policies LIST] [--concurrency 1,2,4,...]
        [--request-rate R,...] [--temperature 1 | 0,1] [--num-requests N] [--warmup-requests N] [--repeats N] [--max-new-tokens N] [--datasets LIST]
        [--profile FILE] [--no-simulate] [--traces FILE] [--out DIR] [--json] [--seed N] [...]

In-process (no HTTP), on the built-in model by default, prompts from the evaluation sets
(`dspark.evaluation.engine_bench` has the definitions). Unless --no-simulate, `dspark simulate` runs on the same
profile and concurrencies from traces of the same prompt sets (recorded now, or --traces), and its
prediction error per load is reported. --out writes bench.json and Fig. 7/8-style PNGs per temperature.

    dspark bench serve --url URL [--endpoint completions|chat] [--api-key KEY] [--model NAME] [--num-prompts N]
        [--max-concurrency N] [--request-rate R|inf] [--warmup-prompts N] [--max-tokens N] [--temperature T]
        [--seed N] [--ignore-eos] [--dataset random|eval] [--random-input-len WORDS] [--datasets LIST] [--data-dir DIR]
        [--limit N] [--timeout S] [--sample-interval S] [--out DIR] [--json] [--no-progress]

Streamed requests over HTTP (`dspark.evaluation.serve_bench` has the definitions): TTFT, TPOT, ITL and
end-to-end latency (mean, median, p90, p99), throughputs with tokens from the stream's `usage`, acceptance from
the server's /metrics counters, and a timeline of its resident memory and KV cache usage. The key defaults to
$DSPARK_API_KEY, then $OPENAI_API_KEY. --out writes bench_serve.json, latency CDFs and the timeline as PNGs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dspark.cli import add_runtime_args, add_seed_arg, print_json, seed_value
from dspark.errors import ConfigError


def register(sub) -> None:
    from dspark.evaluation.engine_bench import DEFAULT_CONCURRENCY, POLICIES
    from dspark.evaluation.simulator import RECORD_SETS

    bench = sub.add_parser("bench", help="benchmarks of the serving engine")
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("engine", help="throughput, per-user speed, TTFT/ITL per policy and load (paper Fig. 7, 8)")
    p.add_argument("--model", default=None, help="target folder (default: the built-in target)")
    p.add_argument("--drafter", default="dspark", help="DSpark drafter: built-in name or folder (default: dspark)")
    p.add_argument("--mtp-drafter", default="mtp", help="MTP-1 drafter of the `mtp` policy (default: the built-in mtp)")
    p.add_argument("--calibration", default="auto", help="the DSpark drafter's calibration file ('auto', 'none')")
    p.add_argument("--policies", default=None,
                   help="ar, mtp, fixed-K (or 'fixed' for every K), causal-greedy, algorithm-1, async-topk, gated, verify-all "
                        f"(default: {','.join(POLICIES)}, without the fixed lengths beyond the drafter's block size)")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="closed-loop request counts ('' for none)")
    p.add_argument("--request-rate", default="", help="open-loop Poisson arrival rates, requests/s (comma-separated)")
    p.add_argument("--temperature", default="1", help="sampling temperature(s), comma-separated (0 = greedy)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per point (default: max(4C, 16) closed loop, 64 open loop)")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="unmeasured requests run first at each point's load (default: max(2C, 8) closed loop, 16 open loop)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per point, interleaved across the policies of a load; a point reports their medians")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per request at most")
    p.add_argument("--datasets", default=",".join(RECORD_SETS), help="prompt sets (names or JSONL paths)")
    p.add_argument("--data-dir", default=None, help="folder with <name>.jsonl prompt sets")
    p.add_argument("--limit", type=int, default=8, help="prompts per set")
    p.add_argument("--profile", default=None,
                   help="SPS profile JSON (default: this machine's profile of the target and drafter, measured once and cached)")
    p.add_argument("--no-simulate", action="store_true", help="skip the side-by-side with `dspark simulate`")
    p.add_argument("--traces", default=None, help="traces.json for the simulator (default: recorded now per temperature)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV budget in tokens (default: from free memory)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="target tokens per engine step")
    p.add_argument("--out", default=None, help="folder for bench.json and the plots")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_seed_arg(p)
    add_runtime_args(p, default_threads=None)
    p.set_defaults(handler=run_bench_engine)
    _register_serve(kinds, RECORD_SETS)


def _register_serve(kinds, record_sets) -> None:
    from dspark.evaluation.serve_bench import (DATASETS, DEFAULT_EVAL_LIMIT, DEFAULT_RANDOM_INPUT_LEN, ENDPOINTS,
                                               ServeBenchSettings)

    defaults = ServeBenchSettings(url="")
    p = kinds.add_parser("serve", help="load generator for an OpenAI-compatible server: TTFT/TPOT/ITL, throughput, "
                                       "acceptance (like vllm bench serve)")
    p.add_argument("--url", required=True, help="the server's root, e.g. http://localhost:8000")
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default=defaults.endpoint,
                   help="/v1/completions or /v1/chat/completions (default: completions)")
    p.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $DSPARK_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="measured requests")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: unlimited)")
    p.add_argument("--request-rate", type=float, default=defaults.request_rate,
                   help="Poisson arrivals, requests/s (default: inf, all at once)")
    p.add_argument("--warmup-prompts", type=int, default=defaults.warmup_prompts,
                   help="unmeasured requests run first at the same load")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="output tokens per request at most")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (default)")
    p.add_argument("--seed", type=seed_value, default=None,
                   help="sent as each request's seed; also seeds the prompts and arrivals (default: not sent, 0)")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to run every request to --max-tokens")
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset,
                   help="random words, or the evaluation sets' first user turns (default: random)")
    p.add_argument("--random-input-len", type=int, default=None,
                   help=f"words per random prompt (default: {DEFAULT_RANDOM_INPUT_LEN})")
    p.add_argument("--datasets", default=None,
                   help=f"--dataset eval: prompt sets, names or JSONL paths (default: {','.join(record_sets)})")
    p.add_argument("--data-dir", default=None, help="--dataset eval: folder with <name>.jsonl prompt sets")
    p.add_argument("--limit", type=int, default=None, help=f"--dataset eval: prompts per set (default: {DEFAULT_EVAL_LIMIT})")
    p.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request (default: 600)")
    p.add_argument("--sample-interval", type=float, default=defaults.sample_interval_s,
                   help="seconds between timeline samples of the server's /metrics (0: no timeline)")
    p.add_argument("--out", default=None, help="folder for bench_serve.json and the plots")
    p.add_argument("--json", action="store_true", help="print the result as JSON (without the per-request latencies)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_bench_serve)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def run_bench_engine(args) -> int:
    from dspark.calibration.calibration_file import check_sampling_temperature, regimes_for
    from dspark.engine.engine import EngineConfig
    from dspark.evaluation import engine_bench as eb
    from dspark.evaluation.datasets import default_data_dir, load_set, resolve_set
    from dspark.evaluation.offline import EvalSettings, render_sets
    from dspark.files import check_output_folder
    from dspark.models.drafters import load_drafter
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer, stop_token_ids
    from dspark.models.zoo import resolve_drafter, resolve_target
    from dspark.scheduling.profiler import parse_sizes

    log = (lambda line: None) if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    concurrency = parse_sizes(args.concurrency, "--concurrency") if args.concurrency.strip() else []
    rates = _floats(args.request_rate, "--request-rate")
    temperatures = _floats(args.temperature, "--temperature")
    if not temperatures:
        raise ConfigError("--temperature: give at least one temperature")
    for t in temperatures:
        check_sampling_temperature(t, "dspark bench engine", ConfigError, name="--temperature")
    eb.check_loads(concurrency, rates)
    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit), ("--repeats", args.repeats),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be ≥ 1, got {value}")
    if args.num_requests is not None and args.num_requests < 1:
        raise ConfigError(f"--num-requests must be ≥ 1, got {args.num_requests}")
    if args.warmup_requests is not None and args.warmup_requests < 0:
        raise ConfigError(f"--warmup-requests must be ≥ 0, got {args.warmup_requests}")
    if args.out:
        check_output_folder(args.out, "--out")
    target = resolve_target(args.model)
    dspark_spec = resolve_drafter(args.drafter)
    runner = TargetRunner.from_pretrained(target, device=args.device, dtype=args.dtype)
    dspark = load_drafter(dspark_spec, device=args.device, dtype=args.dtype, target=runner.model)
    if args.policies is None:
        policies = tuple(p for p in eb.POLICIES if not p.startswith("fixed-") or int(p[6:]) <= dspark.block_size)
    else:
        policies = eb.parse_bench_policies(args.policies, dspark.block_size)
    mtp = None
    if "mtp" in policies:
        mtp = load_drafter(resolve_drafter(args.mtp_drafter), device=args.device, dtype=args.dtype, target=runner.model)
    regimes = regimes_for(dspark, args.calibration)

    tokenizer = load_tokenizer(target)
    folder = Path(args.data_dir) if args.data_dir else default_data_dir()
    sets = []
    for spec in (s.strip() for s in args.datasets.split(",") if s.strip()):
        name, domain, path = resolve_set(spec, folder)
        if path.is_file():
            sets.append(load_set(name, domain, path, limit=args.limit, seed=args.seed))
        else:
            log(f"dspark bench engine: prompt set {spec!r} not found ({path}); skipped")
    if not sets:
        raise ConfigError(f"--datasets: none of {args.datasets!r} was found (give --data-dir or JSONL paths)")
    room = runner.max_context - args.max_new_tokens
    rendered = render_sets(tokenizer, sets, EvalSettings(max_new_tokens=args.max_new_tokens), runner.max_context)
    prompts = [p for r in rendered for p in r.prompts if len(p) <= room]
    if not prompts:
        raise ConfigError(f"no prompt leaves room for --max-new-tokens {args.max_new_tokens} in the context of "
                          f"{runner.max_context}")
    profile, profile_how = None, None
    if any(p in ("causal-greedy", "algorithm-1", "async-topk", "gated") for p in policies) or not args.no_simulate:
        profile, profile_how = _profile(args, target, dspark_spec, concurrency, log)

    settings = eb.BenchSettings(policies=policies, concurrency=tuple(concurrency), request_rates=tuple(rates),
                                temperatures=tuple(temperatures), num_requests=args.num_requests,
                                warmup_requests=args.warmup_requests, repeats=args.repeats,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    drafters = {"dspark": dspark, "mtp": mtp}

    def make(policy):
        return eb.policy_setup(policy, drafters["dspark"], drafters["mtp"], profile, regimes)

    def engine_config(max_running: int) -> EngineConfig:
        return EngineConfig(max_num_seqs=max_running, max_num_batched_tokens=args.max_num_batched_tokens,
                            kv_cache_tokens=args.kv_cache_tokens, seed=args.seed)

    result = eb.run_bench(runner, prompts, settings, make=make, engine_config=engine_config,
                          eos_token_ids=stop_token_ids(target, tokenizer, runner.config.eos_token_ids), progress=log)
    result["goals"] = eb.goals(result)
    result["settings"] = {"policies": list(policies), "concurrency": concurrency, "request_rate": rates,
                          "temperatures": temperatures, "num_requests": args.num_requests,
                          "warmup_requests": args.warmup_requests, "repeats": args.repeats,
                          "max_new_tokens": args.max_new_tokens, "datasets": [s.name for s in sets],
                          "prompts": len(prompts), "target": target, "drafter": dspark_spec,
                          "device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
                          "profile": profile_how}
    if not args.no_simulate and concurrency and args.model and not args.traces:
        log("dspark bench engine: the simulator records traces with the built-in model only; give --traces to compare")
    elif not args.no_simulate and concurrency:
        result["simulator_comparison"] = _simulate(args, result, profile, concurrency, temperatures, policies, log)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for t in temperatures for p in eb.plot(result, out, t)]
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
    else:
        print(eb.bench_table(result))
        for row in result.get("simulator_comparison", []):
            print(f"simulate vs measured, T={row['temperature']:g} {row['policy']} C={row['concurrency']}: "
                  f"{row['simulated_tok_s']:.0f} vs {row['measured_tok_s']:.0f} tok/s ({row['error']:+.1%})")
    return 0


def _serve_settings(args):
    """The ServeBenchSettings of `dspark bench serve`'s flags; the API key falls back to $DSPARK_API_KEY, then
    $OPENAI_API_KEY."""
    import os

    from dspark.evaluation.serve_bench import ServeBenchSettings

    datasets = None if args.datasets is None else tuple(s.strip() for s in args.datasets.split(",") if s.strip())
    api_key = args.api_key
    if api_key is None:
        api_key = os.environ.get("DSPARK_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
    return ServeBenchSettings(url=args.url, endpoint=args.endpoint, model=args.model, api_key=api_key,
                              num_prompts=args.num_prompts, max_concurrency=args.max_concurrency,
                              request_rate=args.request_rate, warmup_prompts=args.warmup_prompts,
                              max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                              ignore_eos=args.ignore_eos, timeout_s=args.timeout, dataset=args.dataset,
                              random_input_len=args.random_input_len, datasets=datasets, data_dir=args.data_dir,
                              limit=args.limit, sample_interval_s=args.sample_interval)


def run_bench_serve(args) -> int:
    from dspark.evaluation import serve_bench as sb
    from dspark.files import check_output_folder, write_text_atomically

    log = (lambda line: None) if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    settings = _serve_settings(args)
    sb.check_settings(settings)
    if args.out:
        check_output_folder(args.out, "--out")
    prompts = sb.load_prompts(settings, log)
    result = sb.run_serve_bench(settings, prompts, progress=log)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in sb.plot(result, out)]
        write_text_atomically(out / "bench_serve.json", json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json({key: value for key, value in result.items() if key != "latencies_ms"})
    else:
        print(sb.results_table(result))
    return 0


def _profile(args, target, drafter_spec, concurrency, log):
    """(SPSProfile, description): --profile, else this machine's, covering the bench's request counts."""
    from dspark.scheduling.profiler import DEFAULTS, profile_with_cache
    from dspark.scheduling.sps import SPSProfile

    if args.profile:
        return SPSProfile.load(args.profile), f"--profile {args.profile}"
    from dspark.devices import resolve_device

    kind = resolve_device(args.device).type
    requests = sorted(set(DEFAULTS[kind]["requests"]) | set(concurrency))
    data, path, measured = profile_with_cache(target, drafter_spec, device=args.device, dtype=args.dtype,
                                              requests=requests, progress=log)
    how = f"this machine's profile {path} ({'measured now' if measured else 'cached'})"
    log(f"dspark bench engine: SPS profile: {how}")
    return SPSProfile.from_dict(data, source=str(path)), how


def _simulate(args, result, profile, concurrency, temperatures, policies, log) -> list[dict]:
    """`dspark simulate` on the bench's profile and concurrencies, from traces of the bench's prompt sets."""
    from dspark.evaluation import engine_bench as eb
    from dspark.evaluation.simulator import record_builtin_traces, simulate
    from dspark.evaluation.traces import load_traces, select_dspark, select_mtp
    from dspark.scheduling.named import parse_policies

    simulated = {}
    names = [eb.SIMULATOR_NAMES.get(p, p) for p in policies]
    for t in temperatures:
        if args.traces:
            traces, source = load_traces(args.traces), f"--traces {args.traces}"
        else:
            log(f"dspark bench engine: recording traces for the simulator at T={t:g}")
            traces = record_builtin_traces(("dspark", "mtp"), result["settings"]["datasets"], limit=args.limit,
                                           max_new_tokens=args.max_new_tokens, temperature=t, seed=args.seed,
                                           data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                                           progress=not args.no_progress)
            source = "recorded traces"
        rounds = select_dspark(traces, None, source=source)
        specs = parse_policies(",".join(names), rounds.block_size)
        simulated[t] = simulate(rounds, profile, concurrency=concurrency, policies=specs, seed=args.seed,
                                mtp_rounds=select_mtp(traces, exclude=rounds.label, source=source))
    return eb.simulator_comparison(result, simulated)
