#!/usr/bin/env python
"""The engine's own host time per step (issue 17: "per-round CPU time hidden behind GPU time").

On a GPU a step's model work runs asynchronously (with CUDA graphs, one launch per forward), but the engine's
bookkeeping runs on the host between the GPU's steps: scheduling, the draft plan, the attention layouts,
verification's host side, the commit, detokenisation. This script measures that bookkeeping on this machine:
the wall time of `Engine.step` minus the time inside the model math — the target's `DecoderModel.forward`,
the drafter's context fusion, block pass and sequential head, and verification's vocabulary-sized tensor
work (`_verify`, `nonfinite_rows`, `sample_tokens`: kernels on a GPU) — on the built-in target and DSpark
drafter, greedy, at several concurrencies, for plain decoding and DSpark (verifying every draft), with the
ragged forward and with the static step (`TargetRunner(graphs=True)`, `DSparkDrafter.use_graphs(True)`).
The attention layouts (`PagedKVCache.prepare` / `prepare_static`: host work inside the forward) and
detokenisation (the engine has the built-in tokenizer, so every step turns its tokens into text, as
`dspark serve` does) are reported on their own.

The H100 step costs of ../shared/data/profiles/ (Qwen3-4B shape, every shape in a CUDA graph) give the GPU
time the bookkeeping would have to hide behind: `verify_ms["RxL"]` (+ `draft_ms["R"]` with a drafter). The
engine runs as on CUDA, with async output processing (`EngineConfig.async_output`): the last step's
detokenisation and outputs are made while this step's forward runs, so that part (`overlapped_ms`, measured
inside `Engine._process_pending`) hides behind the forward on a GPU; the rest adds to GPU time:
`host_share` = exposed / (exposed + GPU), exposed = host − overlapped.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_host_time.py --profile PROFILE.json --out FILE.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step_ops import make_engine  # noqa: E402
from dspark.engine.engine import EngineConfig  # noqa: E402
from dspark.engine import step as step_module  # noqa: E402
from dspark.models.tokenizer import load_tokenizer  # noqa: E402
from dspark.models.zoo import builtin_drafter, builtin_target  # noqa: E402


class Stopwatch:
    """Wraps methods of objects so that the seconds spent inside them add up in `seconds[name]`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, method: str, name: str) -> None:
        original = getattr(owner, method)
        self.seconds.setdefault(name, 0.0)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        timed.__wrapped__ = original
        setattr(owner, method, timed)


def measure(drafter_dir: Path | None, requests: int, steps: int, graphs: bool, tokenizer) -> dict:
    """Milliseconds per steady step: wall, model math, attention layouts, detokenisation, and the rest."""
    engine = make_engine(builtin_target(), drafter_dir, requests, 1024, graphs=graphs, tokenizer=tokenizer,
                         config=EngineConfig(async_output=True))
    if engine.drafter is not None:
        engine.drafter.use_graphs(graphs)
    while engine.last_step.get("decoding", 0) < requests:  # prompts in: every request decoding from here on
        engine.step()
    engine.step()
    watch = Stopwatch()
    watch.wrap(engine.runner.model, "forward", "target_math")
    for name in ("_verify", "nonfinite_rows", "sample_tokens"):  # vocabulary-sized tensor work: kernels on a GPU
        watch.wrap(step_module, name, "verify_math")
    watch.wrap(engine, "_detokenize", "detokenize")
    watch.wrap(engine, "_process_pending", "overlapped")  # called by run_step while the forward runs
    watch.wrap(engine.runner.cache, "prepare", "layouts")
    watch.wrap(engine.runner.cache, "prepare_static", "layouts")
    if engine.drafter is not None:
        watch.wrap(engine.drafter.model, "block_pass", "drafter_math")
        watch.wrap(engine.drafter.model, "fuse_context", "drafter_math")
        watch.wrap(engine.drafter, "sample_block", "drafter_math")
        watch.wrap(engine.drafter.cache, "prepare", "layouts")
        watch.wrap(engine.drafter.cache, "prepare_static", "layouts")
    walls = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - started)
    engine.close()
    for name in ("_verify", "nonfinite_rows", "sample_tokens"):
        setattr(step_module, name, getattr(step_module, name).__wrapped__)
    per_step = {name: 1e3 * s / steps for name, s in watch.seconds.items()}
    wall = 1e3 * sum(walls) / steps
    math = per_step["target_math"] + per_step.get("drafter_math", 0.0) + per_step["verify_math"]
    return {"wall_ms": wall, "median_wall_ms": 1e3 * statistics.median(walls), **per_step,
            "bookkeeping_ms": wall - math - per_step["layouts"] - per_step["detokenize"], "host_ms": wall - math,
            "exposed_host_ms": wall - math - per_step["overlapped"],
            "tokens_per_step": engine.spec_live.accepted_tokens / max(engine.spec_live.rounds, 1) + 1
            if engine.drafter is not None else 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="1,8,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default=None, help="a GPU step-cost table (verify_ms, draft_ms) to compare with")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    counts = [int(n) for n in args.requests.split(",")]
    profile = json.loads(Path(args.profile).read_text()) if args.profile else None
    tokenizer = load_tokenizer(builtin_target())  # text out, as `dspark serve` streams it
    result = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
              "profile": args.profile, "points": []}
    print(f"{'mode':8}{'forward':>8}{'R':>5}{'wall ms':>9}{'math':>8}{'layouts':>9}{'detok':>7}{'bookkeeping':>12}"
          f"{'hidden':>8}{'GPU ms':>8}{'host share':>11}")
    for mode, folder in (("plain", None), ("dspark", builtin_drafter())):
        for graphs in (False, True):
            for requests in counts:
                point = {"mode": mode, "graphs": graphs, "requests": requests,
                         **measure(folder, requests, args.steps, graphs, tokenizer)}
                if profile is not None:
                    gamma = profile["gamma"] if mode == "dspark" else 0
                    gpu = profile["verify_ms"].get(f"{requests}x{1 + gamma}")
                    if gpu is not None and mode == "dspark":
                        gpu += profile["draft_ms"].get(str(requests), float("nan"))
                    point["gpu_ms"] = gpu
                    exposed = point["exposed_host_ms"]
                    point["host_share"] = None if gpu is None else exposed / (exposed + gpu)
                    point["host_share_synchronous"] = None if gpu is None else point["host_ms"] / (point["host_ms"] + gpu)
                result["points"].append(point)
                gpu_text = f"{point['gpu_ms']:>8.2f}{point['host_share']:>11.2f}" if point.get("gpu_ms") else ""
                print(f"{mode:8}{'static' if graphs else 'ragged':>8}{requests:>5}{point['wall_ms']:>9.2f}"
                      f"{point['wall_ms'] - point['host_ms']:>8.2f}{point['layouts']:>9.2f}{point['detokenize']:>7.2f}"
                      f"{point['bookkeeping_ms']:>12.2f}{point['overlapped']:>8.2f}{gpu_text}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
