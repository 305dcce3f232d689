"""`dspark profile`: measure this machine's SPS step-time tables (docs/design.md §5.5), cached for the scheduler.

    dspark profile [--target DIR] [--drafter NAME|DIR|none] [--device cpu|cuda[:N]] [--dtype T]
        [--context N] [--requests 1,2,4,...] [--lengths 1,2,3,4,6,8] [--repeats N]
        [--random-shape qwen3-4b [--force]] [--out FILE] [--refresh] [--json] [--threads N]
        [--sglang-out DIR [--max-batch-tokens 2048] [--block-size γ]]

verify ms: one target step over R requests × L new tokens each at --context tokens of context; draft ms:
one drafter step (full block) for R requests. Medians of --repeats timed runs, forced monotone (see
dspark.scheduling.profiler). The profile is cached under $DSPARK_HOME/profiles/ (default
~/.cache/dspark) and reused unless --refresh; --out FILE also writes a copy. Defaults: CPU context 256,
R 1,2,4,8, 10 repeats; CUDA context 1024, R 1..256, 20 repeats; L 1,2,3,4,6,8. Without --target the
built-in target and its DSpark drafter; with --target, no drafter unless --drafter is given.
--sglang-out DIR also writes DIR/sps_table.json, SGLang's `--speculative-dspark-sps-table-path` file, by the
conversion of `dspark export sglang` (same --max-batch-tokens / --block-size; block size default: the profiled
drafter's); the folder and those options are checked before anything is measured.
"""

from __future__ import annotations

import sys

from dspark.cli import add_runtime_args, print_json
from dspark.commands.export import add_sps_table_args, write_sps_table
from dspark.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure (or reuse the cached) target/drafter step-time tables for SPS scheduling")
    p.add_argument("--target", default=None, help="target model folder (default: the built-in target)")
    p.add_argument("--drafter", default=None,
                   help="drafter folder, built-in name or 'ngram'; 'none' profiles the target only "
                        "(default: the built-in drafter with the built-in target, none with --target)")
    p.add_argument("--context", type=int, default=None, help="context tokens per request (default: 256 CPU, 1024 CUDA)")
    p.add_argument("--requests", default=None, help="comma-separated request counts R (default: 1,2,4,8 CPU; 1..256 CUDA)")
    p.add_argument("--lengths", default=None, help="comma-separated new tokens per request L (default: 1,2,3,4,6,8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per size; the median is kept (default: 10 CPU, 20 CUDA)")
    p.add_argument("--random-shape", default=None, metavar="SHAPE",
                   help="profile a random-weight target of this shape (qwen3-4b), built once under $DSPARK_HOME; meant for a GPU")
    p.add_argument("--force", action="store_true", help="allow --random-shape on a CPU")
    p.add_argument("--out", default=None, help="also write the profile JSON to this file")
    p.add_argument("--sglang-out", default=None, metavar="DIR",
                   help="also write DIR/sps_table.json, SGLang's SPS table (as `dspark export sglang --profile`)")
    add_sps_table_args(p, note=" (with --sglang-out)")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_runtime_args(p, default_threads=1)
    p.set_defaults(handler=run_profile)


def run_profile(args) -> int:
    from dspark.scheduling.profiler import profile_table, profile_with_cache

    def progress(message: str) -> None:
        print(f"dspark profile: {message}", file=sys.stderr, flush=True)

    if args.sglang_out is None:
        given = [flag for flag, value in (("--max-batch-tokens", args.max_batch_tokens),
                                          ("--block-size", args.block_size)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} shape SGLang's SPS table; give --sglang-out DIR too")
    else:
        from dspark.files import check_output_folder
        from dspark.serving.sglang import check_table_options

        check_table_options(args.max_batch_tokens, args.block_size)
        check_output_folder(args.sglang_out, "--sglang-out")
    profile, path, measured = profile_with_cache(
        args.target, args.drafter, device=args.device, dtype=args.dtype, context=args.context,
        requests=args.requests, lengths=args.lengths, repeats=args.repeats, refresh=args.refresh,
        random_shape=args.random_shape, force=args.force, out=args.out,
        progress=None if args.quiet else progress,
    )
    written = write_sps_table(profile, args.sglang_out, args) if args.sglang_out is not None else []
    if args.json:
        print_json(profile)
        return 0
    print(profile_table(profile))
    print(f"profile: {path} ({'measured now' if measured else 'cached; --refresh to measure again'})")
    if args.out:
        print(f"copy: {args.out}")
    for table in written:
        print(f"SGLang SPS table: {table}")
    return 0
