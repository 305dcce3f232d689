#!/usr/bin/env python
"""ATen operations and host reads per steady engine round, and decoding speed, on the built-in model.

What it measures, for plain decoding and for DSpark speculation (the built-in target and DSpark drafter,
greedy, `--requests` concurrent requests with fixed lengths, `ignore_eos`):
* ATen operations dispatched per steady round (every op, views included: on a GPU each non-view op is at
  least one kernel launch), counted with a TorchDispatchMode over `--rounds` engine steps once every
  request decodes; and per target layer, from a forward of one token;
* host reads per round (`dspark.engine.host_syncs.HostSyncCounter`): inside the forward-to-commit window
  and in the whole step, and the step's batched transfers;
* tokens/s of whole `generate`-style runs (median of `--repeats`), plain and speculative, side by side.

Issue 17 compares these before and after the fast-path changes: run the script from both trees (the
counter module can be copied into the older tree) on the same machine, one after the other.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_step_ops.py --out benchmarks/results/step_ops.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dspark.decoding.sampling import SamplingParams  # noqa: E402
from dspark.engine.engine import Engine, EngineConfig  # noqa: E402
from dspark.engine.host_syncs import OpCounter, count_engine_steps  # noqa: E402
from dspark.models.drafters import load_drafter  # noqa: E402
from dspark.models.target_runner import TargetRunner  # noqa: E402
from dspark.models.zoo import builtin_drafter, builtin_target  # noqa: E402


def make_engine(target: Path, drafter_dir: Path | None, requests: int, new_tokens: int,
                graphs: bool | None = None, tokenizer=None, config: EngineConfig | None = None) -> Engine:
    runner = TargetRunner.from_pretrained(target, device="cpu", dtype="float32", graphs=graphs)
    drafter = load_drafter(str(drafter_dir), device="cpu", dtype="float32") if drafter_dir else None
    engine = Engine(runner, drafter, tokenizer=tokenizer, config=config)
    engine.controller.gate = None  # speculate every round: the count is per DSpark round
    for i in range(requests):
        prompt = [(7 * i + 3 * j) % 200 + 10 for j in range(24)]
        engine.add_request(i, prompt, sampling=SamplingParams(temperature=0.0), max_new_tokens=new_tokens,
                           ignore_eos=True)
    return engine


def count_round(target: Path, drafter_dir: Path | None, requests: int, rounds: int) -> dict:
    engine = make_engine(target, drafter_dir, requests, 1024)
    while engine.last_step.get("decoding", 0) < requests:
        engine.step()
    engine.step()
    ops = OpCounter()
    whole, windows = count_engine_steps(engine, rounds, ops)
    return {
        "aten_ops_per_round": sum(ops.ops.values()) / rounds,
        "host_syncs_per_round": sum(len(w.syncs) for w in windows) / rounds,
        "host_syncs_per_round_whole_step": sum(len(w.syncs) for w in whole) / rounds,
        "transfers_per_round": sum(w.transfers for w in whole) / rounds,
        "sync_sites": sorted(set(s for w in whole for s in w.syncs)),
        "top_ops": ops.ops.most_common(12),
    }


def ops_per_layer(target: Path) -> float:
    """ATen ops of one target layer: a one-token forward's count, minus the same with the layers removed."""
    runner = TargetRunner.from_pretrained(target, device="cpu", dtype="float32")
    seq = runner.new_sequence()
    runner.forward([seq], [[5, 6, 7]])
    counts = []
    for keep in (len(runner.model.model.layers), 0):
        del runner.model.model.layers[keep:]
        with OpCounter() as ops:
            runner.forward([seq], [[8]], all_logits=False)
        runner.truncate(seq, 3)
        counts.append((keep, sum(ops.ops.values())))
    (layers, full), (_, none) = counts
    return (full - none) / layers


def tokens_per_second(target: Path, drafter_dir: Path | None, requests: int, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        engine = make_engine(target, drafter_dir, requests, new_tokens)
        started = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - started)
    return requests * new_tokens / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="1,4", help="concurrent requests, comma-separated (ops: the last)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="current", help="a name for this tree in the JSON (e.g. before, after)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    counts = [int(n) for n in args.requests.split(",")]
    target, drafter = builtin_target(), builtin_drafter()
    result = {"label": args.label, "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "requests": counts,
              "aten_ops_per_target_layer": ops_per_layer(target)}
    for name, folder in (("plain", None), ("dspark", drafter)):
        result[name] = count_round(target, folder, counts[-1], args.rounds)
        result[name]["tok_s"] = {n: tokens_per_second(target, folder, n, args.new_tokens, args.repeats) for n in counts}
    print(f"{args.label}: ATen ops per target layer {result['aten_ops_per_target_layer']:.0f}; "
          f"per round at {counts[-1]} requests:")
    speeds = "".join(f"{f'tok/s R={n}':>11}" for n in counts)
    print(f"{'':8}{'ops/round':>10}{'syncs in window':>16}{'syncs in step':>14}{'transfers':>10}{speeds}")
    for name in ("plain", "dspark"):
        r = result[name]
        speeds = "".join(f"{r['tok_s'][n]:>11.1f}" for n in counts)
        print(f"{name:8}{r['aten_ops_per_round']:>10.0f}{r['host_syncs_per_round']:>16.1f}"
              f"{r['host_syncs_per_round_whole_step']:>14.1f}{r['transfers_per_round']:>10.1f}{speeds}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
