"""The `dspark` command line.

    dspark generate --model DIR --prompt TEXT [--drafter ngram|DIR] [--temperature F] [--top-k N]
                    [--top-p F] [--max-new-tokens N] [--seed N] [--json]
    dspark demo [--json]

Input errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dspark.errors import DSparkError


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="Confidence-scheduled speculative decoding (DSpark).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with plain or speculative decoding")
    gen.add_argument("--model", required=True, help="HF-format model folder (config.json + *.safetensors + tokenizer)")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--drafter", default=None, help="'ngram' or a drafter checkpoint folder; omitted = plain decoding")
    gen.add_argument("--num-draft-tokens", type=int, default=None, help="drafts per round (default: drafter block size)")
    gen.add_argument("--chat", action="store_true", help="render the prompt as one user turn with the chat template")
    _add_sampling_args(gen)
    _add_runtime_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    demo = sub.add_parser("demo", help="plain vs speculative decoding side by side on a built-in model")
    demo.add_argument("--model", default=None, help="model folder (default: a tiny random Qwen3 built on first use)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--json", action="store_true")
    _add_runtime_args(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            from dspark.commands.generate import run_generate

            return run_generate(args)
        if args.command == "demo":
            from dspark.commands.demo import run_demo

            return run_demo(args)
    except DSparkError as exc:
        print(f"dspark {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dspark {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
