"""`dspark demo`: plain decoding and speculative decoding side by side, with a losslessness check.

Until dspark ships its trained built-in target and DSpark drafter, the demo builds a tiny randomly
initialised Qwen3 (cached under $DSPARK_HOME, default ~/.cache/dspark) and drafts with the model-free
n-gram drafter. The text is gibberish — a random model — but the loop, the statistics and the check
that greedy speculative output equals greedy plain output are the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from dspark.cli import add_runtime_args, print_json
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.models.drafters.ngram import NgramDrafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer, stop_token_ids

DEMO_PROMPTS = (
    "def fibonacci(n):\n    ",
    "The Python standard library",
    "Speculative decoding drafts several tokens and",
    "for i in range(10):\n    print(",
)
RANDOM_MODEL_SEED = 3
RANDOM_MODEL_STD = 0.08


def dspark_home() -> Path:
    return Path(os.environ.get("DSPARK_HOME", Path.home() / ".cache" / "dspark"))


def demo_model_folder() -> tuple[Path, bool]:
    """The demo's model folder and whether it was just built."""
    folder = dspark_home() / f"demo-tiny-qwen3-seed{RANDOM_MODEL_SEED}"
    if (folder / "config.json").is_file():
        return folder, False
    build_random_model(folder, "tiny-qwen3", seed=RANDOM_MODEL_SEED, init_std=RANDOM_MODEL_STD)
    return folder, True


def register(sub) -> None:
    demo = sub.add_parser("demo", help="plain vs speculative decoding side by side on a built-in model")
    demo.add_argument("--model", default=None, help="model folder (default: a tiny random Qwen3 built on first use)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--json", action="store_true")
    add_runtime_args(demo, default_threads=1)  # the demo's model is tiny: one thread avoids contention
    demo.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    if args.model is None:
        folder, built = demo_model_folder()
        note = (
            "No trained built-in model ships yet: using a tiny randomly initialised Qwen3 "
            f"({'built now' if built else 'cached'} at {folder}) and the n-gram drafter. "
            "Its text is gibberish; the decoding loop and the losslessness check are real."
        )
    else:
        folder, note = Path(args.model), f"Model: {args.model}; drafter: n-gram."
    tokenizer = load_tokenizer(folder)
    runner = TargetRunner.from_pretrained(folder, device=args.device, dtype=args.dtype)
    prompts = [list(tokenizer(p)["input_ids"]) for p in DEMO_PROMPTS]
    stops = stop_token_ids(folder, tokenizer, runner.config.eos_token_ids)
    greedy = SamplingParams()
    common = dict(sampling=greedy, max_new_tokens=args.max_new_tokens, stop_token_ids=stops, seed=0)
    generate(runner, prompts[:1], **dict(common, max_new_tokens=4))  # warm-up (allocations, first-call costs)
    plain = generate(runner, prompts, **common)
    spec = generate(runner, prompts, drafter=NgramDrafter(num_draft_tokens=7), **common)
    identical = all(a.token_ids == b.token_ids for a, b in zip(plain.sequences, spec.sequences))
    if args.json:
        print_json({
            "note": note,
            "model": str(folder),
            "drafter": "ngram",
            "greedy_identical": identical,
            "mean_accepted_length": spec.stats.mean_accepted_length,
            "acceptance_rate": spec.stats.acceptance_rate,
            "ar_tokens_per_second": plain.tokens_per_second,
            "spec_tokens_per_second": spec.tokens_per_second,
            "speedup": spec.tokens_per_second / plain.tokens_per_second,
            "texts": [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in spec.sequences],
        })
    else:
        print(note)
        print()
        for prompt, a, b in zip(DEMO_PROMPTS, plain.sequences, spec.sequences):
            print(f"prompt:      {prompt!r}")
            print(f"plain:       {tokenizer.decode(a.token_ids, skip_special_tokens=True)!r}")
            print(f"speculative: {tokenizer.decode(b.token_ids, skip_special_tokens=True)!r}")
            print(f"             τ = {b.stats.mean_accepted_length:.2f}, identical = {a.token_ids == b.token_ids}")
            print()
        print(f"plain decoding:       {plain.tokens_per_second:8.1f} tok/s  ({plain.num_generated} tokens)")
        print(
            f"speculative (n-gram): {spec.tokens_per_second:8.1f} tok/s  (τ = {spec.stats.mean_accepted_length:.2f}, "
            f"acceptance rate {spec.stats.acceptance_rate or 0:.2f}, {spec.tokens_per_second / plain.tokens_per_second:.2f}× plain)"
        )
        print(f"greedy outputs identical: {identical}")
    return 0 if identical else 1
