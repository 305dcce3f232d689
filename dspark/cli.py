"""The `dspark` command line. Each subcommand lives in `dspark/commands/<name>.py`, which provides
`register(subparsers)` (declares its arguments, sets `handler`) and is imported lazily when run.

    dspark generate [--model DIR] --prompt TEXT [--drafter NAME|DIR] [--temperature F] [--top-k N]
                    [--top-p F] [--max-new-tokens N] [--seed N] [--json]
    dspark demo [--json]
    dspark eval [--target DIR] [--drafter NAME|DIR ...] [--datasets NAMES|FILES] [--limit N] [...]
    dspark sweep [--traces FILE] [--drafter LABEL] [--thresholds 0.05:0.95:0.05] [--kind confidence|survival]
                 [--out DIR] [--json]
    dspark simulate [--traces FILE] [--profile FILE] [--concurrency 1,2,4,...,256] [--steps N]
                    [--policies LIST] [--out DIR] [--json] [--seed N]
    dspark profile [--target DIR] [--drafter NAME|DIR] [--device D] [--context N] [--requests 1,2,4] [...]
    dspark data regenerate --target DIR --input FILE.jsonl --output FILE.jsonl [...]
    dspark data cache --target DIR --data FILE.jsonl --layers 1,9,17 --output DIR [...]
    dspark data corpus --out DIR / dspark data tokenizer --corpus DIR --out DIR
    dspark train --config FILE.yaml [section.key=value ...]      (torchrun for several processes)
    dspark pretrain --config FILE.yaml [section.key=value ...]
    dspark zoo list [--json] / dspark zoo rebuild [--work DIR]
    dspark serve [--model DIR] [--drafter D] [--host H] [--port P] [--api-key KEY] [...]      (docs/serving.md)
    dspark bench engine [...] / dspark bench serve --url URL [...]
    dspark export sglang --out DIR [--profile FILE] [--calibration FILE]

Every --model/--target/--drafter falls back to the built-in model (dspark.models.zoo) when omitted.

Input errors print one line naming the problem and exit with status 2: argparse's own checks, and every
`DSparkError` a command raises (its message folded onto one line). `--device` (default auto: CUDA when
available, else CPU) is resolved by `dspark.devices.resolve_device` before the command starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from dspark.errors import ConfigError, DSparkError

# Subcommand modules under dspark.commands, in the order `dspark --help` lists them.
COMMAND_MODULES = ("generate", "serve", "demo", "eval", "calibrate", "sweep", "simulate", "profile", "train", "pretrain", "data", "zoo", "bench", "export")


MAX_SEED = 2**63 - 1  # seeds feed torch, numpy and Python generators: a non-negative signed 64-bit integer


def seed_value(text: str) -> int:
    """argparse type of every --seed: an integer in [0, 2⁶³ − 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63 - 1], got {text}")
    return value


def add_seed_arg(parser: argparse.ArgumentParser, default: int = 0, help: str | None = None) -> None:
    parser.add_argument("--seed", type=seed_value, default=default, help=help)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_seed_arg(parser)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    from dspark.devices import DEVICE_HELP

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


COMPILE_HELP = ("run the dense layer parts of the target and of a DSpark / DFlash drafter through torch.compile "
                "(Inductor: the system C++ compiler on CPU, Triton on CUDA); the first steps compile")
ENFORCE_EAGER_HELP = ("on CUDA, run every forward eagerly instead of replaying the target's decoding and verification "
                      "steps and the drafter's rounds from CUDA graphs (one capture per bucket of batch, rows and "
                      "context, made on first use)")


def add_execution_args(parser: argparse.ArgumentParser) -> None:
    """--compile, --enforce-eager (vLLM's name for turning CUDA graphs off), --cuda-graph-max-bs (SGLang's) and
    --attention-backend (both engines' name)."""
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--enforce-eager", action="store_true", help=ENFORCE_EAGER_HELP)
    parser.add_argument("--cuda-graph-max-bs", type=int, default=256, metavar="N",
                        help="the most concurrent requests a captured step serves; larger steps run eagerly "
                             "(captures, and their memory, grow with N; default 256)")
    parser.add_argument("--attention-backend", choices=("auto", "sdpa", "flex"), default="auto",
                        help="attention of the decoding and verification steps and the drafters' rounds: flex reads "
                             "the paged KV cache in place (FlexAttention, compiled), sdpa gathers each sequence's "
                             "keys first; auto: sdpa until a GPU run shows flex faster (docs/serving.md)")


def check_execution_args(args) -> None:
    """ConfigError for an impossible --cuda-graph-max-bs, before any model loads."""
    if args.cuda_graph_max_bs < 1:
        raise ConfigError(f"--cuda-graph-max-bs must be ≥ 1, got {args.cuda_graph_max_bs} (--enforce-eager turns "
                          "CUDA graphs off)")


def add_runtime_args(parser: argparse.ArgumentParser, default_threads: int | None = None) -> None:
    add_device_arg(parser)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=default_threads,
                        help="CPU intra-op threads (default: PyTorch's); small models often run faster on 1")


def apply_threads(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            from dspark.errors import RequestError

            raise RequestError(f"--threads must be ≥ 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="Confidence-scheduled speculative decoding (DSpark).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dspark.commands.{name}").register(sub)
    return parser


def apply_device(args) -> None:
    """--device → the resolved device name ("cpu", "cuda:N"), or a ConfigError before any work."""
    if getattr(args, "device", None) is not None:
        from dspark.devices import resolve_device

        args.device = str(resolve_device(args.device, "--device"))


def one_line(message: str) -> str:
    """A message folded onto one line (YAML and library errors span several)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        apply_device(args)
        return args.handler(args)
    except DSparkError as exc:
        print(f"dspark {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dspark {args.command}: interrupted", file=sys.stderr)
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
