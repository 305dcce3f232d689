"""`dspark zoo`: the built-in default model (dspark.models.zoo).

    dspark zoo list [--json]
    dspark zoo rebuild [--work DIR] [--out DIR] [--device D] [--drafters NAMES] [--stdlib DIR] [--docs DIR]

`rebuild` reproduces everything from scratch — corpus, tokenizer, target, regenerated data, the five
drafters — resuming any step already done in --work, then installs the result into --out (default: the
package's builtin folder). On this 2-core CPU it takes about two hours; on one H100 a few minutes
(`--device cuda`).
"""

from __future__ import annotations

from dspark.cli import add_device_arg, print_json


def register(sub) -> None:
    zoo = sub.add_parser("zoo", help="the built-in target, tokenizer and drafters: list or rebuild them")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    lst = zoo_sub.add_parser("list", help="paths and sizes of the built-in model files")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=run_list)
    rebuild = zoo_sub.add_parser("rebuild", help="rebuild the built-in model from scratch (resumable)")
    rebuild.add_argument("--work", default="runs/zoo", help="working folder (corpus, checkpoints, data); reruns resume")
    rebuild.add_argument("--out", default=None, help="install folder (default: the package's builtin folder)")
    add_device_arg(rebuild)
    rebuild.add_argument("--drafters", default=None, help="comma-separated subset of the built-in drafters")
    rebuild.add_argument("--stdlib", default=None, help="Python standard library folder (default: this interpreter's)")
    rebuild.add_argument("--docs", default=None, help="python3.11-doc html/_sources folder (default: fetched with apt-get download)")
    rebuild.add_argument("--no-progress", action="store_true")
    rebuild.add_argument("--json", action="store_true")
    rebuild.set_defaults(handler=run_rebuild)


def run_list(args) -> int:
    from dspark.models.zoo import listing

    info = listing()
    if args.json:
        print_json(info)
        return 0
    if not info["installed"]:
        print(f"the built-in model is not installed in {info['root']}; run `dspark zoo rebuild`")
        return 0
    print(f"target:    {info['target']}")
    for name, path in info["drafters"].items():
        print(f"drafter:   {name:<11} {path}")
    for name, path in info["prompts"].items():
        print(f"prompts:   {name:<11} {path}")
    for name, path in info["calibration"].items():
        print(f"calibration: {name:<9} {path}")
    print(f"total: {info['total_bytes'] / 2**20:.1f} MiB")
    return 0


def run_rebuild(args) -> int:
    from dspark.errors import ConfigError
    from dspark.files import check_output_folder
    from dspark.models.zoo import BUILTIN_DIR, BUILTIN_DRAFTERS
    from dspark.pipeline.zoo_build import rebuild

    drafters = BUILTIN_DRAFTERS
    if args.drafters:
        drafters = tuple(d.strip() for d in args.drafters.split(",") if d.strip())
        unknown = [d for d in drafters if d not in BUILTIN_DRAFTERS]
        if unknown:
            raise ConfigError(f"--drafters: unknown {', '.join(unknown)}; choose from {', '.join(BUILTIN_DRAFTERS)}")
    check_output_folder(args.work, "--work")
    check_output_folder(args.out or BUILTIN_DIR, "--out")
    summary = rebuild(args.work, args.out or BUILTIN_DIR, device=args.device, drafters=drafters,
                      progress=not args.no_progress, stdlib_dir=args.stdlib, docs_dir=args.docs)
    if args.json:
        print_json(summary)
    return 0
