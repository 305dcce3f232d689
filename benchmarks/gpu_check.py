#!/usr/bin/env python
"""The first run on a lent GPU (issue 17, the GPU fast path): is dspark correct there, and where does its time go?

A lent H100 comes with a few minutes of device time and no network, so this one script measures, in order,
everything issue 17 needs to know, each section on its own (a failing section is recorded with its error and
the next one still runs; the JSON is rewritten after every section, so even a killed run leaves one):

1. build — a random-weight target of Qwen3-4B's shape (H 2560, 36 layers, 32/8 heads, head_dim 128, V 151936,
   tied embeddings, qk norm; `dspark.scheduling.profiler.RANDOM_SHAPES["qwen3-4b"]`), written as bf16 sharded
   safetensors with a `model.safetensors.index.json` like the released checkpoint, and a random DSpark drafter
   in the released layout (block 7, 5 draft layers reading target layers 1, 9, 17, 25, 33). Records build time,
   parameters, bytes on disk and the loader's peak GPU memory over the weights' bytes (`load_peak_over_weights`:
   1.0 means the weights were loaded in place, without a second copy).
2. greedy — in float32, plain greedy decoding vs speculative greedy decoding with the drafter
   (`dspark.engine.generation.generate`): token for token identical (`greedy_identical`) on a few prompts.
   The drafter is random, so nearly every draft is rejected: this checks verification and rollback on the GPU,
   not acceptance.
3. host_syncs — the engine's host synchronisations per round in the steady state (4 requests: 2 greedy, 2
   sampled with seeds), counted by `dspark.engine.host_syncs.HostSyncCounter` inside `run_step` (verification
   and commit) and over the whole step, for plain decoding and DSpark; each one stalls the CPU until the GPU
   drains its queue. The top-level `host_syncs_per_round` is DSpark's `run_step` count.
4. throughput — bf16 tokens/s of the dspark engine (plain and DSpark, verifying every draft) at 1, 8 and 32
   concurrent requests, next to Hugging Face transformers' `generate` on the same folder (eager PyTorch, no
   torch.compile: the default dynamic cache and `cache_implementation="static"`), greedy, fixed prompt and
   output lengths; and plain decoding at 1 request against the HBM roofline
   (`--hbm-gbps` / (weight bytes + KV bytes read per token)).
5. profiler — one steady round at 1 request, plain and DSpark: CUDA kernels per round and the share of the
   round's wall time the GPU is busy (torch.profiler), and ATen operations per round (a TorchDispatchMode that
   counts every operation; the same on a CPU, where the profiler's count is of ATen ops instead of kernels).
6. profile — `dspark profile` on this device over a small grid, then SGLang's SPS table from it with
   `dspark export sglang`; both files are kept next to the JSON.
7. compiled — the same target and drafter with `--compile` (their dense layer parts through torch.compile),
   plain and speculative at the first concurrency next to the eager engine, after one compiling run
   (`compile_s`); greedy agreement with the eager tokens.
8. graphs — the static-shape step of the target and the drafter's round replayed from CUDA graphs (on
   by default on CUDA, so sections 2–7 ran with them) against `--enforce-eager`: plain and speculative tokens/s at the first two concurrencies, greedy
   agreement, captures made and the first (capturing) run's seconds.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--smoke] [--out FILE] [--sections a,b,...]
        [--time-budget-s 420] [--hbm-gbps 3350]

`--smoke` runs every section on a tiny model with a few tokens (seconds on a CPU; tests/test_gpu_check.py).
New sections stop starting once `--time-budget-s` is spent (recorded as skipped). The JSON (`--out`, default
gpu_check.json) holds every section's record (status ok | failed | skipped, seconds, error and traceback, and
its fields — those filled before a failure too) and the headline numbers at the top level: `greedy_identical`,
`host_syncs_per_round`, `load_peak_over_weights`; `plain_tok_s`, `speculative_tok_s`, `hf_eager_tok_s`,
`hf_static_tok_s` by concurrency ({"1": ..., "8": ..., "32": ...}); `kernels_per_round` and `gpu_busy_fraction`
for {"plain", "dspark"}. A table goes to stdout and progress lines to stderr. Exit status 0 when every section
ran ok, 1 otherwise, 2 for bad arguments (one line on stderr, nothing run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch.autograd import DeviceType

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):  # run as a script from a checkout without `pip install -e .`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_plain_decoding import agreement, hf_generation_config, load_hf, measure_bandwidth, timed  # noqa: E402
from dspark.cli import main as dspark_main, one_line  # noqa: E402
from dspark.decoding.sampling import SamplingParams  # noqa: E402
from dspark.devices import resolve_device  # noqa: E402
from dspark.engine.engine import Engine, EngineConfig  # noqa: E402
from dspark.engine.generation import generate  # noqa: E402
from dspark.engine.host_syncs import OpCounter, count_engine_steps  # noqa: E402
from dspark.engine.request import Status  # noqa: E402
from dspark.models.drafters import compile_drafter  # noqa: E402
from dspark.errors import DSparkError  # noqa: E402
from dspark.evaluation.engine_bench import run_point  # noqa: E402
from dspark.files import check_output_file, write_text_atomically  # noqa: E402
from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target, load_dspark_drafter  # noqa: E402
from dspark.models.random_init import build_random_model  # noqa: E402
from dspark.models.target_runner import TargetRunner  # noqa: E402
from dspark.scheduling.controller import SpeculationController  # noqa: E402
from dspark.scheduling.profiler import RANDOM_SHAPES  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)
WARMUP_TOKENS = 8  # tokens of the untimed run before each throughput point
SAFETENSORS_ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
HEADLINE = {  # top-level field → (section, field)
    "greedy_identical": ("greedy", "greedy_identical"),
    "host_syncs_per_round": ("host_syncs", "host_syncs_per_round"),
    "plain_tok_s": ("throughput", "plain_tok_s"),
    "speculative_tok_s": ("throughput", "speculative_tok_s"),
    "hf_eager_tok_s": ("throughput", "hf_eager_tok_s"),
    "hf_static_tok_s": ("throughput", "hf_static_tok_s"),
    "load_peak_over_weights": ("build", "load_peak_over_weights"),
    "graphs_speedup_plain_at_1": ("graphs", "speedup_plain_at_1"),
    "flex_speedup_plain_at_1": ("attention", "speedup_plain_at_1"),
    "flex_kernel_error": ("attention", "kernel_error"),
    "kernels_per_round": ("profiler", "kernels_per_round"),
    "gpu_busy_fraction": ("profiler", "gpu_busy_fraction"),
    "compiled_plain_tok_s_1req": ("compiled", "plain_tok_s"),
}


@dataclass(frozen=True)
class Plan:
    """Model shapes and workload sizes of one run."""

    preset: str  # `build_random_model` preset, changed by `overrides`
    overrides: dict
    init_std: float
    drafter: dict  # target_layer_ids, num_draft_layers, block_size, markov_rank
    shards: int
    greedy_prompt_lens: tuple[int, ...]
    greedy_new_tokens: int
    concurrency: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    counted_steps: int  # steady steps counted by host_syncs and profiled by profiler
    mixed: tuple[int, int]  # profiler's mixed step: requests decoding, tokens of the prompt prefilled beside them
    profile_args: tuple[str, ...]  # `dspark profile` grid


QWEN3_4B = RANDOM_SHAPES["qwen3-4b"]
FULL = Plan(
    preset=QWEN3_4B["preset"], overrides=QWEN3_4B["overrides"], init_std=0.02, drafter=QWEN3_4B["drafter"], shards=3,
    greedy_prompt_lens=(17, 40, 64, 101), greedy_new_tokens=32, concurrency=(1, 8, 32), prompt_len=128,
    new_tokens=128, counted_steps=5, mixed=(8, 512),
    profile_args=("--context", "1024", "--requests", "1,4,16,64", "--lengths", "1,2,4,8", "--repeats", "5"),
)
SMOKE = Plan(
    preset="tiny-qwen3",
    overrides=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    init_std=0.3, drafter=dict(target_layer_ids=(0, 1), num_draft_layers=1, block_size=7, markov_rank=8), shards=3,
    greedy_prompt_lens=(5, 9, 16), greedy_new_tokens=16, concurrency=(1, 2), prompt_len=8, new_tokens=8,
    counted_steps=3, mixed=(2, 40),
    profile_args=("--context", "16", "--requests", "1,2", "--lengths", "1,2", "--repeats", "2"),
)
SECTION_NAMES = ("build", "greedy", "host_syncs", "throughput", "profiler", "profile", "compiled", "graphs", "attention")


# -- arguments -----------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens (a CPU test in seconds)")
    p.add_argument("--out", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    p.add_argument("--sections", default=",".join(SECTION_NAMES),
                   help=f"comma-separated subset of {','.join(SECTION_NAMES)} (default: all)")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="start no section after this many seconds")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="HBM bandwidth of the roofline in GB/s (default 3350: H100 SXM)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTION_NAMES]
    if unknown or not names:
        p.error(f"--sections: unknown or empty {unknown or args.sections!r}; choose from {','.join(SECTION_NAMES)}")
    args.sections = [s for s in SECTION_NAMES if s in names]
    if not args.time_budget_s > 0 or not args.hbm_gbps > 0:
        p.error("--time-budget-s and --hbm-gbps must be positive")
    return args


# -- shared state --------------------------------------------------------------------------------------
@dataclass
class Folders:
    target: Path
    drafter: Path
    info: dict


class Check:
    """What the sections share: the plan, the device, the clock, the built folders and loaded models."""

    def __init__(self, args, plan: Plan, device: torch.device, work: Path):
        self.args, self.plan, self.device, self.work = args, plan, device, work
        self.fast_dtype = torch.bfloat16
        self.started = time.perf_counter()
        self.deadline = self.started + args.time_budget_s
        self._folders: Folders | None = None
        self._build_error: str | None = None
        self._runners: dict[torch.dtype, TargetRunner] = {}
        self._drafters: dict[torch.dtype, object] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {message}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def folders(self) -> Folders:
        """The target and drafter folders, built on first use (a failed build is not retried)."""
        if self._folders is None:
            if self._build_error is not None:
                raise RuntimeError(f"the models could not be built: {self._build_error}")
            try:
                self._folders, self._runners[self.fast_dtype] = build_models(self)
            except Exception as exc:
                self._build_error = f"{type(exc).__name__}: {one_line(exc)}"
                raise
        return self._folders

    def runner(self, dtype: torch.dtype) -> TargetRunner:
        if dtype not in self._runners:
            self.say(f"loading the target in {dtype}")
            self._runners[dtype] = TargetRunner.from_pretrained(self.folders().target, device=self.device, dtype=dtype)
        return self._runners[dtype]

    def drafter(self, dtype: torch.dtype):
        if dtype not in self._drafters:
            self._drafters[dtype] = load_dspark_drafter(self.folders().drafter, device=self.device, dtype=dtype)
        return self._drafters[dtype]

    def release(self, dtype: torch.dtype | None = None) -> None:
        """Drop the models of `dtype` (None: all) and return their memory."""
        for cache in (self._runners, self._drafters):
            for key in [k for k in cache if dtype is None or k == dtype]:
                del cache[key]
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# -- 1. build ------------------------------------------------------------------------------------------
def shard_safetensors(folder: Path, shards: int) -> list[str]:
    """Split folder/model.safetensors into `shards` files of about equal size and write
    model.safetensors.index.json (the layout of released Hugging Face checkpoints). Returns the file names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        sizes = {}
        for name in handle.keys():
            view = handle.get_slice(name)
            sizes[name] = math.prod(view.get_shape()) * SAFETENSORS_ITEM_BYTES[view.get_dtype()]
        total, groups, current, filled = sum(sizes.values()), [], [], 0
        for name, size in sizes.items():
            current.append(name)
            filled += size
            if filled >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
                groups.append(current)
                current = []
        groups.append(current)
        weight_map = {}
        for i, names in enumerate(groups, 1):
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: handle.get_tensor(n) for n in names}, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()
    return sorted(set(weight_map.values()))


def build_models(check: Check) -> tuple[Folders, TargetRunner]:
    """Target folder (bf16, sharded), its loading measured, and a random DSpark drafter built from the loaded
    target. Returns the folders and the loaded target (bf16)."""
    plan, work, device = check.plan, check.work, check.device
    check.say(f"building a random {plan.preset} target with {plan.overrides}")
    start = time.perf_counter()
    target = build_random_model(work / "target", plan.preset, seed=0, init_std=plan.init_std, with_tokenizer=False,
                                dtype=torch.bfloat16, **plan.overrides)
    shards = shard_safetensors(target, plan.shards)
    build_s = time.perf_counter() - start

    check.say("loading it in bfloat16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner = TargetRunner.from_pretrained(target, device=device, dtype=check.fast_dtype)
    check.sync()
    load_s = time.perf_counter() - start
    weights = parameter_bytes(runner.model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    check.say("building the DSpark drafter")
    start = time.perf_counter()
    d = plan.drafter
    config = dspark_config_for_target(
        runner.hf_config, target_layer_ids=tuple(d["target_layer_ids"]), mask_token_id=runner.config.vocab_size - 1,
        num_draft_layers=d["num_draft_layers"], block_size=d["block_size"], markov_rank=d["markov_rank"])
    model = init_from_target(config, runner.model, seed=1, std=plan.init_std)
    drafter = model.save_pretrained(work / "drafter")
    drafter_params = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    info = {
        "target_config": json.loads((target / "config.json").read_text()),
        "target_build_s": build_s, "target_params": sum(p.numel() for p in runner.model.parameters()),
        "target_bytes_on_disk": folder_bytes(target), "target_shards": shards, "target_weight_bytes": weights,
        "target_load_s": load_s, "load_peak_bytes": peak,
        "load_peak_over_weights": None if peak is None else peak / weights,
        "drafter_config": {**d, "target_layer_ids": list(d["target_layer_ids"])},
        "drafter_build_s": time.perf_counter() - start, "drafter_params": drafter_params,
        "drafter_bytes_on_disk": folder_bytes(drafter),
    }
    return Folders(target, drafter, info), runner


def section_build(check: Check, out: dict) -> None:
    out.update(check.folders().info)


# -- 2. greedy -----------------------------------------------------------------------------------------
def top2_margin(runner: TargetRunner, history: list[int]) -> float:
    """The target's top-1 minus top-2 logit after `history`: near 0, a divergence is a float tie, not a bug."""
    seq = runner.new_sequence()
    try:
        logits = runner.forward([seq], [history], all_logits=False).logits[0]
    finally:
        runner.free_sequence(seq)
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def section_greedy(check: Check, out: dict) -> None:
    plan = check.plan
    runner, drafter = check.runner(torch.float32), check.drafter(torch.float32)
    prompts = random_prompts(runner.config.vocab_size, plan.greedy_prompt_lens, seed=1)
    kwargs = dict(sampling=GREEDY, max_new_tokens=plan.greedy_new_tokens, stop_token_ids=(), seed=0)
    try:
        check.say(f"greedy: plain decoding of {len(prompts)} prompts")
        plain = generate(runner, prompts, **kwargs)
        check.say("greedy: speculative decoding with the DSpark drafter")
        spec = generate(runner, prompts, drafter=drafter, **kwargs)
        reference = [s.token_ids for s in plain.sequences]
        speculative = [s.token_ids for s in spec.sequences]
        matched, rows = agreement(reference, speculative)["matched_prefix_per_row"], []
        for prompt, a, b, n in zip(prompts, reference, speculative, matched):
            row = {"prompt_len": len(prompt), "identical": a == b, "matched_prefix": n, "distinct_tokens": len(set(a))}
            if a != b:
                row["top2_logit_margin_at_divergence"] = top2_margin(runner, prompt + a[:n])
            rows.append(row)
    finally:
        check.release(torch.float32)
    out.update(greedy_identical=reference == speculative, dtype="float32", new_tokens=plan.greedy_new_tokens,
               tau=spec.stats.mean_accepted_length, acceptance_rate=spec.stats.acceptance_rate, prompts=rows)


# -- engines shared by host_syncs, throughput and profiler ---------------------------------------------
def make_engine(runner: TargetRunner, drafter, max_seqs: int, tokens_per_request: int) -> Engine:
    """An engine verifying every draft (no SPS profile needed), with a KV budget that admits `max_seqs`
    requests of `tokens_per_request` tokens at once."""
    page = runner.cache.page_size
    lookahead = 1 + (drafter.block_size if drafter is not None else 0)
    pages = max_seqs * (-(-(tokens_per_request + lookahead) // page) + 1)
    config = EngineConfig(max_num_seqs=max_seqs, kv_cache_tokens=(pages + pages // 10 + 2) * page, seed=0)
    return Engine(runner, drafter, SpeculationController(), config=config)


def steady_engine(check: Check, drafter, samplings: list[tuple[SamplingParams, int | None]]) -> Engine:
    """An engine with one request per (sampling, seed), stepped until every one decodes, then once more.
    Requests are long enough not to finish within the counted and profiled steps."""
    plan, runner = check.plan, check.runner(check.fast_dtype)
    width = 1 + (drafter.block_size if drafter is not None else 0)
    max_new = width * (4 * plan.counted_steps + 8)
    engine = make_engine(runner, drafter, len(samplings), plan.prompt_len + max_new)
    prompts = random_prompts(runner.config.vocab_size, [plan.prompt_len] * len(samplings), seed=3)
    requests = [engine.add_request(i, prompt, sampling=sampling, max_new_tokens=max_new, seed=seed)
                for i, (prompt, (sampling, seed)) in enumerate(zip(prompts, samplings))]
    try:
        for _ in range(100):
            engine.step()
            if all(r.status is Status.RUNNING and not r.prefilling for r in requests):
                engine.step()
                return engine
        raise RuntimeError("the requests were still prefilling after 100 steps")
    except BaseException:
        engine.close()
        raise


def check_still_running(engine: Engine, count: int) -> None:
    if len(engine.requests) != count:
        raise RuntimeError("a request finished inside the measured steps; the counts are not of steady rounds")


# -- 3. host_syncs -------------------------------------------------------------------------------------
def count_host_syncs(engine: Engine, steps: int) -> dict:
    """Syncs and batched transfers per step, inside `run_step` (verification and commit) and over the step."""
    whole, inner = count_engine_steps(engine, steps)
    if len(inner) != steps:
        raise RuntimeError(f"run_step ran {len(inner)} times in {steps} steps")
    sites = Counter(site for c in whole for site in c.syncs)
    return {
        "host_syncs_per_round": statistics.mean(len(c.syncs) for c in inner),
        "host_syncs_per_round_whole_step": statistics.mean(len(c.syncs) for c in whole),
        "transfers_per_round": statistics.mean(c.transfers for c in inner),
        "transfers_per_round_whole_step": statistics.mean(c.transfers for c in whole),
        "run_step_sync_sites": sorted({site for c in inner for site in c.syncs}),
        "sync_sites_per_step": {site: n / steps for site, n in sorted(sites.items())},
        "steps_counted": steps,
    }


def section_host_syncs(check: Check, out: dict) -> None:
    samplings = [(GREEDY, None), (GREEDY, None), (SAMPLED, 11), (SAMPLED, 12)]
    out.update(requests="2 greedy + 2 at temperature 1 with seeds", round="one engine step over the 4 requests")
    for kind, drafter in (("plain", None), ("dspark", check.drafter(check.fast_dtype))):
        engine = steady_engine(check, drafter, samplings)
        try:
            out[kind] = count_host_syncs(engine, check.plan.counted_steps)
            check_still_running(engine, len(samplings))
        finally:
            engine.close()
        check.say(f"host_syncs: {kind} {out[kind]['host_syncs_per_round']:.1f} syncs per round in run_step, "
                  f"{out[kind]['host_syncs_per_round_whole_step']:.1f} per whole step")
    out["host_syncs_per_round"] = out["dspark"]["host_syncs_per_round"]


# -- 4. throughput -------------------------------------------------------------------------------------
def engine_points(check: Check, drafter, prompts: list[list[int]], skipped: list[str], label: str) -> dict:
    """Concurrency → `run_point` metrics (and tokens) of a fresh engine serving that many requests at once,
    each point after a short untimed run at the same concurrency."""
    plan, runner = check.plan, check.runner(check.fast_dtype)
    points = {}
    for c in plan.concurrency:
        if check.out_of_time():
            skipped.append(f"{label} at {c}")
            continue
        for new_tokens in (WARMUP_TOKENS, plan.new_tokens):
            engine = make_engine(runner, drafter, c, plan.prompt_len + plan.new_tokens)
            try:
                point, tokens = run_point(engine, prompts, sampling=GREEDY, max_new_tokens=new_tokens, num_requests=c,
                                          concurrency=c)
            finally:
                engine.close()
        points[c] = {**point, "tokens": tokens}
        check.say(f"throughput: {label} at {c}: {point['throughput_tok_s']:.1f} tok/s (τ {point['tau']:.2f})")
    return points


@torch.inference_mode()
def hf_generate(model, input_ids: torch.Tensor, config) -> torch.Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)


def hf_points(check: Check, prompts: list[list[int]], skipped: list[str]) -> tuple[dict, dict, str | None]:
    """Transformers' generate, one batch of `c` prompts per concurrency, with each cache → tok/s and tokens
    by cache and concurrency, and the attention implementation it used."""
    plan, device = check.plan, check.device
    model = load_hf(check.folders().target, device, check.fast_dtype)
    caches = {"eager": hf_generation_config(plan.new_tokens),
              "static": hf_generation_config(plan.new_tokens, cache_implementation="static")}
    tok_s: dict[str, dict] = {name: {} for name in caches}
    tokens: dict[str, dict] = {name: {} for name in caches}
    for name, config in caches.items():
        warm = hf_generation_config(WARMUP_TOKENS, cache_implementation=config.cache_implementation)
        for c in plan.concurrency:
            if check.out_of_time():
                skipped.append(f"hf {name} at {c}")
                continue
            input_ids = torch.tensor(prompts[:c], device=device)
            for cfg in (warm, config):
                seconds, out = timed(lambda: hf_generate(model, input_ids, cfg), device)
            tok_s[name][c] = c * plan.new_tokens / seconds
            tokens[name][c] = out[:, plan.prompt_len:].tolist()
        check.say(f"throughput: transformers ({name} cache) {tok_s[name]}")
    return tok_s, tokens, getattr(model.config, "_attn_implementation", None)


def roofline(check: Check, runner: TargetRunner) -> dict:
    """Plain decoding at 1 request reads every weight and the request's KV cache once per token."""
    plan = check.plan
    weights = parameter_bytes(runner.model)
    kv = runner.cache.bytes_per_token * (plan.prompt_len + plan.new_tokens // 2)  # mean context while decoding
    tok_s = check.args.hbm_gbps * 1e9 / (weights + kv) if check.device.type == "cuda" else None
    return {"hbm_gbps": check.args.hbm_gbps, "weight_bytes": weights, "kv_bytes_per_token_mean": kv,
            "roofline_tok_s_1req": tok_s,
            "measured_copy_gbps": measure_bandwidth(check.device) / 1e9 if check.device.type == "cuda" else None}


def by_concurrency(points: dict, field: str) -> dict:
    return {str(c): p[field] for c, p in points.items()}


def section_throughput(check: Check, out: dict) -> None:
    plan = check.plan
    runner = check.runner(check.fast_dtype)
    prompts = random_prompts(runner.config.vocab_size, [plan.prompt_len] * max(plan.concurrency), seed=2)
    skipped: list[str] = []
    out.update(dtype="bfloat16", prompt_len=plan.prompt_len, new_tokens=plan.new_tokens, skipped_points=skipped,
               timing="tok/s = requests × new_tokens / wall time of the whole run, prefill included; "
                      "decode tok/s = a request's tokens after its first / time since its first")
    plain = engine_points(check, None, prompts, skipped, "plain")
    out.update(plain_tok_s=by_concurrency(plain, "throughput_tok_s"),
               plain_points={str(c): without_tokens(p) for c, p in plain.items()})
    out.update(roofline(check, runner))
    one = plan.concurrency[0]
    decode = plain[one]["per_user_tok_s"] if one in plain else None
    out.update(plain_decode_tok_s_1req=decode, plain_fraction_of_roofline_1req=(
        decode / out["roofline_tok_s_1req"] if decode and out["roofline_tok_s_1req"] else None))

    spec = engine_points(check, check.drafter(check.fast_dtype), prompts, skipped, "speculative")
    out.update(speculative_tok_s=by_concurrency(spec, "throughput_tok_s"), speculative_tau=by_concurrency(spec, "tau"),
               speculative_points={str(c): without_tokens(p) for c, p in spec.items()},
               speculative_over_plain_1req=(spec[one]["throughput_tok_s"] / plain[one]["throughput_tok_s"]
                                            if one in spec and one in plain else None))

    hf_tok_s, hf_tokens, attn = hf_points(check, prompts, skipped)
    out.update(hf_eager_tok_s={str(c): v for c, v in hf_tok_s["eager"].items()},
               hf_static_tok_s={str(c): v for c, v in hf_tok_s["static"].items()}, hf_attn_implementation=attn,
               plain_vs_hf_eager_greedy_agreement={
                   str(c): agreement(hf_tokens["eager"][c], p["tokens"])["greedy_agreement"]
                   for c, p in plain.items() if c in hf_tokens["eager"]})


def without_tokens(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "tokens"}


# -- 5. profiler ---------------------------------------------------------------------------------------
def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels of several streams may overlap)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_stats(events, cuda: bool, steps: int) -> dict:
    """Kernels per round and GPU-busy ms per round from torch.profiler events (on a CPU: ATen op events, and
    no busy time). None where the profiler recorded no CUDA activity (no CUPTI)."""
    if cuda:
        device_events = [e for e in events if e.device_type == DeviceType.CUDA]
        if not device_events:
            return {"kernels_per_round": None, "gpu_busy_ms_per_round": None,
                    "kernel_note": "torch.profiler recorded no CUDA activity (CUPTI unavailable?)"}
        kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
        busy_ms = busy_us([(e.time_range.start, e.time_range.end) for e in device_events]) / 1000 / steps
    else:
        kernels = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        busy_ms = None
    return {"kernels_per_round": len(kernels) / steps, "gpu_busy_ms_per_round": busy_ms,
            "kernel_note": "CUDA kernels" if cuda else "ATen ops among the profiler's CPU events (nested ones too)",
            "top_kernels_per_round": {n: c / steps for n, c in Counter(e.name for e in kernels).most_common(10)}}


def profile_round(check: Check, engine: Engine, steps: int, before_step: Callable[[], None] | None = None) -> dict:
    """Per round: wall ms (median of `steps` unprofiled steps), then kernels and the GPU-busy share over
    `steps` steps under torch.profiler; `before_step` (untimed) runs before each step."""
    from torch.profiler import ProfilerActivity, profile

    prepare = before_step or (lambda: None)
    walls = []
    for _ in range(steps):
        prepare()
        check.sync()
        start = time.perf_counter()
        engine.step()
        check.sync()
        walls.append((time.perf_counter() - start) * 1000)
    round_ms = statistics.median(walls)
    cuda = check.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            prepare()
            engine.step()
        check.sync()
    stats = kernel_stats(prof.events(), cuda, steps)
    busy = stats["gpu_busy_ms_per_round"]
    return {"round_ms": round_ms, **stats, "gpu_busy_fraction": None if busy is None else busy / round_ms}


def count_ops(engine: Engine, steps: int) -> dict:
    """ATen operations per round over `steps` steps, counted by `OpCounter`."""
    with OpCounter() as counter:
        for _ in range(steps):
            engine.step()
    return {"aten_ops_per_round": sum(counter.ops.values()) / steps,
            "top_aten_ops_per_round": {n: c / steps for n, c in counter.ops.most_common(10)}}


def mixed_round(check: Check, steps: int) -> dict:
    """`profile_round` of a mixed step (issue 17 item 4): `plan.mixed` = (R, N), R greedy requests decoding
    beside a new prompt of N tokens prefilled whole — above every capture bucket, so the step runs ragged and
    eagerly. A fresh prompt arrives before every step (each then decodes too: R grows by one per step)."""
    plan, runner = check.plan, check.runner(check.fast_dtype)
    decoding, prompt_tokens = plan.mixed
    max_new = 2 * steps + 4
    engine = make_engine(runner, None, decoding + 2 * steps, max(prompt_tokens, plan.prompt_len) + max_new)
    vocab = runner.config.vocab_size
    try:
        for i, prompt in enumerate(random_prompts(vocab, [plan.prompt_len] * decoding, seed=5)):
            engine.add_request(("decoding", i), prompt, sampling=GREEDY, max_new_tokens=max_new)
        while engine.last_step.get("decoding", 0) < decoding:
            engine.step()
        arrivals = iter(random_prompts(vocab, [prompt_tokens] * 2 * steps, seed=6))

        def arrive() -> None:
            engine.add_request(("prompt", engine.steps), next(arrivals), sampling=GREEDY, max_new_tokens=max_new)

        measured = profile_round(check, engine, steps, before_step=arrive)
        if engine.last_step["prefill_tokens"] != prompt_tokens:
            raise RuntimeError(f"the last mixed step prefilled {engine.last_step['prefill_tokens']} tokens, "
                               f"not one whole prompt of {prompt_tokens}")
    finally:
        engine.close()
    return {"decoding_requests": f"{decoding} to {decoding + 2 * steps - 1}", "prompt_tokens": prompt_tokens,
            **measured}


def section_profiler(check: Check, out: dict) -> None:
    steps = check.plan.counted_steps
    out.update(requests=1, round="one engine step of one greedy request", steps=steps, kernels_per_round={},
               gpu_busy_fraction={}, aten_ops_per_round={})
    for kind, drafter in (("plain", None), ("dspark", check.drafter(check.fast_dtype))):
        engine = steady_engine(check, drafter, [(GREEDY, None)])
        try:
            out[kind] = profile_round(check, engine, steps)
            out["kernels_per_round"][kind] = out[kind]["kernels_per_round"]
            out["gpu_busy_fraction"][kind] = out[kind]["gpu_busy_fraction"]
            out[kind].update(count_ops(engine, steps))
            out["aten_ops_per_round"][kind] = out[kind]["aten_ops_per_round"]
            check_still_running(engine, 1)
        finally:
            engine.close()
        check.say(f"profiler: {kind} {out[kind]['kernels_per_round']} kernels, "
                  f"{out[kind]['aten_ops_per_round']:.0f} ATen ops per round, {out[kind]['round_ms']:.2f} ms")
    out["mixed"] = mixed_round(check, steps)
    out["kernels_per_round"]["mixed"] = out["mixed"]["kernels_per_round"]
    out["gpu_busy_fraction"]["mixed"] = out["mixed"]["gpu_busy_fraction"]
    check.say(f"profiler: mixed step {out['mixed']['kernels_per_round']} kernels, {out['mixed']['round_ms']:.2f} ms, "
              f"GPU busy {out['mixed']['gpu_busy_fraction']}")


# -- 6. profile ----------------------------------------------------------------------------------------
def run_dspark(check: Check, argv: list[str]) -> None:
    """`dspark ARGV` in this process, its output relayed to stderr; RuntimeError with its error line."""
    check.say("dspark " + " ".join(argv))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            status = dspark_main(argv)
    finally:
        sys.stderr.write(captured.getvalue())
    if status != 0:
        lines = captured.getvalue().strip().splitlines()
        raise RuntimeError(f"dspark {argv[0]} exited with {status}: {lines[-1] if lines else 'no message'}")


def section_profile(check: Check, out: dict) -> None:
    check.release()  # the profile loads its own copies of the models
    folders = check.folders()
    report = Path(check.args.out)
    profile_file = report.with_name(f"{report.stem}_sps_profile.json")
    sglang_dir = report.with_name(f"{report.stem}_sglang")
    start = time.perf_counter()
    with mock.patch.dict(os.environ, {"DSPARK_HOME": str(check.work / "dspark-home")}):  # no cache of a temp model
        run_dspark(check, ["profile", "--target", str(folders.target), "--drafter", str(folders.drafter),
                           "--device", str(check.device), "--dtype", "bfloat16", *check.plan.profile_args,
                           "--refresh", "--quiet", "--threads", str(torch.get_num_threads()),
                           "--out", str(profile_file)])
    profile = json.loads(profile_file.read_text())
    out.update(profile_args=list(check.plan.profile_args), profile_s=time.perf_counter() - start,
               profile_path=str(profile_file), verify_ms_1x1=profile["verify_ms"].get("1x1"),
               draft_ms_1=(profile.get("draft_ms") or {}).get("1"))
    run_dspark(check, ["export", "sglang", "--out", str(sglang_dir), "--profile", str(profile_file)])
    table = json.loads((sglang_dir / "sps_table.json").read_text())
    pairs = list(zip(table["sample_batch_tokens"], table["sample_steps_per_sec"]))
    picks = sorted({0, len(pairs) // 4, len(pairs) // 2, len(pairs) - 1})
    out.update(sps_table_path=str(sglang_dir / "sps_table.json"), sps_table_entries=len(pairs),
               sps_table_samples=[{"batch_tokens": pairs[i][0], "steps_per_sec": pairs[i][1]} for i in picks])


def section_compiled(check: Check, out: dict) -> None:
    """`--compile` (the dense layer parts of the target and the DSpark drafter through torch.compile): a second
    target and drafter, compiled, at the first concurrency, plain and speculative; the first run compiles
    (`compile_s`), the second is timed. Its greedy tokens must equal those of the eager engine."""
    plan = check.plan
    c = plan.concurrency[0]
    runner = TargetRunner.from_pretrained(check.folders().target, device=check.device, dtype=check.fast_dtype,
                                          compile=True)
    prompts = random_prompts(runner.config.vocab_size, [plan.prompt_len] * c, seed=2)

    def point(target: TargetRunner, drafter, new_tokens: int) -> tuple[dict, list]:
        engine = make_engine(target, drafter, c, plan.prompt_len + plan.new_tokens)
        try:
            return run_point(engine, prompts, sampling=GREEDY, max_new_tokens=new_tokens, num_requests=c, concurrency=c)
        finally:
            engine.close()

    drafter = load_dspark_drafter(check.folders().drafter, device=check.device, dtype=check.fast_dtype)
    compile_drafter(drafter)
    start = time.perf_counter()
    point(runner, drafter, WARMUP_TOKENS)
    out.update(compile_s=time.perf_counter() - start, concurrency=c)
    for label, used, eager_used in (("plain", None, None), ("speculative", drafter, check.drafter(check.fast_dtype))):
        compiled, tokens = point(runner, used, plan.new_tokens)
        eager, eager_tokens = point(check.runner(check.fast_dtype), eager_used, plan.new_tokens)
        out[f"{label}_tok_s"] = compiled["throughput_tok_s"]
        out[f"{label}_eager_tok_s"] = eager["throughput_tok_s"]
        out[f"{label}_greedy_agreement"] = agreement(eager_tokens, tokens)["greedy_agreement"]
        check.say(f"compiled: {label} {compiled['throughput_tok_s']:.1f} tok/s (eager {eager['throughput_tok_s']:.1f})")


def compare_paths(check: Check, out: dict, paths: dict, section: str, concurrencies) -> None:
    """Two decoding paths side by side, plain and speculative, at `concurrencies`: paths = {name:
    (target, drafter)}, the first measured against the second. Fills {label}_tok_s (the first path),
    {label}_{second}_tok_s, {label}_greedy_agreement per concurrency, and first_run_s (the first path's warm-up
    run: captures and compilations)."""
    plan = check.plan
    (first, _), (second, _) = paths.items()
    target = paths[first][0]
    out["first_run_s"] = {}
    for c in concurrencies:
        prompts = random_prompts(target.config.vocab_size, [plan.prompt_len] * c, seed=3)
        for label in ("plain", "speculative"):
            if check.out_of_time():
                out.setdefault("skipped", []).append(f"{label} at {c}")
                continue
            measured = {}
            for mode, (runner, drafter) in paths.items():
                for new_tokens in (WARMUP_TOKENS, plan.new_tokens):
                    engine = make_engine(runner, drafter if label == "speculative" else None, c,
                                         plan.prompt_len + plan.new_tokens)
                    start = time.perf_counter()
                    try:
                        measured[mode] = run_point(engine, prompts, sampling=GREEDY, max_new_tokens=new_tokens,
                                                   num_requests=c, concurrency=c)
                    finally:
                        engine.close()
                    if mode == first and new_tokens == WARMUP_TOKENS:
                        out["first_run_s"].setdefault(label, time.perf_counter() - start)
            (on, on_tokens), (off, off_tokens) = measured[first], measured[second]
            out.setdefault(f"{label}_tok_s", {})[c] = on["throughput_tok_s"]
            out.setdefault(f"{label}_{second}_tok_s", {})[c] = off["throughput_tok_s"]
            out.setdefault(f"{label}_greedy_agreement", {})[c] = agreement(off_tokens, on_tokens)["greedy_agreement"]
            check.say(f"{section}: {label} at {c}: {first} {on['throughput_tok_s']:.1f} tok/s, "
                      f"{second} {off['throughput_tok_s']:.1f}")
    c = plan.concurrency[0]
    if c in out.get("plain_tok_s", {}):
        out["speedup_plain_at_1"] = out["plain_tok_s"][c] / out[f"plain_{second}_tok_s"][c]


def section_graphs(check: Check, out: dict) -> None:
    """The static-shape step and the drafter's round replayed from captured graphs (`dspark.models.static_step`,
    `dspark.models.drafters.static_block`; on by default on CUDA, so every section above ran with them) against
    `--enforce-eager` (`compare_paths`), with the default attention kernel both ways: tokens/s, greedy agreement,
    the captures made and the seconds of the first run (which captures). On the CPU (`--smoke`) the graphs are
    `HostGraph`s, so the path runs and agrees but gains nothing."""
    fast, folders = check.fast_dtype, check.folders()
    graphed = check.runner(fast)
    if graphed.static is None:  # the CPU: graphs are off by default there
        graphed = TargetRunner.from_pretrained(folders.target, device=check.device, dtype=fast, graphs=True)
    eager = TargetRunner.from_pretrained(folders.target, device=check.device, dtype=fast, graphs=False)
    drafters = {mode: load_dspark_drafter(folders.drafter, device=check.device, dtype=fast) for mode in ("graphs", "eager")}
    for mode, drafter in drafters.items():
        drafter.use_graphs(mode == "graphs")
    compare_paths(check, out, {"graphs": (graphed, drafters["graphs"]), "eager": (eager, drafters["eager"])}, "graphs",
                  check.plan.concurrency[:2])
    static, drafter_static = graphed.static, drafters["graphs"].static
    out.update(captures=len(static.captures), replays=static.replays, capture_error=static.graphs.error,
               drafter_captures=len(drafter_static.captures), drafter_replays=drafter_static.replays,
               drafter_capture_error=drafter_static.graphs.error)


def section_attention(check: Check, out: dict) -> None:
    """The paged FlexAttention kernel (`dspark.models.flex_paged`, `--attention-backend flex`) against SDPA over
    gathered keys (`--attention-backend sdpa`, what `auto` runs and every section above ran), both replayed from
    captured graphs (`compare_paths`): tokens/s, greedy agreement, the first run's seconds (which compile the
    kernel once per bucket shape) and the kernel's error if it failed and fell back to SDPA. On the CPU
    (`--smoke`) it runs Inductor's C++ FlexAttention, at the first concurrency only (each new shape compiles)."""
    fast, folders = check.fast_dtype, check.folders()
    paths = {}
    for attention in ("flex", "sdpa"):
        target = TargetRunner.from_pretrained(folders.target, device=check.device, dtype=fast, graphs=True)
        drafter = load_dspark_drafter(folders.drafter, device=check.device, dtype=fast)
        target.use_graphs(True, attention=attention)
        drafter.use_graphs(True, attention=attention)
        paths[attention] = (target, drafter)
    compare_paths(check, out, paths, "attention", check.plan.concurrency[: 1 if check.args.smoke else 2])
    target, drafter = paths["flex"]
    out.update(kernel_error=target.static.kernel_error, drafter_kernel_error=drafter.static.kernel_error,
               captures=len(target.static.captures), capture_error=target.static.graphs.error)


SECTIONS: dict[str, Callable[[Check, dict], None]] = {  # each fills its dict as it goes
    "build": section_build, "greedy": section_greedy, "host_syncs": section_host_syncs,
    "throughput": section_throughput, "profiler": section_profiler, "profile": section_profile,
    "compiled": section_compiled, "graphs": section_graphs, "attention": section_attention,
}


# -- the run -------------------------------------------------------------------------------------------
def run_section(check: Check, name: str) -> dict:
    """One section's record: status, seconds and the fields it filled (on failure: those it filled before,
    the error and its traceback)."""
    if check.out_of_time():
        check.say(f"{name}: skipped (time budget of {check.args.time_budget_s:g} s spent)")
        return {"status": "skipped", "seconds": 0.0, "error": f"time budget of {check.args.time_budget_s:g} s spent"}
    check.say(f"{name}: start")
    start = time.perf_counter()
    fields: dict = {}
    try:
        SECTIONS[name](check, fields)
        status = {"status": "ok"}
        check.say(f"{name}: ok in {time.perf_counter() - start:.1f} s")
    except Exception as exc:
        trace = traceback.format_exc()
        error = f"{type(exc).__name__}: {one_line(exc)}"
        check.say(f"{name}: FAILED after {time.perf_counter() - start:.1f} s: {error}\n{trace}")
        status = {"status": "failed", "error": error, "traceback": trace[-4000:]}
        check.release()  # the next section starts from freshly loaded models, whatever state this one left
    free_memory()
    return {**status, "seconds": time.perf_counter() - start, **fields}


def environment(device: torch.device) -> dict:
    cuda = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cuda = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": props.total_memory / 2**30, "cuda_version": torch.version.cuda}
    return {"device": str(device), "torch_version": torch.__version__, "cuda": cuda}


def write_report(path: Path, report: dict) -> None:
    write_text_atomically(path, json.dumps(report, indent=2, default=str) + "\n")


def summary_table(report: dict) -> str:
    lines = ["| section | status | seconds | error |", "|---|---|---:|---|"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {s.get('error', '')} |")
    lines.append("")
    lines += [f"{key}: {json.dumps(report[key], default=str)}" for key in HEADLINE]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")
        out = check_output_file(args.out, "--out").resolve()
    except DSparkError as exc:
        print(f"gpu_check.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    args.out = str(out)
    plan = SMOKE if args.smoke else FULL
    report = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else list(argv),
              **environment(device), "smoke": args.smoke,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "elapsed_s": 0.0,
              "time_budget_s": args.time_budget_s, "sections": {}, **dict.fromkeys(HEADLINE)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(args, plan, device, Path(tmp))
        check.say(f"gpu_check on {device} ({'smoke' if args.smoke else 'full'}): {', '.join(args.sections)}")
        for name in args.sections:
            report["sections"][name] = {"status": "running", "seconds": 0.0}  # what a killed run leaves
            write_report(out, report)
            report["sections"][name] = run_section(check, name)
            for key, (section, field) in HEADLINE.items():
                if field in report["sections"].get(section, {}):
                    report[key] = report["sections"][section][field]
            report["elapsed_s"] = check.elapsed()
            write_report(out, report)
        check.release()
    print(summary_table(report))
    check.say(f"wrote {out}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
