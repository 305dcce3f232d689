#!/usr/bin/env python
"""Cost of each built-in drafter relative to the built-in target (issue: "a drafter's forward costs at most
about a quarter of the target's").

Two measures, side by side in one run:
  * multiply-accumulates per token of one forward (weights touched per token: the matmuls of the decoder
    layers, the context-fusion projection, the heads and the vocabulary head), drafter ÷ target;
  * wall time: one round's draft step (`propose`, batch 1, block γ) against the target's verification step
    over 1 + γ tokens at the same context length, median of `--repeats` (dspark.scheduling.profiler's
    measurement), ratio drafter ÷ target.
Writes benchmarks/results/drafter_cost_<device>.json and prints a table.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_drafter_cost.py [--context 256] [--repeats 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dspark.models.drafters import load_drafter  # noqa: E402
from dspark.models.target_runner import TargetRunner  # noqa: E402
from dspark.models.zoo import BUILTIN_DRAFTERS, builtin_drafter, builtin_target  # noqa: E402
from dspark.scheduling.profiler import measure_profile  # noqa: E402


def macs_per_token(module: torch.nn.Module, skip: tuple[str, ...] = ("embed_tokens",)) -> int:
    """Weights of every 2-D parameter used as a matmul (embedding lookups excluded): MACs per token."""
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and not any(s in n for s in skip))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target_dir = builtin_target()
    runner = TargetRunner.from_pretrained(target_dir, device=args.device, dtype="float32")
    head = getattr(runner.model, "lm_head", None)
    lm_head = head.weight if head is not None else runner.model.model.embed_tokens.weight
    target_macs = macs_per_token(runner.model) + (lm_head.numel() if runner.config.tie_word_embeddings else 0)
    rows = []
    for name in BUILTIN_DRAFTERS:
        drafter = load_drafter(str(builtin_drafter(name)), device=args.device, dtype="float32")
        block_size = drafter.block_size
        timing = measure_profile(runner, drafter, context=args.context, requests=[1], lengths=[1 + block_size],
                                 repeats=args.repeats)
        draft_ms, verify_ms = timing["draft_ms"]["1"], timing["verify_ms"][f"1x{1 + block_size}"]
        model = getattr(drafter, "model", drafter)
        drafter_macs = macs_per_token(model)
        if not any("lm_head" in n for n, _ in model.named_parameters()):
            drafter_macs += lm_head.numel()  # shares the target's vocabulary head
        rows.append({
            "drafter": name, "block_size": block_size, "macs_per_token": drafter_macs, "target_macs_per_token": target_macs,
            "macs_ratio": drafter_macs / target_macs, "draft_step_ms": draft_ms, "verify_step_ms": verify_ms,
            "time_ratio": draft_ms / verify_ms,
        })
    result = {
        "benchmark": "drafter_cost", "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "device": args.device, "threads": args.threads, "context": args.context, "repeats": args.repeats, "rows": rows,
    }
    out_path = ROOT / "benchmarks" / "results" / f"drafter_cost_{args.device.split(':')[0]}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'drafter':<11} {'γ':>2} {'MACs/token':>11} {'÷ target':>8} {'draft ms':>9} {'verify ms':>9} {'÷ verify':>8}")
    for r in rows:
        print(f"{r['drafter']:<11} {r['block_size']:>2} {r['macs_per_token']:>11,} {r['macs_ratio']:>8.2f} "
              f"{r['draft_step_ms']:>9.2f} {r['verify_step_ms']:>9.2f} {r['time_ratio']:>8.2f}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
