"""`dspark demo`: plain decoding and DSpark speculative decoding side by side, with a losslessness check.

Loads the built-in target and its DSpark drafter (dspark.models.zoo), answers a few built-in prompts
(rendered with the chat template, the form the built-in target was trained on) greedily with and without the
drafter, prints both texts, τ and tokens/s of each, how repetitive the text is (distinct-n,
dspark.evaluation.text_quality), and exits non-zero unless the outputs are identical.
"""

from __future__ import annotations

from dspark.cli import add_runtime_args, print_json
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.evaluation.text_quality import text_quality
from dspark.models.drafters import load_drafter
from dspark.models.target_runner import TargetRunner
from dspark.data.chat import render_prompt
from dspark.models.tokenizer import load_tokenizer, stop_token_ids
from dspark.models.zoo import resolve_drafter, resolve_target

DEMO_PROMPTS = (
    "Continue this Python code:\n\ndef read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n"
    "    result = {}\n    with open(path) as f:",
    "Continue this Python code:\n\nclass Stack:\n    def __init__(self):\n        self._items = []\n\n"
    "    def push(self, item):",
    "Continue this passage from the Python documentation:\n\n"
    "The :mod:`json` module provides an API familiar to users of the standard library",
    "Continue this passage from the Python documentation:\n\n"
    "A list comprehension consists of brackets containing an expression followed by a",
)


def register(sub) -> None:
    demo = sub.add_parser("demo", help="plain vs DSpark speculative decoding side by side on the built-in model")
    demo.add_argument("--model", default=None, help="target folder (default: the built-in target)")
    demo.add_argument("--drafter", default=None, help="drafter folder, built-in name or 'ngram' (default: built-in DSpark)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--json", action="store_true")
    add_runtime_args(demo, default_threads=1)  # small model: one thread avoids contention on a shared CPU
    demo.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    folder = resolve_target(args.model)
    drafter_spec = resolve_drafter(args.drafter)
    tokenizer = load_tokenizer(folder)
    runner = TargetRunner.from_pretrained(folder, device=args.device, dtype=args.dtype)
    drafter = load_drafter(drafter_spec, device=args.device, dtype=args.dtype, target=runner.model)
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [render_prompt(tokenizer, p, chat) for p in DEMO_PROMPTS]
    stops = stop_token_ids(folder, tokenizer, runner.config.eos_token_ids)
    common = dict(sampling=SamplingParams(), max_new_tokens=args.max_new_tokens, stop_token_ids=stops, seed=0)
    generate(runner, prompts[:1], **dict(common, max_new_tokens=4))  # warm-up (allocations, first-call costs)
    generate(runner, prompts[:1], drafter=drafter, **dict(common, max_new_tokens=4))
    plain = generate(runner, prompts, **common)
    spec = generate(runner, prompts, drafter=drafter, **common)
    identical = all(a.token_ids == b.token_ids for a, b in zip(plain.sequences, spec.sequences))

    def text(seq) -> str:
        return tokenizer.decode(seq.token_ids, skip_special_tokens=True)

    speedup = spec.tokens_per_second / plain.tokens_per_second
    quality = text_quality([s.token_ids for s in spec.sequences])
    if args.json:
        print_json({
            "model": str(folder),
            "drafter": drafter_spec,
            "greedy_identical": identical,
            "mean_accepted_length": spec.stats.mean_accepted_length,
            "acceptance_rate": spec.stats.acceptance_rate,
            "ar_tokens_per_second": plain.tokens_per_second,
            "spec_tokens_per_second": spec.tokens_per_second,
            "speedup": speedup,
            "prompts": list(DEMO_PROMPTS),
            "plain_texts": [text(s) for s in plain.sequences],
            "spec_texts": [text(s) for s in spec.sequences],
            "text_quality": quality,
        })
    else:
        print(f"target: {folder}\ndrafter: {drafter_spec}\n")
        for prompt, a, b, row in zip(DEMO_PROMPTS, plain.sequences, spec.sequences, quality["per_text"]):
            print("prompt:\n" + prompt + "\n")
            print("plain decoding:\n" + text(a) + "\n")
            print("speculative decoding:\n" + text(b) + "\n")
            print(f"τ = {b.stats.mean_accepted_length:.2f}, identical = {a.token_ids == b.token_ids}, "
                  f"distinct-4 = {row['distinct_4']:.2f}\n" + "-" * 72)
        print(f"plain decoding:       {plain.tokens_per_second:8.1f} tok/s  ({plain.num_generated} tokens)")
        print(
            f"speculative decoding: {spec.tokens_per_second:8.1f} tok/s  (τ = {spec.stats.mean_accepted_length:.2f}, "
            f"acceptance rate {spec.stats.acceptance_rate or 0:.2f}, {speedup:.2f}× plain)"
        )
        mean = quality["mean"]
        print(f"text: distinct-1/2/4 {mean['distinct_1']:.2f} / {mean['distinct_2']:.2f} / {mean['distinct_4']:.2f} "
              f"(mean); {quality['degenerate_texts']} of {quality['texts']} texts degenerate "
              f"(distinct-4 < {quality['threshold_distinct_4']})")
        print(f"greedy outputs identical: {identical}")
    return 0 if identical else 1
