#!/usr/bin/env python
"""Plain (non-speculative) greedy decoding: dspark's `generate` vs transformers' `generate`.

Both load the *same* randomly initialised model folder (written once with
`dspark.models.random_init.build_random_model`) and decode the same random prompts greedily for exactly
`--new-tokens` tokens (no stop token, so neither can stop early). For each batch size the script reports
the median wall time over `--repeats` runs (after `--warmup` untimed runs; the two libraries alternate
inside each repeat), tokens/s = batch × new_tokens / time, and the ratio dspark / transformers
(> 1 means dspark is faster). The greedy outputs are compared token for token: with identical fp32 weights
they should agree; if they do not, the JSON records how many tokens matched before the first divergence.

Times are whole `generate` calls, prefill included. On a CPU only the ratio measured side by side in one
run is meaningful; absolute tokens/s depend on the machine and its load.

--device cuda (UNTESTED: written without access to a GPU) additionally times transformers with
`cache_implementation="static"`, measures device memory bandwidth with a large device-to-device copy and
reports the memory-bandwidth limit tok/s = batch × bandwidth / weight bytes (KV-cache reads ignored).
dspark has no CUDA-graphs decode path yet, so on a GPU its per-step Python/launch overhead is fully exposed.

Examples:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_plain_decoding.py                   # tiny, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_plain_decoding.py --config small --new-tokens 64
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_plain_decoding.py --set num_hidden_layers=2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from dspark.engine.generation import generate  # noqa: E402
from dspark.models.random_init import PRESETS, build_random_model  # noqa: E402
from dspark.devices import DTYPES  # noqa: E402
from dspark.models.target_runner import TargetRunner  # noqa: E402

# Named size configurations: a preset plus config.json overrides.
CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny": ("tiny-qwen3", {}),  # hidden 128, 4 layers, vocab 320
    "small": (
        "tiny-qwen3",
        dict(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            intermediate_size=1536, vocab_size=4096,
        ),
    ),
    "qwen3-0.6b-shape": ("qwen3-0.6b-shape", {}),  # for GPU runs
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="named model size (default tiny)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="random_init preset to start from (default: the one --config names)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config.json override, e.g. --set num_hidden_layers=2 (repeatable; JSON values)")
    p.add_argument("--init-std", type=float, default=0.1,
                   help="weight init std (default 0.1: at 0.02 random models emit one repeated token, which "
                        "makes the agreement check vacuous)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated (default 1,4)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--hf-static", choices=["auto", "on", "off"], default="auto",
                   help='also time transformers with cache_implementation="static" (auto: only on CUDA)')
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/plain_decoding_<device>_<config>.json)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or args.prompt_len < 1 or not args.batch_sizes:
        p.error("need repeats ≥ 1, warmup ≥ 0, new-tokens ≥ 1, prompt-len ≥ 1 and at least one batch size")
    return args


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# -- environment ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # Other processes compete for the CPU: record the 1/5/15-minute load averages next to the results.
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a device-to-device copy (bytes read + bytes written). CUDA only."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: dst.copy_(src), device)
        times.append(seconds)
    return 2 * nbytes / statistics.median(times)


# -- the two decoders ----------------------------------------------------------------------------------
def load_hf(folder: Path, device: torch.device, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(folder), **{dtype_kw: dtype})
    return model.to(device).eval()


def hf_generation_config(new_tokens: int, **extra):
    from transformers import GenerationConfig

    # eos_token_id=None and min_new_tokens=N: nothing can end generation before N tokens.
    return GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
        eos_token_id=None, pad_token_id=0, bos_token_id=None, **extra,
    )


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Per row: tokens matched before the first divergence; summarised over rows."""
    prefixes = []
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    total = sum(len(a) for a in reference)
    return {
        "greedy_agreement": sum(prefixes) / total if total else 1.0,  # fraction of tokens before divergence
        "identical_rows": sum(n == len(a) == len(b) for n, a, b in zip(prefixes, reference, other)),
        "rows": len(reference),
        "matched_prefix_per_row": prefixes,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if device.type == "cpu" else "bfloat16")
    dtype = DTYPES[dtype_name]
    preset, named = CONFIGS[args.config]
    preset = args.preset or preset
    overrides = dict(named, **parse_overrides(args.overrides))
    N = args.new_tokens
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="dspark-bench-") as tmp:
        folder = build_random_model(
            Path(tmp) / "model", preset, seed=args.seed, init_std=args.init_std, with_tokenizer=False, **overrides
        )
        model_config = json.loads((folder / "config.json").read_text())
        runner = TargetRunner.from_pretrained(folder, device=device, dtype=dtype)
        hf = load_hf(folder, device, dtype)
    vocab = runner.config.vocab_size
    if args.prompt_len + N > runner.max_context:
        raise SystemExit(f"prompt-len + new-tokens = {args.prompt_len + N} exceeds the context {runner.max_context}")
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    num_params = sum(p.numel() for p in runner.model.parameters())
    bandwidth = measure_bandwidth(device) if device.type == "cuda" else None

    gen_cfg = hf_generation_config(N)
    with_static = args.hf_static == "on" or (args.hf_static == "auto" and device.type == "cuda")
    static_cfg = hf_generation_config(N, cache_implementation="static") if with_static else None

    results = []
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(args.seed * 1000 + batch)
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=g)
        input_ids = prompts.to(device)
        attention_mask = torch.ones_like(input_ids)
        prompt_lists = prompts.tolist()

        def run_dspark():
            out = generate(runner, prompt_lists, max_new_tokens=N, stop_token_ids=(), seed=args.seed)
            assert out.num_generated == batch * N, out.num_generated
            return [s.token_ids for s in out.sequences]

        def run_hf(cfg=gen_cfg):
            with torch.inference_mode():
                out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg)
            assert out.shape == (batch, args.prompt_len + N), tuple(out.shape)
            return out[:, args.prompt_len:].tolist()

        contenders = {"dspark": run_dspark, "hf": run_hf}
        if static_cfg is not None:
            contenders["hf_static"] = lambda: run_hf(static_cfg)  # on CUDA: UNTESTED (no GPU when written)
        outputs = {}
        for name, fn in contenders.items():
            for _ in range(args.warmup):
                outputs[name] = fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):  # alternate so that drift in machine load hits both alike
            for name, fn in contenders.items():
                seconds, outputs[name] = timed(fn, device)
                times[name].append(seconds)

        row = {"batch": batch}
        for name in contenders:
            median = statistics.median(times[name])
            row[f"{name}_s"] = median
            row[f"{name}_tok_s"] = batch * N / median
            row[f"{name}_best_tok_s"] = batch * N / min(times[name])
            row[f"{name}_times_s"] = times[name]
        row["ratio"] = row["dspark_tok_s"] / row["hf_tok_s"]
        row["ratio_best"] = row["dspark_best_tok_s"] / row["hf_best_tok_s"]
        # Median of the per-repeat ratios (the two runs of a repeat are back to back): robust to load drift.
        row["ratio_paired_median"] = statistics.median(h / d for d, h in zip(times["dspark"], times["hf"]))
        if "hf_static" in contenders:
            row["ratio_vs_hf_static"] = row["dspark_tok_s"] / row["hf_static_tok_s"]
        row.update(agreement(outputs["hf"], outputs["dspark"]))
        if "hf_static" in contenders:
            row["hf_static_agreement"] = agreement(outputs["hf"], outputs["hf_static"])["greedy_agreement"]
        if bandwidth is not None:
            row["bandwidth_limit_tok_s"] = batch * bandwidth / weight_bytes
        results.append(row)
        print(
            f"batch {batch}: dspark {row['dspark_tok_s']:.1f} tok/s, transformers {row['hf_tok_s']:.1f} tok/s, "
            f"ratio {row['ratio']:.2f}, greedy agreement {row['greedy_agreement']:.3f}",
            file=sys.stderr,
        )

    machine = machine_info(device)
    machine["load_average_before"] = load_before
    report = {
        "benchmark": "plain_decoding",
        "machine": machine,
        "config": {
            "config": args.config,
            "preset": preset,
            "overrides": overrides,
            "model_config": model_config,
            "num_params": num_params,
            "weight_bytes": weight_bytes,
            "init_std": args.init_std,
            "device": str(device),
            "dtype": dtype_name,
            "batch_sizes": args.batch_sizes,
            "prompt_len": args.prompt_len,
            "new_tokens": N,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "timing": "median wall time of one whole generate call (prefill + decode); tok/s = batch*new_tokens/time",
            "ratio": "dspark_tok_s / hf_tok_s (> 1: dspark faster)",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "results": results,
    }
    if bandwidth is not None:
        report["config"]["bandwidth_bytes_per_s"] = bandwidth
        report["config"]["note_cuda"] = (
            "UNTESTED path. bandwidth from a 1 GiB device-to-device copy (read + write); "
            "bandwidth_limit_tok_s = batch * bandwidth / weight_bytes, KV-cache reads ignored. "
            "dspark has no CUDA-graphs decode path yet."
        )

    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"plain_decoding_{device.type}_{args.config}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\nwrote {out_path}", file=sys.stderr)
    return 0


def markdown_table(report: dict) -> str:
    c = report["config"]
    static = "hf_static_tok_s" in report["results"][0]
    bw = "bandwidth_limit_tok_s" in report["results"][0]
    head = ["batch", "dspark tok/s", "transformers tok/s", "ratio dspark/hf", "paired ratio", "greedy agreement"]
    head[3:3] = (["transformers static-cache tok/s"] if static else []) + (["bandwidth limit tok/s"] if bw else [])
    lines = [
        f"{c['config']} ({c['num_params'] / 1e6:.2f} M params, {c['dtype']}) on {c['device']} "
        f"({report['machine']['torch_threads']} torch threads), prompt {c['prompt_len']}, "
        f"{c['new_tokens']} new tokens, median of {c['repeats']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" for _ in head) + "|",
    ]
    for r in report["results"]:
        cells = [str(r["batch"]), f"{r['dspark_tok_s']:.1f}", f"{r['hf_tok_s']:.1f}"]
        if static:
            cells.append(f"{r['hf_static_tok_s']:.1f}")
        if bw:
            cells.append(f"{r['bandwidth_limit_tok_s']:.0f}")
        cells += [f"{r['ratio']:.2f}", f"{r['ratio_paired_median']:.2f}", f"{r['greedy_agreement']:.3f} ({r['identical_rows']}/{r['rows']} rows identical)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
