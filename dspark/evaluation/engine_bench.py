"""`dspark bench engine`: the paper's Figs. 7–8 measured on the serving engine (in-process, no HTTP).

Every (temperature, load, policy) run uses a fresh `Engine` over the same prompts, in the same order; the
policies of one load run back to back, `repeats` times in turn, and a point reports the median of each
metric over its runs (a shared 2-core VM drifts by ±10 % between identical runs minutes apart):

* closed loop, concurrency C: C requests in flight; when one finishes the next prompt is added, until
  `num_requests` have finished (vLLM's `--max-concurrency` benchmark);
* open loop, rate λ: request i arrives at Σ_{j≤i} Exp(λ) seconds (Poisson), queued if the engine is busy.

Before the measured requests, `warmup_requests` more run on the same engine at the same load and are not
counted (default max(2C, 8) closed loop, 16 open loop): a server is measured in its steady state, with the
online calibration and the draft gate (which drafts through its first 256 rounds) already fed, not from a
cold start that a short point would otherwise be dominated by.

Policies: `ar` (plain decoding, no drafter), `mtp` (the MTP-1 drafter verifying its one draft), `fixed-K`
(the DSpark drafter verifying K of its drafts), `causal-greedy` (Algorithm 1 with the staircase lookahead,
paper §3.2.2), `algorithm-1` (as published), `async-topk` (paper §5.2), `gated` (causal-greedy behind the
draft gate), `verify-all`. The hardware-aware ones use this machine's SPS profile of the built-in target and
drafter (measured once and cached, `dspark.scheduling.profiler`) or `--profile`.

Per point (docs/design.md §6 for τ): output throughput (tokens/s over the point's wall time), per-user speed
(mean over requests of (output tokens − 1) / (finish − first token): the decode speed a user sees), TTFT
(first token − arrival) and ITL (gaps between a request's successive outputs; a speculative step delivers
several tokens in one output, as vLLM's benchmark counts them) at p50 / p99 in ms, τ (tokens per decoding
step per request) and the mean verification length ℓ, the mean step time and its target-forward and drafter
parts (ms), the share of step time outside the model calls, and the number of preemptions.
`greedy_identical`: at temperature 0, every run of every policy produced the same tokens for every request
as `ar` (None when no temperature-0 run was made).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig, StepTimes
from dspark.errors import ConfigError
from dspark.scheduling.controller import SpeculationController

POLICIES = ("ar", "mtp", "fixed-1", "fixed-3", "fixed-7", "causal-greedy", "gated", "async-topk")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
SIMULATOR_NAMES = {"ar": "plain", "mtp": "mtp-1", "gated": "causal-greedy-gated"}  # bench name → simulate's
ADAPTIVE = ("causal-greedy", "gated")
BASELINES = ("ar", "mtp", "fixed-1", "fixed-3", "fixed-7")


@dataclass
class BenchSettings:
    policies: tuple[str, ...] = POLICIES
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    request_rates: tuple[float, ...] = ()
    temperatures: tuple[float, ...] = (1.0,)
    num_requests: int | None = None  # per point; None: max(4C, 16) closed loop, 64 open loop
    warmup_requests: int | None = None  # per point, not measured; None: max(2C, 8) closed loop, 16 open loop
    repeats: int = 1  # runs per point (interleaved across policies); a point reports their medians
    max_new_tokens: int = 64
    seed: int = 0


def parse_bench_policies(text: str, block_size: int) -> tuple[str, ...]:
    """"ar,mtp,fixed-3,causal-greedy,..." → names; "fixed" = fixed-1..γ. ConfigError for an unknown name."""
    known = {"ar", "mtp", "causal-greedy", "algorithm-1", "async-topk", "gated", "verify-all"}
    out = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        if item == "fixed":
            out.extend(f"fixed-{k}" for k in range(1, block_size + 1))
        elif item.startswith("fixed-") and item[6:].isdigit() and 1 <= int(item[6:]) <= block_size:
            out.append(item)
        elif item in known:
            out.append(item)
        else:
            raise ConfigError(f"--policies: unknown policy {item!r} (use {', '.join(sorted(known))}, fixed or fixed-K with "
                              f"1 ≤ K ≤ {block_size})")
    if not out:
        raise ConfigError("--policies: give at least one policy")
    return tuple(dict.fromkeys(out))


def policy_setup(name: str, dspark, mtp, profile, regimes) -> tuple[object | None, SpeculationController]:
    """(drafter, controller) of a bench policy: `dspark`, `mtp` drafters; `profile` an SPSProfile (for the
    hardware-aware policies and the gate); `regimes` the DSpark drafter's calibration regimes."""
    from dspark.scheduling.gate import DraftGate
    from dspark.scheduling.policies import AsyncTopK, CausalGreedy, FixedLength, VerifyAll

    if name == "ar":
        return None, SpeculationController()
    if name == "mtp":
        return mtp, SpeculationController(policy=VerifyAll())
    if name.startswith("fixed-"):
        return dspark, SpeculationController(policy=FixedLength(int(name[6:])), regimes=regimes)
    policy = {"causal-greedy": lambda: CausalGreedy(profile), "gated": lambda: CausalGreedy(profile),
              "algorithm-1": lambda: CausalGreedy(profile, lookahead=False), "async-topk": lambda: AsyncTopK(profile),
              "verify-all": VerifyAll}[name]()
    gate = DraftGate(profile) if name == "gated" else None
    return dspark, SpeculationController(policy=policy, regimes=regimes, gate=gate)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) of `values`, in their unit, interpolated linearly between order statistics
    (numpy's default, as vLLM's benchmarks report them); None when there are no values."""
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


@dataclass
class _Tracked:
    prompt_index: int
    arrival: float
    output_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish: float | None = None


def _drive(engine: Engine, prompts: list[list[int]], ids: range, *, sampling: SamplingParams, max_new_tokens: int,
           concurrency: int | None, arrivals: np.ndarray | None) -> tuple[list[_Tracked], float]:
    """Feed requests `ids` (prompt i % len(prompts)) to the engine, closed loop (at most `concurrency` in flight)
    or open loop (request j arrives at arrivals[j] seconds), and step it until all have finished.
    Returns (records in id order, elapsed seconds)."""
    tracked: dict[int, _Tracked] = {}
    pending, done = 0, 0
    start = time.perf_counter()
    while done < len(ids):
        now = time.perf_counter()
        while pending < len(ids):
            if concurrency is not None and len(tracked) - done >= concurrency:
                break
            if arrivals is not None and start + arrivals[pending] > now:
                break
            request_id = ids[pending]
            engine.add_request(request_id, prompts[request_id % len(prompts)], sampling=sampling,
                               max_new_tokens=max_new_tokens)
            tracked[request_id] = _Tracked(request_id % len(prompts), now)
            pending += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + arrivals[pending] - time.perf_counter()))
            continue
        outputs = engine.step()
        stamp = time.perf_counter()
        for out in outputs:
            record = tracked[out.request_id]
            record.output_times.append(stamp)
            record.tokens.extend(out.new_token_ids)
            if out.finished:
                record.finish = stamp
                done += 1
    return [tracked[i] for i in ids], time.perf_counter() - start


def _counters(engine: Engine) -> dict:
    """The engine's cumulative counters that a point's metrics are differences of."""
    spec, times, gate = engine.spec, engine.times, engine.controller.gate
    return {"rounds": spec.rounds, "emitted": spec.emitted_tokens, "verified": spec.verified_tokens,
            "steps": engine.steps, "step_s": times.step_s, "target_s": times.target_s, "draft_s": times.draft_s,
            "preemptions": engine.scheduler.num_preemptions,
            "drafted_steps": gate.drafted_steps if gate is not None else 0,
            "skipped_steps": gate.skipped_steps if gate is not None else 0}


def run_point(engine: Engine, prompts: list[list[int]], *, sampling: SamplingParams, max_new_tokens: int,
              num_requests: int, concurrency: int | None = None, request_rate: float | None = None,
              warmup_requests: int = 0, seed: int = 0) -> tuple[dict, list[list[int]]]:
    """One load point on a fresh engine → (metrics, each request's tokens in prompt order).

    First `warmup_requests` requests run at the same load and are not measured (aiperf's warm-up phase): they
    take the engine from cold (empty calibration window, a draft gate still in its first rounds, cold
    allocator) to the steady state a long-running server is in. Their prompts follow the measured ones in the
    prompt list, so they differ where the list is long enough. All metrics are differences of the engine's
    counters over the measured requests."""
    rng = np.random.default_rng(seed)

    def arrivals(count: int) -> np.ndarray | None:
        return None if request_rate is None else np.cumsum(rng.exponential(1.0 / request_rate, count))

    drive = dict(sampling=sampling, max_new_tokens=max_new_tokens, concurrency=concurrency)
    if warmup_requests:
        _drive(engine, prompts, range(num_requests, num_requests + warmup_requests), **drive,
               arrivals=arrivals(warmup_requests))
    before = _counters(engine)
    records, elapsed = _drive(engine, prompts, range(num_requests), **drive, arrivals=arrivals(num_requests))
    delta = {key: value - before[key] for key, value in _counters(engine).items()}
    total = sum(len(r.tokens) for r in records)
    ttft = [(r.output_times[0] - r.arrival) * 1000 for r in records]
    itl = [(b - a) * 1000 for r in records for a, b in zip(r.output_times, r.output_times[1:])]
    speeds = [(len(r.tokens) - 1) / (r.finish - r.output_times[0]) for r in records
              if len(r.tokens) > 1 and r.finish > r.output_times[0]]
    times = StepTimes(steps=delta["steps"], step_s=delta["step_s"], target_s=delta["target_s"], draft_s=delta["draft_s"])
    point = {
        "throughput_tok_s": total / elapsed,
        "per_user_tok_s": float(np.mean(speeds)) if speeds else None,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
        "tau": delta["emitted"] / delta["rounds"] if delta["rounds"] else None,
        "mean_verify_len": delta["verified"] / delta["rounds"] if delta["rounds"] else 0.0,
        "requests": num_requests, "warmup_requests": warmup_requests, "output_tokens": total, "elapsed_s": elapsed,
        "steps": delta["steps"], "engine_overhead_share": times.overhead_share,
        "step_ms_mean": 1000 * times.step_s / max(1, times.steps),
        "target_ms_mean": 1000 * times.target_s / max(1, times.steps),
        "draft_ms_mean": 1000 * times.draft_s / max(1, times.steps),
        "preemptions": delta["preemptions"],
    }
    if engine.controller.gate is not None:
        point["gate"] = {**engine.controller.gate.report(), "drafted_steps": delta["drafted_steps"],
                         "skipped_steps": delta["skipped_steps"]}
    return point, [r.tokens for r in records]


MEDIAN_KEYS = ("throughput_tok_s", "per_user_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tau",
               "mean_verify_len", "elapsed_s", "engine_overhead_share", "step_ms_mean", "target_ms_mean", "draft_ms_mean")


def _median_point(runs: list[dict]) -> dict:
    """One point from its repeats: the median of each metric in MEDIAN_KEYS (the other fields from the run
    of median throughput) and every run's throughput in `throughput_runs`."""
    order = sorted(runs, key=lambda p: p["throughput_tok_s"])
    point = dict(order[(len(order) - 1) // 2])
    for key in MEDIAN_KEYS:
        values = [p[key] for p in runs if p.get(key) is not None]
        point[key] = float(np.median(values)) if values else None
    point["throughput_runs"] = [p["throughput_tok_s"] for p in runs]
    return point


def run_bench(runner, prompts: list[list[int]], settings: BenchSettings, *, make: Callable[[str], tuple],
              engine_config: Callable[[int], EngineConfig], eos_token_ids: Sequence[int] = (),
              progress: Callable[[str], None] | None = None) -> dict:
    """Every temperature × load × policy, `settings.repeats` times. make(policy) → (drafter, controller), fresh
    per run; engine_config(max concurrency) → the EngineConfig. The policies of one load run back to back,
    repeat after repeat, so a drift in the machine's speed (a shared VM's neighbours) falls on all of them
    alike; a point reports the median over its repeats. Returns {"results": [...], "greedy_identical": ...}."""
    loads = [("concurrency", c) for c in settings.concurrency] + [("request_rate", r) for r in settings.request_rates]
    results, greedy = [], None
    for temperature in settings.temperatures:
        sampling = SamplingParams(temperature=temperature)
        for kind, value in loads:
            count = settings.num_requests or (max(4 * value, 16) if kind == "concurrency" else 64)
            warmup = settings.warmup_requests
            if warmup is None:
                warmup = max(2 * value, 8) if kind == "concurrency" else 16
            runs: dict[str, list[dict]] = {policy: [] for policy in settings.policies}
            ordered = sorted(settings.policies, key=lambda name: name != "ar")  # ar first: the greedy reference
            for repeat in range(settings.repeats):
                for policy in ordered:
                    drafter, controller = make(policy)
                    config = engine_config(value if kind == "concurrency" else count)
                    engine = Engine(runner, drafter, controller, config=config, eos_token_ids=eos_token_ids)
                    try:
                        point, tokens = run_point(
                            engine, prompts, sampling=sampling, max_new_tokens=settings.max_new_tokens,
                            num_requests=int(count), concurrency=value if kind == "concurrency" else None,
                            request_rate=value if kind == "request_rate" else None, warmup_requests=int(warmup),
                            seed=settings.seed)
                    finally:
                        engine.close()
                    runs[policy].append(point)
                    if temperature == 0.0 and "ar" in settings.policies:
                        if policy == "ar" and repeat == 0:
                            reference = tokens
                        else:
                            greedy = (greedy is not False) and tokens == reference
                    if progress is not None:
                        progress(f"T={temperature:g} {kind}={value:<6g} {policy:>14} run {repeat + 1}/{settings.repeats} "
                                 f"{point['throughput_tok_s']:8.1f} tok/s {point['per_user_tok_s'] or 0:7.1f} tok/s/user  "
                                 f"τ={point['tau'] or 0:.2f}")
            for policy in settings.policies:
                results.append({"policy": policy, kind: value, "temperature": temperature, **_median_point(runs[policy])})
    if greedy is None and 0.0 in settings.temperatures and "ar" in settings.policies:
        greedy = True  # ar was the only policy at temperature 0
    return {"results": results, "greedy_identical": greedy}


def goals(result: dict) -> list[dict]:
    """Issue goals per temperature and load: the better adaptive policy vs the best baseline (≥ 0.97), per-user
    speed at concurrency 1 vs ar (≥ 1.15 at T = 1, ≥ 2.5 at T = 0), ar batching (C = 16 vs 1, ≥ 4), engine
    overhead at C = 16 (≤ 15 %)."""
    points = result["results"]
    out = []

    def find(policy, t, c):
        return next((p for p in points if p["policy"] == policy and p["temperature"] == t and p.get("concurrency") == c), None)

    for t in sorted({p["temperature"] for p in points}):
        for c in sorted({p["concurrency"] for p in points if "concurrency" in p}):
            adaptive = [p for p in (find(a, t, c) for a in ADAPTIVE) if p]
            base = [p for p in (find(b, t, c) for b in BASELINES) if p]
            if adaptive and base:
                best_a = max(adaptive, key=lambda p: p["throughput_tok_s"])
                best_b = max(base, key=lambda p: p["throughput_tok_s"])
                ratio = best_a["throughput_tok_s"] / best_b["throughput_tok_s"]
                out.append({"goal": "adaptive ≥ 0.97 × best baseline", "temperature": t, "concurrency": c,
                            "adaptive": best_a["policy"], "baseline": best_b["policy"], "ratio": ratio, "met": ratio >= 0.97})
        ar1 = find("ar", t, 1)
        adaptive1 = [p for p in (find(a, t, 1) for a in ADAPTIVE) if p and p["per_user_tok_s"]]
        if ar1 and ar1["per_user_tok_s"] and adaptive1:
            best = max(adaptive1, key=lambda p: p["per_user_tok_s"])
            ratio = best["per_user_tok_s"] / ar1["per_user_tok_s"]
            need = 2.5 if t == 0 else 1.15
            out.append({"goal": f"per-user speed at C = 1 ≥ {need} × ar", "temperature": t, "policy": best["policy"],
                        "ratio": ratio, "met": ratio >= need})
        ar16 = find("ar", t, 16)
        if ar1 and ar16:
            ratio = ar16["throughput_tok_s"] / ar1["throughput_tok_s"]
            out.append({"goal": "ar throughput at C = 16 ≥ 4 × C = 1", "temperature": t, "ratio": ratio, "met": ratio >= 4})
        for policy in ADAPTIVE:
            p16 = find(policy, t, 16)
            if p16 and p16["engine_overhead_share"] is not None:
                share = p16["engine_overhead_share"]
                out.append({"goal": "engine overhead at C = 16 ≤ 15 %", "temperature": t, "policy": policy,
                            "share": share, "met": share <= 0.15})
    return out


def simulator_comparison(result: dict, simulated: dict[float, dict]) -> list[dict]:
    """Measured vs `dspark simulate` throughput per policy and concurrency (same profile): prediction error
    = simulated / measured − 1. simulated: {temperature: simulate() result}."""
    rows = []
    for p in result["results"]:
        if "concurrency" not in p or p["temperature"] not in simulated:
            continue
        sim = simulated[p["temperature"]]["policies"].get(SIMULATOR_NAMES.get(p["policy"], p["policy"]))
        point = next((s for s in sim or [] if s["concurrency"] == p["concurrency"]), None)
        if point is None:
            continue
        rows.append({"policy": p["policy"], "temperature": p["temperature"], "concurrency": p["concurrency"],
                     "measured_tok_s": p["throughput_tok_s"], "simulated_tok_s": point["throughput_tok_s"],
                     "error": point["throughput_tok_s"] / p["throughput_tok_s"] - 1})
    return rows


def bench_table(result: dict) -> str:
    """Throughput (tokens/s) per load and policy, per temperature; then the goals."""
    lines = []
    points = result["results"]
    policies = list(dict.fromkeys(p["policy"] for p in points))
    for t in sorted({p["temperature"] for p in points}):
        for kind in ("concurrency", "request_rate"):
            values = sorted({p[kind] for p in points if kind in p and p["temperature"] == t})
            if not values:
                continue
            lines.append(f"T = {t:g}: output throughput (tokens/s) | per-user (tokens/s) by {kind}")
            lines.append(f"{kind[:11]:>11} " + "".join(f"{name[:14]:>16}" for name in policies))
            for v in values:
                row = f"{v:>11g} "
                for name in policies:
                    p = next((q for q in points if q["policy"] == name and q["temperature"] == t and q.get(kind) == v), None)
                    row += f"{'':>16}" if p is None else f"{p['throughput_tok_s']:>8.0f} |{p['per_user_tok_s'] or 0:>6.1f}"
                lines.append(row)
    for g in result.get("goals", []):
        where = ", ".join(f"{k}={g[k]}" for k in ("temperature", "concurrency", "policy") if k in g)
        value = g.get("ratio", g.get("share"))
        lines.append(f"goal {g['goal']} ({where}): {value:.3f} — {'met' if g['met'] else 'MISSED'}")
    lines.append(f"greedy_identical: {result['greedy_identical']}")
    return "\n".join(lines)


def plot(result: dict, out_dir, temperature: float) -> list:
    """Fig. 7 (throughput vs per-user speed) and Fig. 8 (throughput and mean ℓ vs concurrency) of the
    closed-loop points at one temperature, drawn by the simulator's plotting functions."""
    from pathlib import Path

    from dspark.evaluation.simulator import plot_budget, plot_frontier

    points = [p for p in result["results"] if p["temperature"] == temperature and "concurrency" in p and p["per_user_tok_s"]]
    if not points:
        return []
    policies: dict[str, list[dict]] = {}
    for p in points:
        policies.setdefault(p["policy"], []).append(dict(p, mean_budget=p["mean_verify_len"]))
    shaped = {"settings": {"concurrency": sorted({p["concurrency"] for p in points})}, "policies": policies}
    suffix = f"_t{temperature:g}"
    out = Path(out_dir)
    return [plot_frontier(shaped, out / f"throughput_vs_per_user{suffix}.png",
                          f"engine, measured: throughput vs per-user speed, T = {temperature:g} (paper Fig. 7)"),
            plot_budget(shaped, out / f"budget_vs_concurrency{suffix}.png",
                        f"engine, measured: throughput and verified drafts vs load, T = {temperature:g} (paper Fig. 8)")]


def check_loads(concurrency: Sequence[int], rates: Sequence[float]) -> None:
    if any(c < 1 for c in concurrency):
        raise ConfigError("--concurrency: give request counts ≥ 1")
    if any(not (math.isfinite(r) and r > 0) for r in rates):
        raise ConfigError("--request-rate: give rates > 0 (requests per second)")
    if not concurrency and not rates:
        raise ConfigError("give --concurrency or --request-rate")
