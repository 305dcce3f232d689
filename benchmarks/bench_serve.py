#!/usr/bin/env python
"""`dspark serve` measured against the engine it wraps (docs/benchmarks.md "HTTP serving").

overhead — HTTP overhead: output throughput of the same requests (same prompt tokens, max tokens, temperature,
    engine configuration and policy; every request runs to max tokens), closed loop at --concurrency, once driven in-process (the engine stepped
    by `dspark.evaluation.engine_bench.run_point`) and once over HTTP (a `dspark serve` process on loopback,
    loaded by `dspark bench serve`'s client from this process, streamed, tokens counted from `usage`). Runs
    are interleaved, --repeats times, each after warm-up; the ratio of medians is reported per temperature.
    The client shares the machine's cores with the server, as a load generator on the same host does.
policies — the engine issue's comparison over HTTP: output throughput and per-user speed (1000 / median TPOT)
    of `dspark serve` with the default policy (auto: Algorithm 1 + lookahead behind the draft gate) against
    fixed-7, fixed-3 and plain decoding (`--drafter none`), at --concurrencies and --temperatures; each server
    is started once per repeat and the policies' runs are interleaved by repeat; medians reported.
soak — at least --num-prompts requests at --concurrency through `dspark bench serve` with a timeline
    (resident memory of the server process and KV usage sampled every second): 0 errors, KV usage and running
    requests back to zero at the end (no leaked pages), and the resident-memory slope after the first quarter.

Prompts: the evaluation sets' first user turns rendered with the chat template, sent to /v1/completions as
text (the server tokenizes them exactly as the in-process run does). HTTP requests carry no seed: a seeded
sampled request is planned as if alone (docs/design.md §6), a different workload from the in-process run's.

    .venv/bin/python benchmarks/bench_serve.py overhead --out benchmarks/results/serve_overhead_cpu
    .venv/bin/python benchmarks/bench_serve.py soak --num-prompts 2000 --concurrency 32 --out benchmarks/results/serve_soak_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dspark.data.chat import DEFAULT_TEMPLATE_KWARGS, render_text  # noqa: E402
from dspark.evaluation.serve_bench import (  # noqa: E402
    ServeBenchSettings, eval_prompts, plot, results_table, run_serve_bench, wait_for_health)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("overhead", "policies", "soak"))
    p.add_argument("--concurrencies", default="1,16", help="policies: closed-loop request counts")
    p.add_argument("--concurrency", type=int, default=None, help="default: 16 (overhead), 32 (soak)")
    p.add_argument("--num-prompts", type=int, default=None, help="measured requests per run (default: 64 / 2000)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperatures", default="0,1", help="overhead: comma-separated; soak: the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=16, help="prompts per evaluation set")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both runs (default: PyTorch's)")
    p.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(port: int, max_num_seqs: int, threads: int | None, extra: tuple[str, ...] = ()):
    """A `dspark serve` process on the built-in model, up and healthy; SIGTERM at exit (its exit code checked)."""
    command = [sys.executable, "-m", "dspark", "serve", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
               "--log-level", "warning", *extra]
    if threads is not None:
        command += ["--threads", str(threads)]
    proc = subprocess.Popen(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), stderr=subprocess.PIPE)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", 600, proc)
        yield proc
    finally:
        proc.terminate()
        code = proc.wait(120)
        if code != 0:
            print(f"bench_serve: dspark serve exited with {code}", file=sys.stderr)


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics samples by name, summed over labels (prometheus-client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(conn.getresponse().read().decode()):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def prompt_texts(limit: int) -> list[str]:
    from dspark.models.tokenizer import load_tokenizer
    from dspark.models.zoo import builtin_target

    tokenizer = load_tokenizer(builtin_target())
    return [render_text(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True,
                        template_kwargs=dict(DEFAULT_TEMPLATE_KWARGS)) for text in eval_prompts(None, None, limit, 0)]


def machine() -> dict:
    return {"date": dt.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def run_overhead(args) -> dict:
    import torch

    from dspark.decoding.sampling import SamplingParams
    from dspark.engine.engine import EngineConfig
    from dspark.evaluation.engine_bench import run_point
    from dspark.serving.server import ModelOptions, load_engine

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    concurrency = args.concurrency or 16
    num = args.num_prompts or 64
    temperatures = [float(t) for t in args.temperatures.split(",")]
    texts = prompt_texts(args.limit)
    port = args.port or free_port()
    runs: dict = {t: {"in_process": [], "http": []} for t in temperatures}
    for t in temperatures:  # a fresh engine and server per temperature: the draft gate adapts to the workload
        engine, tokenizer, _ = load_engine(ModelOptions(), EngineConfig(max_num_seqs=64))  # dspark serve's defaults
        engine.eos_token_ids = frozenset()  # every request runs to max tokens on both sides (HTTP: ignore_eos)
        prompts = [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]
        with serve_process(port, 64, args.threads):
            for repeat in range(args.repeats):
                point, _ = run_point(engine, prompts, sampling=SamplingParams(temperature=t), max_new_tokens=args.max_tokens,
                                     num_requests=num, concurrency=concurrency, warmup_requests=2 * concurrency,
                                     seed=repeat)
                runs[t]["in_process"].append(point["throughput_tok_s"])
                http_result = run_serve_bench(ServeBenchSettings(
                    url=f"http://127.0.0.1:{port}", num_prompts=num, max_concurrency=concurrency,
                    warmup_prompts=2 * concurrency, max_tokens=args.max_tokens, temperature=t, sample_interval_s=0,
                    ignore_eos=True), prompts=[texts[i % len(texts)] for i in range(num)] + texts[: 2 * concurrency])
                if http_result["failed"]:
                    raise RuntimeError(f"HTTP run failed: {http_result['errors']}")
                runs[t]["http"].append(http_result["output_throughput"])
                print(f"T={t:g} repeat {repeat}: in-process {point['throughput_tok_s']:.0f} tok/s, "
                      f"HTTP {http_result['output_throughput']:.0f} tok/s", file=sys.stderr, flush=True)
        engine.close()
    rows = []
    for t in temperatures:
        inp, http = np.median(runs[t]["in_process"]), np.median(runs[t]["http"])
        rows.append({"temperature": t, "in_process_tok_s": float(inp), "http_tok_s": float(http),
                     "http_over_in_process": float(http / inp), "overhead": float(1 - http / inp),
                     "in_process_runs": runs[t]["in_process"], "http_runs": runs[t]["http"]})
    return {"mode": "overhead", "concurrency": concurrency, "num_prompts": num, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "prompts": len(texts), "machine": machine(), "rows": rows}


POLICY_FLAGS = {"gated (auto)": (), "fixed-7": ("--scheduler", "fixed-7"), "fixed-3": ("--scheduler", "fixed-3"),
                "ar": ("--drafter", "none")}


def run_policies(args) -> dict:
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    texts = prompt_texts(args.limit)
    runs: dict = {}
    for repeat in range(args.repeats):
        for policy, flags in POLICY_FLAGS.items():
            port = args.port or free_port()
            with serve_process(port, 64, args.threads, flags):
                for t in temperatures:
                    for c in concurrencies:
                        num = args.num_prompts or max(4 * c, 16)
                        result = run_serve_bench(ServeBenchSettings(
                            url=f"http://127.0.0.1:{port}", num_prompts=num, max_concurrency=c, warmup_prompts=max(2 * c, 8),
                            max_tokens=args.max_tokens, temperature=t, sample_interval_s=0),
                            prompts=[texts[i % len(texts)] for i in range(num + max(2 * c, 8))])
                        if result["failed"]:
                            raise RuntimeError(f"{policy} T={t} C={c}: {result['errors']}")
                        tpot = result["tpot_ms"]["median"]
                        runs.setdefault((policy, t, c), []).append(
                            {"throughput": result["output_throughput"], "per_user": 1000 / tpot if tpot else None,
                             "tau": (result["speculative"] or {}).get("mean_acceptance_length")})
                        print(f"repeat {repeat} {policy} T={t:g} C={c}: {result['output_throughput']:.0f} tok/s",
                              file=sys.stderr, flush=True)
    rows = []
    for (policy, t, c), values in runs.items():
        def median(key):
            kept = [v[key] for v in values if v[key] is not None]
            return float(np.median(kept)) if kept else None
        rows.append({"policy": policy, "temperature": t, "concurrency": c, "throughput_tok_s": median("throughput"),
                     "per_user_tok_s": median("per_user"), "mean_acceptance_length": median("tau"),
                     "throughput_runs": [v["throughput"] for v in values]})
    goals = []
    for t in temperatures:
        for c in concurrencies:
            at = {r["policy"]: r for r in rows if r["temperature"] == t and r["concurrency"] == c}
            best = max((p for p in at if p != "gated (auto)"), key=lambda p: at[p]["throughput_tok_s"])
            goals.append({"temperature": t, "concurrency": c, "best_baseline": best,
                          "adaptive_over_best": at["gated (auto)"]["throughput_tok_s"] / at[best]["throughput_tok_s"],
                          "per_user_over_ar": (at["gated (auto)"]["per_user_tok_s"] / at["ar"]["per_user_tok_s"]
                                               if c == 1 else None)})
    return {"mode": "policies", "machine": machine(), "max_tokens": args.max_tokens, "repeats": args.repeats,
            "rows": rows, "goals": goals}


def run_soak(args) -> dict:
    concurrency = args.concurrency or 32
    num = args.num_prompts or 2000
    temperature = float(args.temperatures.split(",")[0])
    texts = prompt_texts(args.limit)
    port = args.port or free_port()
    with serve_process(port, 64, args.threads) as proc:
        result = run_serve_bench(ServeBenchSettings(
            url=f"http://127.0.0.1:{port}", num_prompts=num, max_concurrency=concurrency, max_tokens=args.max_tokens,
            temperature=temperature, sample_interval_s=1.0), prompts=[texts[i % len(texts)] for i in range(num)],
            progress=lambda line: print(line, file=sys.stderr, flush=True))
        time.sleep(1.0)
        final = scrape(port)
        rss_kib = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
    timeline = [p for p in result["timeline"] if p.get("resident_memory_bytes")]
    quarter = [p for p in timeline if p["completed"] >= num // 4]
    slope = None
    if len(quarter) >= 2:
        x = np.array([p["completed"] for p in quarter], dtype=float)
        y = np.array([p["resident_memory_bytes"] for p in quarter], dtype=float) / 2**20
        slope = float(np.polyfit(x, y, 1)[0] * 1000) if np.ptp(x) > 0 else None
    rss = [p["resident_memory_bytes"] / 2**20 for p in quarter]
    return {"mode": "soak", "machine": machine(), "result": result, "checks": {
        "errors": result["failed"], "completed": result["completed"],
        "kv_cache_usage_at_end": final.get("dspark:kv_cache_usage_perc"),
        "requests_running_at_end": final.get("dspark:num_requests_running"),
        "requests_waiting_at_end": final.get("dspark:num_requests_waiting"),
        "rss_mib_after_first_quarter": {"min": min(rss) if rss else None, "max": max(rss) if rss else None,
                                        "slope_mib_per_1000_requests": slope},
        "rss_mib_at_end": rss_kib / 1024}}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    report = {"overhead": run_overhead, "policies": run_policies, "soak": run_soak}[args.mode](args)
    if args.mode == "policies":
        for row in report["rows"]:
            print(f"{row['policy']:>13} T={row['temperature']:g} C={row['concurrency']:>3}: {row['throughput_tok_s']:7.0f} tok/s, "
                  f"per user {row['per_user_tok_s'] or 0:6.1f} tok/s")
        for goal in report["goals"]:
            print(json.dumps(goal))
    elif args.mode == "overhead":
        print(f"{'T':>4} {'in-process tok/s':>17} {'HTTP tok/s':>11} {'HTTP/in-process':>16}")
        for row in report["rows"]:
            print(f"{row['temperature']:>4g} {row['in_process_tok_s']:>17.0f} {row['http_tok_s']:>11.0f} "
                  f"{row['http_over_in_process']:>16.3f}")
    else:
        print(results_table(report["result"]))
        print(json.dumps(report["checks"], indent=2))
        if out is not None:
            plot(report["result"], out)
        report["result"].pop("latencies_ms", None)
    if out is not None:
        (out / f"bench_serve_{args.mode}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
