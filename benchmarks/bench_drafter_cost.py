#!/usr/bin/env python
"""Cost of each built-in drafter relative to the built-in target, and of the parallel drafters at other depths
(issue: "compare at matched drafting cost": as many draft layers as fit in EAGLE-3's drafting time per round).

Measures, side by side in one run:
  * multiply-accumulates per token of one forward (weights touched per token: the matmuls of the decoder
    layers, the context-fusion projection, the heads and the vocabulary head), drafter ÷ target, and per
    drafting round (γ tokens: one block pass for DSpark / DFlash, γ dependent steps for EAGLE-3);
  * weight passes per round: how many times a round reads the drafter's weights (1 for a block pass, γ for
    EAGLE-3's chain; what bounds a memory-bound GPU step at low batch);
  * wall time: one round's draft step (`propose`, γ drafts per request) at each `--requests` concurrency,
    against the target's verification step over 1 + γ tokens per request at the same context length, median
    of `--repeats` (dspark.scheduling.profiler's measurement).
`--depths 1,3,5` adds the parallel drafters (DSpark, DSpark-RNN, DFlash) at those depths: the built-in
drafter's config with that many draft layers, weights freshly initialised from the target (the values do not
change the time). Writes benchmarks/results/drafter_cost_<device>.json and a table.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_drafter_cost.py [--context 256] [--repeats 30] \
        [--requests 1,16] [--depths 1,2,3,4,5] [--drafter NAME=FOLDER ...]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dspark.models.drafters.dspark import DSparkDrafter, DSparkModel, init_from_target  # noqa: E402
from dspark.models.target_runner import TargetRunner  # noqa: E402
from dspark.models.zoo import BUILTIN_DRAFTERS, builtin_drafter, builtin_target  # noqa: E402
from dspark.scheduling.profiler import measure_profile, parse_sizes  # noqa: E402

PARALLEL_DRAFTERS = ("dspark", "dspark-rnn", "dflash")


def macs_per_token(module: torch.nn.Module, skip: tuple[str, ...] = ("embed_tokens",)) -> int:
    """Weights of every 2-D parameter used as a matmul (embedding lookups excluded): MACs per token."""
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and not any(s in n for s in skip))


def at_depth(name: str, depth: int, runner: TargetRunner) -> DSparkDrafter:
    """The built-in parallel drafter `name`'s build with `depth` draft layers (float32, fresh weights)."""
    base = DSparkModel.from_pretrained(builtin_drafter(name), device=runner.device, dtype="float32")
    config = dataclasses.replace(base.config, layers=dataclasses.replace(base.config.layers, num_layers=depth))
    return DSparkDrafter(init_from_target(config, runner.model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--requests", default="1", help="comma-separated concurrencies (requests per draft step)")
    parser.add_argument("--depths", default="", help="comma-separated draft-layer counts for DSpark, DSpark-RNN, DFlash")
    parser.add_argument("--drafter", action="append", default=[], metavar="NAME=FOLDER",
                        help="also measure this drafter folder (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/drafter_cost_<device>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    requests = parse_sizes(args.requests, "--requests")
    depths = parse_sizes(args.depths, "--depths") if args.depths else []
    runner = TargetRunner.from_pretrained(builtin_target(), device=args.device, dtype="float32")
    head = getattr(runner.model, "lm_head", None)
    lm_head = head.weight if head is not None else runner.model.model.embed_tokens.weight
    target_macs = macs_per_token(runner.model) + (lm_head.numel() if runner.config.tie_word_embeddings else 0)
    candidates = [(name, None, lambda name=name: load_drafter(str(builtin_drafter(name)), device=args.device,
                                                               dtype="float32")) for name in BUILTIN_DRAFTERS]
    candidates += [(name, depth, lambda name=name, depth=depth: at_depth(name, depth, runner))
                   for name in PARALLEL_DRAFTERS for depth in depths]
    for spec in args.drafter:
        label, _, folder = spec.partition("=")
        candidates.append((label, None, lambda folder=folder: load_drafter(folder, device=args.device, dtype="float32")))
    rows = []
    for name, depth, make in candidates:
        drafter = make()
        block_size = drafter.block_size
        timing = measure_profile(runner, drafter, context=args.context, requests=requests, lengths=[1 + block_size],
                                 repeats=args.repeats)
        model = getattr(drafter, "model", drafter)
        drafter_macs = macs_per_token(model)
        if not any("lm_head" in n for n, _ in model.named_parameters()):
            drafter_macs += lm_head.numel()  # shares the target's vocabulary head
        layers = len(model.layers) if hasattr(model, "layers") else 1
        chain = not isinstance(drafter, DSparkDrafter)  # EAGLE-3: γ dependent steps; MTP-1: γ = 1
        row = {
            "drafter": name, "draft_layers": layers, "fresh_weights": depth is not None, "block_size": block_size,
            "macs_per_token": drafter_macs, "target_macs_per_token": target_macs, "macs_ratio": drafter_macs / target_macs,
            "macs_per_round": drafter_macs * block_size, "weight_passes_per_round": block_size if chain else 1,
            "draft_ms": {}, "verify_ms": {}, "time_ratio": {},
        }
        for r in requests:
            draft_ms, verify_ms = timing["draft_ms_measured"][str(r)], timing["verify_ms_measured"][f"{r}x{1 + block_size}"]
            row["draft_ms"][str(r)], row["verify_ms"][str(r)] = draft_ms, verify_ms
            row["time_ratio"][str(r)] = draft_ms / verify_ms
        rows.append(row)
        print(f"measured {name} ({layers} layer{'s' * (layers > 1)}): draft ms {row['draft_ms']}", flush=True)
    result = {
        "benchmark": "drafter_cost", "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "device": args.device, "threads": args.threads, "context": args.context, "repeats": args.repeats,
        "requests": requests, "rows": rows,
    }
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"drafter_cost_{args.device.split(':')[0]}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    header = "".join(f" {'draft ms C=' + str(r):>14} {'÷ verify':>8}" for r in requests)
    print(f"{'drafter':<11} {'layers':>6} {'γ':>2} {'MACs/token':>11} {'÷ target':>8} {'MACs/round':>11} {'passes':>6}{header}")
    for r in rows:
        cells = "".join(f" {r['draft_ms'][str(c)]:>14.2f} {r['time_ratio'][str(c)]:>8.2f}" for c in requests)
        print(f"{r['drafter']:<11} {r['draft_layers']:>6} {r['block_size']:>2} {r['macs_per_token']:>11,} "
              f"{r['macs_ratio']:>8.2f} {r['macs_per_round']:>11,} {r['weight_passes_per_round']:>6}{cells}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
