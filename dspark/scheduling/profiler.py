"""SPS profiling (docs/design.md §5.5): measure this machine's step-time tables, cache them, reuse them.

All times are milliseconds of one engine step. The profile is a JSON object in the format of the shared
GPU tables (`shared/data/profiles/*.json`, read by `dspark.scheduling.sps.SPSProfile`):

* ``verify_ms["RxL"]`` — one target verification step over R requests × L new tokens each (B = R·L):
  R sequences prefilled to `context` random token ids, then one timed `TargetRunner.forward` of L random
  tokens per sequence with logits for all B positions (and the drafter's feature layers, as a real
  verification step returns them), after which every sequence is truncated back to `context`.
* ``draft_ms["R"]`` — one drafter `propose()` for R requests with a full block (the drafter's
  `block_size`), each request's drafter context holding `context` positions (+1 per timed call)
  and receiving one new target-feature row per call. Present only when a drafter is profiled.
* ``verify_ms_total_tokens["B"]`` — the target step as a function of the total token count B alone.

Each entry is the median of `repeats` timed runs after `warmup` untimed ones (and, once before the
grid, `warmup` untimed runs of its largest and smallest step); on CUDA the device is synchronised
before starting and before stopping every timer. The raw medians are kept in
``verify_ms_measured`` / ``draft_ms_measured``; the tables above are forced monotone
(``"monotone_forced": true``):

1. for each R, running maximum of verify_ms(R, L) over ascending L;
2. then for each L, running maximum over ascending R — so the grid never decreases when R or L grows,
   i.e. it is non-decreasing in B = R·L along every row (fixed R) and every column (fixed L);
3. verify_ms_total_tokens(B) = the maximum of the forced grid over the cells with R·L = B (the costliest
   measured way to spend B tokens), then running maximum over ascending B;
4. draft_ms: running maximum over ascending R.

Metadata: "model" (`model_fingerprint` of the target folder), "drafter" (its identity, or null),
"drafter_name", "device" (CPU model string or CUDA device name), "device_type", "dtype" (fp32 | bf16 |
fp16 | fp64), "context", "gamma" (drafter block, null without drafter), "markov_rank" and "draft_layers"
(DSpark drafters), "repeats", "warmup", "threads", "torch", "date", "shape", "requests", "lengths".

Profiles are cached as JSON under $DSPARK_HOME/profiles/ (default ~/.cache/dspark) per (target identity,
drafter identity, device name, dtype, context, and on a CPU the thread count); `load_or_profile` reuses a cached profile that covers the
requested sizes (any cached one when no sizes are given), measuring only when there is none (or on
`refresh=True`). `check_profile_matches` rejects a profile measured for another model or device.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from dspark.devices import resolve_device, resolve_dtype
from dspark.errors import ConfigError
from dspark.files import check_output_file, write_text_atomically

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
PREFILL_TOKENS = 8192  # tokens per prefill forward (sequences are prefilled in chunks of this size)
CACHE_PAGE = 16  # KV-cache page size (tokens) of the profiled target runner

# Default sizes per device type (context in tokens).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": dict(context=256, requests=(1, 2, 4, 8), lengths=(1, 2, 3, 4, 6, 8), repeats=10),
    "cuda": dict(context=1024, requests=(1, 2, 4, 8, 16, 32, 64, 128, 256), lengths=(1, 2, 3, 4, 6, 8), repeats=20),
}

# Random-weight targets for `--random-shape`: a preset of `build_random_model` plus config overrides, and the
# DSpark drafter built for it (random weights, in memory) when no drafter is given.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-4b": dict(
        preset="qwen3-0.6b-shape",
        overrides=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=9728, vocab_size=151936),
        label="Qwen3-4B (H 2560, 36 layers, 32/8 heads, V 151936), random weights",
        drafter=dict(target_layer_ids=(1, 9, 17, 25, 33), num_draft_layers=5, block_size=7, markov_rank=256),
        gpu_only=True,
        memory_note="about 8 GB on disk, 16 GB of RAM in float32, and seconds to minutes per step on a CPU",
    ),
}


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------

def dspark_home() -> Path:
    """$DSPARK_HOME, or ~/.cache/dspark."""
    return Path(os.environ.get("DSPARK_HOME") or Path.home() / ".cache" / "dspark")


def device_name(device: str | torch.device) -> str:
    """The CPU model string (/proc/cpuinfo "model name") or the CUDA device name."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def dtype_name(dtype: str | torch.dtype | None, device: str | torch.device) -> str:
    """Short dtype name (fp32 | bf16 | fp16 | fp64) of the dtype the runner will use on `device`."""
    return DTYPE_NAMES[resolve_dtype(dtype, resolve_device(device))]


def parse_sizes(value: str | Sequence[int] | None, name: str) -> list[int] | None:
    """"1,2,4" (or a sequence) → sorted distinct positive ints; None stays None."""
    if value is None:
        return None
    items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise ConfigError(f"{name}: give at least one size")
    sizes = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {item!r} is not an integer") from None
        if isinstance(item, float) and item != n:
            raise ConfigError(f"{name}: {item!r} is not an integer")
        if n < 1:
            raise ConfigError(f"{name}: sizes must be ≥ 1, got {n}")
        sizes.append(n)
    return sorted(set(sizes))


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def _fmt(ms: float) -> float:
    return float(f"{ms:.6g}")


# -------------------------------------------------------------------------------------------------
# Monotone forcing
# -------------------------------------------------------------------------------------------------

def force_monotone(verify: Mapping[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Steps 1–2 of the module docstring: running max over ascending L per R, then over ascending R per L.

    Cells missing from a rectangular grid are skipped (each pass runs over the cells present)."""
    out = dict(verify)
    for r in sorted({r for r, _ in out}):
        best = -math.inf
        for length in sorted(length for rr, length in out if rr == r):
            best = max(best, out[(r, length)])
            out[(r, length)] = best
    for length in sorted({length for _, length in out}):
        best = -math.inf
        for r in sorted(r for r, ll in out if ll == length):
            best = max(best, out[(r, length)])
            out[(r, length)] = best
    return out


def by_total_tokens(verify: Mapping[tuple[int, int], float]) -> dict[int, float]:
    """Step 3: B → max over cells with R·L = B, then running max over ascending B."""
    worst: dict[int, float] = {}
    for (r, length), ms in verify.items():
        worst[r * length] = max(worst.get(r * length, -math.inf), ms)
    out, best = {}, -math.inf
    for b in sorted(worst):
        best = max(best, worst[b])
        out[b] = best
    return out


def running_max(table: Mapping[int, float]) -> dict[int, float]:
    """Step 4: running maximum over ascending keys."""
    out, best = {}, -math.inf
    for key in sorted(table):
        best = max(best, table[key])
        out[key] = best
    return out


# -------------------------------------------------------------------------------------------------
# Measurement
# -------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(step: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device,
               reset: Callable[[], Any] | None = None) -> float:
    """Median wall time (ms) of `repeats` calls of `step` after `warmup` untimed ones; `reset` runs
    untimed after every call."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
        if reset is not None:
            reset()
    return statistics.median(times)


def measure_profile(
    runner,
    drafter=None,
    *,
    context: int,
    requests: Sequence[int],
    lengths: Sequence[int],
    repeats: int,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure a loaded `TargetRunner` (and optional `Drafter`) → the timing part of a profile:
    verify_ms, verify_ms_total_tokens, draft_ms (forced monotone) and their raw *_measured medians."""
    context = _check_positive("--context", context)
    repeats = _check_positive("--repeats", repeats)
    requests, lengths = parse_sizes(requests, "--requests"), parse_sizes(lengths, "--lengths")
    if warmup < 0:
        raise ConfigError(f"warmup must be ≥ 0, got {warmup}")
    limit = runner.max_context
    if context + max(lengths) > limit:
        raise ConfigError(f"--context {context} + the longest verification (--lengths {max(lengths)}) exceeds the "
                          f"model's context of {limit} tokens")
    block_size = 0
    if drafter is not None:
        drafter.check_target(runner.config)
        block_size = drafter.block_size
        need = context + warmup + repeats + block_size + 1
        if need > limit:
            raise ConfigError(f"--context {context} leaves no room for the drafter's timed steps: context + warm-up + "
                              f"repeats + block + 1 = {need} positions exceed the model's context of {limit}")
    device = runner.device
    layers = tuple(drafter.feature_layer_ids) if drafter is not None else ()
    say = progress or (lambda _msg: None)
    generator = torch.Generator().manual_seed(seed)
    vocab = runner.config.vocab_size

    def random_ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    max_r = max(requests)
    prompts = [random_ids(context) for _ in range(max_r)]
    seqs: list[int] = []
    try:
        seqs = [runner.new_sequence() for _ in range(max_r)]
        say(f"prefill {max_r} × {context} tokens")
        first = runner.forward(seqs[:1], prompts[:1], all_logits=False, feature_layer_ids=layers)
        features = first.features  # [context, len(layers)·H] or None: the drafter's context rows
        chunk = max(1, PREFILL_TOKENS // context)
        for i in range(1, max_r, chunk):
            runner.forward(seqs[i:i + chunk], prompts[i:i + chunk], all_logits=False)
        # Global warm-up (allocator, lazy kernel selection): the largest and the smallest step, untimed.
        for r, length in ((max_r, max(lengths)), (requests[0], lengths[0])):
            for _ in range(warmup):
                runner.forward(seqs[:r], [random_ids(length) for _ in range(r)], all_logits=True,
                               feature_layer_ids=layers)
                for s in seqs[:r]:
                    runner.truncate(s, context)
        measured: dict[tuple[int, int], float] = {}
        for r in requests:
            for length in lengths:
                tokens = [random_ids(length) for _ in range(r)]
                active = seqs[:r]

                def step(active=active, tokens=tokens):
                    runner.forward(active, tokens, all_logits=True, feature_layer_ids=layers)

                def reset(active=active):
                    for s in active:
                        runner.truncate(s, context)

                measured[(r, length)] = _median_ms(step, repeats=repeats, warmup=warmup, device=device, reset=reset)
                say(f"verify R={r} L={length}: {measured[(r, length)]:.3f} ms")
    finally:
        for s in seqs:
            runner.free_sequence(s)
    draft_measured: dict[int, float] = {}
    if drafter is not None:
        for r in requests:
            draft_measured[r] = _draft_step_ms(drafter, r, prompts, features, random_ids, context=context,
                                               repeats=repeats, warmup=warmup, device=device,
                                               generator=torch.Generator(device=device).manual_seed(seed))
            say(f"draft R={r}: {draft_measured[r]:.3f} ms")
    forced = force_monotone(measured)
    result: dict[str, Any] = {
        "verify_ms": {f"{r}x{length}": _fmt(ms) for (r, length), ms in sorted(forced.items())},
        "verify_ms_total_tokens": {str(b): _fmt(ms) for b, ms in by_total_tokens(forced).items()},
        "verify_ms_measured": {f"{r}x{length}": _fmt(ms) for (r, length), ms in sorted(measured.items())},
    }
    if draft_measured:
        result["draft_ms"] = {str(r): _fmt(ms) for r, ms in running_max(draft_measured).items()}
        result["draft_ms_measured"] = {str(r): _fmt(ms) for r, ms in sorted(draft_measured.items())}
    result.update(gamma=block_size or None, requests=requests, lengths=lengths, context=context, repeats=repeats,
                  warmup=warmup, monotone_forced=True)
    return result


def _draft_step_ms(drafter, r: int, prompts: list[list[int]], features: torch.Tensor | None, random_ids, *,
                   context: int, repeats: int, warmup: int, device: torch.device, generator) -> float:
    """propose() time (ms) for `r` fresh requests whose drafter context was first filled with `context`
    positions (untimed); each timed call appends one token and one feature row per request."""
    from dspark.decoding.sampling import SamplingParams
    from dspark.models.drafters.base import DraftInput

    greedy, block_size = SamplingParams(), drafter.block_size
    ids = [1_000_000 + i for i in range(r)]  # drafter-side handles, released below
    histories = [list(prompts[i % len(prompts)]) + random_ids(1) for i in range(r)]
    extra = [random_ids(warmup + repeats) for _ in range(r)]
    last = features[-1:] if features is not None else None
    try:
        chunk = max(1, PREFILL_TOKENS // context)
        for i in range(0, r, chunk):
            drafter.propose([DraftInput(ids[j], histories[j], features, block_size, greedy)
                             for j in range(i, min(r, i + chunk))], generator)

        def step():
            for j, history in enumerate(histories):
                history.append(extra[j][len(history) - context - 1])
            drafter.propose([DraftInput(ids[j], histories[j], last, block_size, greedy) for j in range(r)], generator)

        return _median_ms(step, repeats=repeats, warmup=warmup, device=device)
    finally:
        for handle in ids:
            drafter.release(handle)


# -------------------------------------------------------------------------------------------------
# Identities, cache, load_or_profile
# -------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What to profile: resolved before anything heavy is loaded (enough to look up the cache)."""

    target: Path
    target_identity: dict
    drafter_spec: str | None  # folder, "ngram", "random:<shape>" or None
    drafter_identity: dict | None
    shape: str
    random_shape: str | None


def _drafter_identity(spec: str | None) -> dict | None:
    from dspark.models.fingerprint import model_fingerprint

    if spec is None:
        return None
    if spec == "ngram":
        return {"name": "ngram"}
    if not Path(spec).is_dir():
        raise ConfigError(f"--drafter {spec!r}: neither a built-in drafter name nor an existing folder")
    return model_fingerprint(spec)


def _random_drafter_config(shape: str, target_hf: dict):
    from dspark.models.drafters.dspark import dspark_config_for_target

    d = RANDOM_SHAPES[shape]["drafter"]
    return dspark_config_for_target(
        target_hf, target_layer_ids=tuple(d["target_layer_ids"]), mask_token_id=target_hf["vocab_size"] - 1,
        num_draft_layers=d["num_draft_layers"], block_size=d["block_size"], markov_rank=d["markov_rank"],
    )


def _shape_string(hf: dict) -> str:
    arch = (hf.get("architectures") or [hf.get("model_type", "model")])[0]
    return (f"{arch} (H {hf.get('hidden_size')}, {hf.get('num_hidden_layers')} layers, "
            f"{hf.get('num_attention_heads')}/{hf.get('num_key_value_heads')} heads, V {hf.get('vocab_size')})")


def random_shape_target(shape: str, home: Path | None = None) -> Path:
    """The random-weight target folder of RANDOM_SHAPES[shape] (bf16 on disk), built once under
    $DSPARK_HOME/random-models/."""
    from dspark.models.random_init import build_random_model

    if shape not in RANDOM_SHAPES:
        raise ConfigError(f"--random-shape {shape!r}: choose one of {', '.join(RANDOM_SHAPES)}")
    spec = RANDOM_SHAPES[shape]
    folder = (home or dspark_home()) / "random-models" / f"{shape}-shape"
    if not (folder / "config.json").is_file():
        build_random_model(folder, spec["preset"], seed=0, with_tokenizer=False, dtype=torch.bfloat16,
                           **spec["overrides"])
    return folder


def _plan(target: str | None, drafter: str | None, random_shape: str | None, *, device: torch.device,
          force: bool, home: Path) -> _Plan:
    from dspark.models.config import read_config_json
    from dspark.models.zoo import resolve_drafter, resolve_target
    from dspark.models.fingerprint import model_fingerprint

    if random_shape is not None:
        if target is not None:
            raise ConfigError("--random-shape builds its own target; drop --target")
        if random_shape not in RANDOM_SHAPES:
            raise ConfigError(f"--random-shape {random_shape!r}: choose one of {', '.join(RANDOM_SHAPES)}")
        spec = RANDOM_SHAPES[random_shape]
        if spec.get("gpu_only") and device.type != "cuda" and not force:
            raise ConfigError(f"--random-shape {random_shape} is meant for a GPU: on this CPU it needs "
                              f"{spec['memory_note']}; pass --force to profile it anyway")
        folder = random_shape_target(random_shape, home)
        hf = read_config_json(folder)
        if drafter is None:
            config = _random_drafter_config(random_shape, hf)
            blob = json.dumps(config.to_hf_dict(), sort_keys=True).encode()
            d_id = {"name": f"random-dspark-{random_shape}", "config_sha256": hashlib.sha256(blob).hexdigest(),
                    "weights_sha256": "random init, seed 0"}
            return _Plan(folder, model_fingerprint(folder), f"random:{random_shape}", d_id, spec["label"], random_shape)
    else:
        folder = Path(resolve_target(target))
        hf = read_config_json(folder)
    if drafter is None:
        drafter = None if (target is not None or random_shape is not None) else resolve_drafter(None)
    elif drafter.lower() == "none":
        drafter = None
    else:
        drafter = resolve_drafter(drafter)
    shape = RANDOM_SHAPES[random_shape]["label"] if random_shape else _shape_string(hf)
    return _Plan(folder, model_fingerprint(folder), drafter, _drafter_identity(drafter), shape, random_shape)


def cache_path(target_identity: Mapping[str, str], drafter_identity: Mapping[str, str] | None, device: str,
               dtype: str, context: int, home: Path | None = None, threads: int | None = None) -> Path:
    """$DSPARK_HOME/profiles/<target name>-<dtype>-ctx<context>-<hash>.json; the hash covers the target and
    drafter identities, the device name, the dtype, the context and, on a CPU, the intra-op thread count (a
    step's time depends on it)."""
    key = {"target": {k: target_identity.get(k) for k in ("config_sha256", "weights_sha256")},
           "drafter": dict(drafter_identity) if drafter_identity else None,
           "device": device, "dtype": dtype, "context": context}
    if threads is not None:
        key["threads"] = threads
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(target_identity.get("name", "model")))[:40]
    return (home or dspark_home()) / "profiles" / f"{name}-{dtype}-ctx{context}-{digest}.json"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=1) + "\n")


def _read_cached(path: Path, progress: Callable[[str], None] | None) -> dict | None:
    """The cached profile at `path` if it exists and is valid; an invalid one (torn, edited, written by an
    older version) is reported by its path through `progress` and measured again."""
    from dspark.scheduling.sps import ProfileError, SPSProfile

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        SPSProfile.from_dict(data, source=str(path))
    except (OSError, ValueError, ProfileError) as exc:
        if progress is not None:
            progress(f"cached profile {path} is invalid ({exc}); measuring again")
        return None
    return data if isinstance(data, dict) and "verify_ms" in data else None


def _covers(profile: Mapping[str, Any], requests: list[int] | None, lengths: list[int] | None,
            with_drafter: bool) -> bool:
    have_r, have_l = set(profile.get("requests") or ()), set(profile.get("lengths") or ())
    if requests is not None and not set(requests) <= have_r:
        return False
    if lengths is not None and not set(lengths) <= have_l:
        return False
    return "draft_ms" in profile or not with_drafter


def profile_with_cache(
    target: str | None = None,
    drafter: str | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    context: int | None = None,
    requests: str | Sequence[int] | None = None,
    lengths: str | Sequence[int] | None = None,
    repeats: int | None = None,
    refresh: bool = False,
    random_shape: str | None = None,
    force: bool = False,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Path, bool]:
    """`load_or_profile`, also returning (profile, cache file, whether it was measured now)."""
    dev = resolve_device(device, "--device")
    if out is not None:
        check_output_file(out, "--out")
    defaults = DEFAULTS[dev.type]
    if context is not None:
        _check_positive("--context", context)
    if repeats is not None:
        _check_positive("--repeats", repeats)
    requests, lengths = parse_sizes(requests, "--requests"), parse_sizes(lengths, "--lengths")
    dtype_short = dtype_name(dtype, dev)
    home = dspark_home()
    plan = _plan(target, drafter, random_shape, device=dev, force=force, home=home)
    if context is None:  # the device's default, at most half the model's context (room for the timed steps)
        from dspark.models.config import read_config_json

        limit = read_config_json(plan.target).get("max_position_embeddings")
        context = defaults["context"]
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 1:  # else the loader names the problem
            context = min(context, limit // 2)
    name = device_name(dev)
    threads = torch.get_num_threads() if dev.type == "cpu" else None
    path = cache_path(plan.target_identity, plan.drafter_identity, name, dtype_short, context, home, threads)
    cached = None if refresh else _read_cached(path, progress)
    measured_now = cached is None or not _covers(cached, requests, lengths, plan.drafter_spec is not None)
    if measured_now:
        profile = _measure_plan(plan, dev, dtype, dtype_short, name, context=context,
                                requests=requests or list(defaults["requests"]),
                                lengths=lengths or list(defaults["lengths"]),
                                repeats=repeats or defaults["repeats"], progress=progress)
        _write_json(path, profile)
    else:
        profile = cached
    if out is not None:
        _write_json(Path(out), profile)
    return profile, path, measured_now


def load_or_profile(target: str | None = None, drafter: str | None = None, **options: Any) -> dict[str, Any]:
    """This machine's profile of (target, drafter, device, dtype, context): the cached one under
    $DSPARK_HOME/profiles/ when it covers the requested sizes, else measured now and cached.

    target: folder, or None for the built-in target. drafter: folder, built-in name, "ngram", "none", or
    None (the built-in drafter with the built-in target; no drafter with an explicit target; a random
    DSpark drafter of the same shape with `random_shape`). Sizes default to DEFAULTS[device type]; the
    other options are those of `profile_with_cache`.
    Returns the profile dict (format: module docstring; `SPSProfile.from_dict` reads it)."""
    return profile_with_cache(target, drafter, **options)[0]


def _measure_plan(plan: _Plan, dev: torch.device, dtype, dtype_short: str, name: str, *, context: int,
                  requests: list[int], lengths: list[int], repeats: int, progress) -> dict[str, Any]:
    from dspark.models.drafters import load_drafter
    from dspark.models.target_runner import TargetRunner

    # Size the KV cache for the largest batch up front: its on-demand doubling could otherwise reserve
    # twice the memory the profile needs (tens of GB for a 4B-shaped model at 256 × 1024 tokens).
    per_seq = -(-(context + max(lengths)) // CACHE_PAGE) + 1
    runner = TargetRunner.from_pretrained(plan.target, device=dev, dtype=dtype, cache_page_size=CACHE_PAGE,
                                          max_cache_pages=max(requests) * per_seq)
    drafter_obj = None
    if plan.drafter_spec is not None and plan.drafter_spec.startswith("random:"):
        from dspark.models.drafters.dspark import DSparkDrafter, init_from_target

        config = _random_drafter_config(plan.random_shape, runner.hf_config)
        drafter_obj = DSparkDrafter(init_from_target(config, runner.model, seed=0))
    elif plan.drafter_spec is not None:
        drafter_obj = load_drafter(plan.drafter_spec, device=dev, dtype=dtype, target=runner.model)
    timing = measure_profile(runner, drafter_obj, context=context, requests=requests, lengths=lengths,
                             repeats=repeats, progress=progress)
    profile: dict[str, Any] = {"device": name, "shape": plan.shape, "context": context, "gamma": timing["gamma"]}
    model = getattr(drafter_obj, "model", None)
    draft_config = getattr(model, "config", None)
    if draft_config is not None and hasattr(draft_config, "markov_rank"):
        profile["markov_rank"] = draft_config.markov_rank
        profile["draft_layers"] = draft_config.layers.num_layers
    profile["dtype"] = dtype_short
    for key in ("verify_ms", "draft_ms", "verify_ms_total_tokens", "verify_ms_measured", "draft_ms_measured"):
        if key in timing:
            profile[key] = timing[key]
    profile.update(
        model=plan.target_identity, drafter=plan.drafter_identity,
        drafter_name=getattr(drafter_obj, "name", None), device_type=dev.type,
        requests=timing["requests"], lengths=timing["lengths"], repeats=repeats, warmup=timing["warmup"],
        threads=torch.get_num_threads(), torch=torch.__version__,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), monotone_forced=True,
    )
    return profile


# -------------------------------------------------------------------------------------------------
# Checking and printing
# -------------------------------------------------------------------------------------------------

def check_profile_matches(
    profile: Mapping[str, Any],
    target_identity: Mapping[str, str],
    device: str | torch.device,
    *,
    dtype: str | None = None,
    drafter_identity: Mapping[str, str] | None = None,
) -> None:
    """Raise ConfigError unless `profile` was measured for this target (config and weights hashes of
    `model_fingerprint`), on this device (a device spec such as "cuda:0", or a device name string), and,
    when given, with this dtype (short name) and drafter identity."""
    where = f"SPS profile (device {profile.get('device')!r}, shape {profile.get('shape')!r})"
    model = profile.get("model")
    if not isinstance(model, Mapping) or not model.get("weights_sha256"):
        raise ConfigError(f"{where} records no model identity, so it cannot be checked against target "
                          f"{target_identity.get('name')!r}; measure one with `dspark profile --target DIR`")
    for key in ("config_sha256", "weights_sha256"):
        if model.get(key) != target_identity.get(key):
            raise ConfigError(f"{where} was measured for model {model.get('name')!r}, not for target "
                              f"{target_identity.get('name')!r} ({key} differs); run `dspark profile` for it")
    if isinstance(device, torch.device) or re.fullmatch(r"(cpu|cuda)(:\d+)?", str(device)):
        device = device_name(device)
    if profile.get("device") != device:
        raise ConfigError(f"{where} was measured on {profile.get('device')!r}, not on this device {device!r}; "
                          "run `dspark profile` here")
    if dtype is not None and profile.get("dtype") != dtype:
        raise ConfigError(f"{where} was measured in {profile.get('dtype')!r}, not {dtype!r}")
    if drafter_identity is not None:
        have = profile.get("drafter") or {}
        keys = [k for k in ("config_sha256", "weights_sha256") if k in drafter_identity] or ["name"]
        if any(have.get(k) != drafter_identity.get(k) for k in keys):
            raise ConfigError(f"{where} was measured with drafter {have.get('name')!r}, not "
                              f"{drafter_identity.get('name')!r}")


def profile_table(profile: Mapping[str, Any]) -> str:
    """Plain-text table: verify ms (rows R, columns L), then the drafter row (ms per R)."""
    cells = {}
    for key, ms in profile["verify_ms"].items():
        r, length = (int(x) for x in key.split("x"))
        cells[(r, length)] = ms
    rows = sorted({r for r, _ in cells})
    cols = sorted({length for _, length in cells})
    lines = [f"verify ms: one target step, R requests × L tokens each — {profile.get('shape')}, "
             f"{profile.get('device')}, {profile.get('dtype')}, context {profile.get('context')}, "
             f"median of {profile.get('repeats')}"]
    corner = "R \\ L"
    lines.append(f"{corner:>7}" + "".join(f"{length:>10}" for length in cols))
    for r in rows:
        lines.append(f"{r:>7}" + "".join(f"{cells[(r, c)]:>10.3f}" if (r, c) in cells else f"{'-':>10}" for c in cols))
    draft = profile.get("draft_ms")
    if draft:
        keys = sorted(draft, key=int)
        lines.append(f"draft ms: one drafter step, block {profile.get('gamma')}")
        lines.append(f"{'R':>7}" + "".join(f"{k:>10}" for k in keys))
        lines.append(f"{'ms':>7}" + "".join(f"{draft[k]:>10.3f}" for k in keys))
    else:
        lines.append("draft ms: (no drafter profiled)")
    return "\n".join(lines)
