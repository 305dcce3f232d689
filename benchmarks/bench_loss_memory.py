#!/usr/bin/env python
"""Peak memory of the chunked drafter loss (`dspark.training.losses.drafter_block_loss`), measured on the
CPU, fitted, and extrapolated to one 80 GB GPU for a Qwen3-4B-sized DSpark drafter.

What is measured (each configuration in a FRESH subprocess, one intra-op thread):
  * loss   — one forward + backward of `drafter_block_loss` with the real `DSparkModel.heads` of a
             one-layer drafter (lm_head [V, H] frozen, vanilla Markov head of rank r, confidence head with
             the Markov feature; trainable except embedding and lm_head, as in the trainer). `hidden`
             [blocks, γ, H] is a leaf that requires grad (as the drafter's output does); every slot is
             supervised; TV and confidence terms on (default LossWeights).
  * step   — the whole drafter training step at reduced model sizes: `DSparkModel.forward_train` over
             all blocks + the loss + backward.
  * meta   — no allocation at all: the Qwen3-4B-sized drafter's `forward_train` on the meta device, with
             `torch.autograd.graph.saved_tensors_hooks` recording every tensor autograd saves for backward
             (shape and dtype, deduplicated by storage). That is torch's own account of the activations at
             full size, once with the SDPA dispatch as it is (the meta dispatch picks the math path) and
             once with a stand-in that saves what a fused attention kernel saves.

Peak = peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, after resetting the high-water mark through
/proc/self/clear_refs) minus the RSS right before the measured work. Workers run with
MALLOC_MMAP_THRESHOLD_=65536, so every tensor above 64 KiB is its own mmap and is returned to the OS when
freed: RSS then follows the live tensor bytes instead of glibc's heap high-water mark. As a second,
independent account, each measured pass is repeated under torch's `MemTracker`
(torch.distributed._tools.mem_tracker, a dispatch-mode tracker of live tensor storages per device) and its
peak minus its value at entry is recorded.

Fit (per parameter dtype):  peak ≈ a + b·P + k·U, with U = blocks_in_flight · γ · V · 4 bytes (one
[chunk × γ × V] float32 tensor; blocks_in_flight = chunk_blocks, or all blocks when unchunked) and
P = V · r · 4 bytes (one Markov-table-sized float32 tensor: the Markov parameter gradients scale with it).
b and k are fitted separately for the unchunked (one chunk) and the chunked (several chunks) runs, a is
shared; the residual of every run is reported. The whole-step runs are checked against
(saved activations from the hooks) + (the fitted loss model).

Extrapolation: 512 anchors × γ = 7 × V = 151,936, Qwen3-4B shapes (H 2560, 32 q / 8 kv heads of 128, MLP 9728),
5 draft layers, Markov rank 256, 5 fused target layers, a 4096-token sequence (3584 block tokens attending
to 4096 context tokens), bf16 parameters with fp32 master weights + fp32 gradient accumulators + AdamW
states for the trainable ones, frozen bf16 embedding + LM head (no gradients, no optimizer state), the
frozen bf16 Qwen3-4B target resident for online features. The loss uses the fitted k (bf16-parameter runs
when measured) at chunk sizes 512 (unchunked), 64 and 16.

Writes benchmarks/results/loss_memory_cpu.json and prints markdown tables.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_loss_memory.py            # full sweep (~5 min, 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_loss_memory.py --quick    # smoke test (~1 min; one V, so its fit means nothing)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

GIB = 2**30
MB = 1e6

# Qwen3-4B (docs/design.md §7) and the DSpark drafter built for it.
QWEN3_4B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2560,
    intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    attention_bias=False,
)
TARGET = dict(anchors=512, gamma=7, seq_len=4096, draft_layers=5, markov_rank=256, fused_layers=5)
FROZEN = ("embed_tokens.weight", "lm_head.weight")  # as in dspark.training.trainer
# An "80 GB" H100 has 80 GiB of HBM; torch can allocate about 79.1 GiB of it, and the CUDA context plus
# cuBLAS/cuDNN workspaces take roughly another GiB outside the caching allocator (estimate, not measured).
GPU_USABLE_GIB = 78.0


# ---------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh subprocess per configuration)
# ---------------------------------------------------------------------------------------------------

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux ≥ 4.0: '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """with PeakRSS() as m: work  →  m.base (RSS before), m.peak_delta (ru_maxrss − base), m.hwm_delta."""

    def __enter__(self):
        gc.collect()
        self.reset_ok = _reset_peak()
        self.base = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        self.ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.hwm = _status_bytes("VmHWM")
        self.end = _status_bytes("VmRSS")
        self.peak_delta = self.ru_maxrss - self.base
        self.hwm_delta = self.hwm - self.base
        self.end_delta = self.end - self.base
        return False

    def record(self) -> dict:
        return dict(rss_base=self.base, rss_peak_delta=self.peak_delta, vmhwm_peak_delta=self.hwm_delta,
                    rss_end_delta=self.end_delta, peak_reset_ok=self.reset_ok)


def _torch_tracked_peak(fn, *externals) -> dict | None:
    """Run fn() under torch's MemTracker; return its CPU peak minus its value at entry (bytes)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # builds without torch.distributed
        return dict(error=f"MemTracker unavailable: {exc}")
    import torch

    class DeviceTotalsOnly(MemTracker):
        # Per-module statistics are not needed, and MemTracker's module hooks try to put gradient hooks
        # on frozen parameters (an error); the device totals come from its dispatch mode alone.
        def _pre_fw_hook(self, *args):
            pass

        def _post_fw_hook(self, *args):
            pass

        def _pre_bw_hook(self, *args):
            pass

        def _post_bw_hook(self, *args):
            pass

    gc.collect()
    tracker = DeviceTotalsOnly()
    tracker.track_external(*externals)
    with tracker:
        start = tracker.get_tracker_snapshot("current")
        fn()
        peak = tracker.get_tracker_snapshot("peak")
    cpu = torch.device("cpu")
    at_entry = start.get(cpu, {}).get("Total", 0)
    peak_cpu = peak.get(cpu, {})
    return dict(peak_delta=peak_cpu.get("Total", 0) - at_entry, at_entry=at_entry,
                peak_by_type={str(k).split(".")[-1]: v for k, v in peak_cpu.items()})


def _drafter_hf(vocab: int, hidden: int, *, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                target_layers: int, max_pos: int) -> dict:
    from dspark.models.random_init import PRESETS

    return dict(
        PRESETS["tiny-qwen3"], vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=target_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=max_pos,
    )


def _build_drafter(cfg: dict, draft_layers: int, dtype, device="cpu"):
    import torch

    from dspark.models.drafters.dspark import DSparkModel, dspark_config_for_target

    hf = _drafter_hf(
        cfg["vocab"], cfg["hidden"], heads=cfg.get("heads", 4), kv_heads=cfg.get("kv_heads", 2),
        head_dim=cfg.get("head_dim", cfg["hidden"] // cfg.get("heads", 4)),
        intermediate=cfg.get("intermediate", 3 * cfg["hidden"]), target_layers=8,
        max_pos=cfg.get("seq_len", 64) + 2 * cfg["gamma"] + 8,
    )
    config = dspark_config_for_target(
        hf, target_layer_ids=tuple(range(1, 6)), mask_token_id=cfg["vocab"] - 1, num_draft_layers=draft_layers,
        block_size=cfg["gamma"], markov_rank=cfg["rank"],
    )
    torch.manual_seed(cfg.get("seed", 0))
    with torch.device(device):
        model = DSparkModel(config)
    model = model.to(dtype).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name not in FROZEN)
    return model


def _loss_inputs(cfg: dict, model, blocks: int, dtype, hidden_requires_grad: bool = True):
    import torch

    g = torch.Generator().manual_seed(cfg.get("seed", 0) + 1)
    gamma, hidden_size, vocab = cfg["gamma"], cfg["hidden"], cfg["vocab"]
    hidden = torch.randn(blocks, gamma, hidden_size, generator=g).to(dtype).requires_grad_(hidden_requires_grad)
    prev = torch.randint(0, vocab, (blocks, gamma), generator=g)
    labels = torch.randint(0, vocab, (blocks, gamma), generator=g)
    supervised = torch.ones(blocks, gamma, dtype=torch.bool)
    target_hidden = torch.randn(blocks, gamma, hidden_size, generator=g).to(dtype)
    return hidden, prev, labels, supervised, target_hidden


def _clear_grads(model, *tensors) -> None:
    for p in model.parameters():
        p.grad = None
    for t in tensors:
        t.grad = None
    gc.collect()


def worker_loss(cfg: dict) -> dict:
    import torch

    from dspark.training.losses import drafter_block_loss

    dtype = getattr(torch, cfg["dtype"])
    model = _build_drafter(cfg, 1, dtype)
    blocks, chunk = cfg["blocks"], cfg["chunk"]
    requires_grad = cfg.get("hidden_requires_grad", True)

    def run(inputs):
        hidden, prev, labels, supervised, target_hidden = inputs
        out = drafter_block_loss(model.heads, hidden, prev, labels, supervised, target_hidden, model.lm_head.weight,
                                 chunk_blocks=chunk)
        out.total.backward()
        return float(out.total.detach())

    # Warm-up (kernels, thread pools, lazy init) on a couple of blocks, then drop every gradient: the
    # trainer sets p.grad = None after each micro-batch, so the measured pass allocates them afresh.
    warm = _loss_inputs(cfg, model, min(blocks, 2), dtype, requires_grad)
    run(warm)
    _clear_grads(model, warm[0])
    del warm
    inputs = _loss_inputs(cfg, model, blocks, dtype, requires_grad)
    with PeakRSS() as m:
        loss = run(inputs)
    result = dict(m.record(), loss_value=loss)
    if cfg.get("tracker", True):
        _clear_grads(model, inputs[0])
        result["torch_tracker"] = _torch_tracked_peak(lambda: run(inputs), model, *inputs)
    return result


def _train_inputs(cfg: dict, model, anchors: int, dtype):
    import torch

    g = torch.Generator().manual_seed(cfg.get("seed", 0) + 2)
    seq_len, gamma, hidden, vocab = cfg["seq_len"], cfg["gamma"], cfg["hidden"], cfg["vocab"]
    features = torch.randn(1, seq_len, 5 * hidden, generator=g).to(dtype)
    positions = torch.randperm(seq_len - gamma - 1, generator=g)[:anchors].add(1).sort().values.view(1, anchors)
    anchor_tokens = torch.randint(0, vocab - 1, (1, anchors), generator=g)
    valid = torch.ones(1, anchors, dtype=torch.bool)
    blocks = _loss_inputs(cfg, model, anchors, dtype)[1:]  # prev, labels, supervised, target_hidden
    return features, positions, anchor_tokens, valid, blocks


def _saved_tensor_account(model):
    """A saved_tensors_hooks pair that records autograd-saved tensors (not parameters) by storage."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t):
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            if storage._cdata not in params:
                saved[storage._cdata] = (storage.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."))
        return t

    return saved, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _summarize_saved(saved: dict, q_tokens: int, kv_tokens: int) -> dict:
    total = sum(v[0] for v in saved.values())
    attn = sum(v[0] for v in saved.values() if q_tokens in v[1] and kv_tokens in v[1])
    by_shape: dict[str, int] = {}
    for nbytes, shape, dtype in saved.values():
        key = f"{list(shape)} {dtype}"
        by_shape[key] = by_shape.get(key, 0) + nbytes
    top = dict(sorted(by_shape.items(), key=lambda kv: -kv[1])[:12])
    return dict(saved_bytes=total, attention_matrix_bytes=attn, tensors=len(saved), largest_by_shape=top)


def worker_step(cfg: dict) -> dict:
    import torch

    from dspark.training.losses import drafter_block_loss

    dtype = getattr(torch, cfg["dtype"])
    model = _build_drafter(cfg, cfg["layers"], dtype)
    anchors, chunk, gamma = cfg["blocks"], cfg["chunk"], cfg["gamma"]

    def run(inputs, account=None):
        features, positions, anchor_tokens, valid, (prev, labels, supervised, target_hidden) = inputs
        if account is not None:
            with account:
                hidden = model.forward_train(features, positions, anchor_tokens, valid)
        else:
            hidden = model.forward_train(features, positions, anchor_tokens, valid)
        after_forward = _status_bytes("VmRSS")
        out = drafter_block_loss(
            model.heads, hidden.flatten(0, 1), prev, labels, supervised,
            target_hidden, model.lm_head.weight, chunk_blocks=chunk,
        )
        out.total.backward()
        return after_forward

    warm = _train_inputs(dict(cfg, seq_len=min(cfg["seq_len"], 64)), model, min(anchors, 4), dtype)
    run(warm)
    _clear_grads(model)
    del warm
    inputs = _train_inputs(cfg, model, anchors, dtype)
    saved, account = _saved_tensor_account(model)
    with PeakRSS() as m:
        after_forward = run(inputs, account)
    result = dict(m.record(), rss_after_forward_delta=after_forward - m.base,
                  saved=_summarize_saved(saved, anchors * gamma, cfg["seq_len"] + anchors * gamma))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result["trainable_param_bytes"] = trainable
    if cfg.get("tracker", True):
        _clear_grads(model)
        result["torch_tracker"] = _torch_tracked_peak(lambda: run(inputs), model, *inputs[:4], *inputs[4])
    return result


class _FusedSDPAStandIn:
    """Meta-only stand-in for a fused attention kernel (flash / memory-efficient / cuDNN): same output,
    and it saves for backward what those kernels save — q, k, v, out, the float32 log-sum-exp [N, heads, Q],
    and the additive bias a boolean mask is converted to (q's dtype). GQA is handled natively (no k/v copies)."""

    @staticmethod
    def build():
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, bias):
                out = torch.empty_like(q)
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse, bias)
                return out

            @staticmethod
            def backward(ctx, grad):  # never run (meta accounting only)
                raise NotImplementedError

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            bias = None
            if attn_mask is not None:
                bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device) if attn_mask.dtype == torch.bool else attn_mask
            return Fn.apply(q, k, v, bias)

        return sdpa


def _count_target_params(hf: dict) -> int:
    import torch

    from dspark.models.config import parse_decoder_config
    from dspark.models.decoder import DecoderModel

    with torch.device("meta"):
        target = DecoderModel(parse_decoder_config(dict(hf), where="Qwen3-4B shapes"))
    return sum(p.numel() for p in target.parameters())


def _meta_saved(model, seq: int, anchors: int, gamma: int, feature_dim: int, dtype) -> dict:
    """forward_train on the meta device under the saved-tensor hooks, with the SDPA dispatch as it is
    ("math": the meta dispatch picks the math path) and with the fused-kernel stand-in ("fused")."""
    import torch
    import torch.nn.functional as F

    features = torch.empty(1, seq, feature_dim, dtype=dtype, device="meta")
    positions = torch.arange(anchors, device="meta").view(1, anchors)
    anchor_tokens = torch.zeros(1, anchors, dtype=torch.long, device="meta")
    valid = torch.ones(1, anchors, dtype=torch.bool, device="meta")
    out = {}
    native = F.scaled_dot_product_attention
    for variant in ("fused", "math"):
        saved, account = _saved_tensor_account(model)
        if variant == "fused":
            F.scaled_dot_product_attention = _FusedSDPAStandIn.build()
        try:
            with account:
                hidden = model.forward_train(features, positions, anchor_tokens, valid)
        finally:
            F.scaled_dot_product_attention = native
        out[variant] = _summarize_saved(saved, anchors * gamma, seq + anchors * gamma)
        out[variant]["output_bytes"] = hidden.numel() * hidden.element_size()
    return out


def worker_meta(cfg: dict) -> dict:
    """Saved-for-backward activations of the full-size drafter forward, on the meta device (and, as a check
    of the method, of the reduced-size step configuration that is also measured for real on the CPU)."""
    import torch

    from dspark.models.drafters.dspark import DSparkModel, dspark_config_for_target

    check = None
    if cfg.get("check"):
        c = cfg["check"]
        small = _build_drafter(c, c["layers"], getattr(torch, c["dtype"]), device="meta")
        check = dict(config=c, activations=_meta_saved(small, c["seq_len"], c["blocks"], c["gamma"], 5 * c["hidden"],
                                                       getattr(torch, c["dtype"])))
    t = TARGET
    hf = dict(QWEN3_4B)
    config = dspark_config_for_target(
        hf, target_layer_ids=(1, 9, 17, 25, 33), mask_token_id=hf["vocab_size"] - 1,
        num_draft_layers=t["draft_layers"], block_size=t["gamma"], markov_rank=t["markov_rank"],
        num_anchors=t["anchors"],
    )
    with torch.device("meta"):
        model = DSparkModel(config).to(torch.bfloat16)
    params = {n: p.numel() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in FROZEN)
    out = _meta_saved(model, t["seq_len"], t["anchors"], t["gamma"], t["fused_layers"] * hf["hidden_size"], torch.bfloat16)
    return dict(drafter_params=params, target_params=_count_target_params(hf), activations=out, reduced_check=check)


WORKERS = {"loss": worker_loss, "step": worker_step, "meta": worker_meta}


def worker_main(spec: str) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = json.loads(spec)
    started = time.perf_counter()
    result = WORKERS[cfg["kind"]](cfg)
    result["worker_seconds"] = round(time.perf_counter() - started, 2)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------

def run_worker(cfg: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed for {cfg}:\n{proc.stderr[-4000:]}")
    return dict(config=cfg, **json.loads(lines[-1][len("RESULT "):]))


def unit_bytes(cfg: dict) -> int:
    """One [blocks_in_flight × γ × V] float32 tensor."""
    return min(cfg["chunk"], cfg["blocks"]) * cfg["gamma"] * cfg["vocab"] * 4


def fit_loss(rows: list[dict]) -> dict:
    """Least squares over both regimes at once: peak ≈ a + b_u·P + k_u·U for unchunked runs (one chunk)
    and a + b_c·P + k_c·U for chunked runs (several chunks), a shared."""
    import torch

    xs, ys = [], []
    for r in rows:
        c = r["config"]
        u, p = unit_bytes(c), c["vocab"] * c["rank"] * 4
        chunked = c["chunk"] < c["blocks"]
        xs.append([1.0, 0.0 if chunked else p, p if chunked else 0.0, 0.0 if chunked else u, u if chunked else 0.0])
        ys.append([float(r["rss_peak_delta"])])
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    names = ["a_bytes", "b_unchunked", "b_chunked", "k_unchunked", "k_chunked"]
    # Drop a column that has no support (e.g. a sweep with no chunked runs).
    keep = [i for i in range(x.shape[1]) if bool(x[:, i].abs().sum() > 0)]
    sol = torch.linalg.lstsq(x[:, keep], y).solution.squeeze(1)
    coef = {n: None for n in names}
    for i, value in zip(keep, sol.tolist()):
        coef[names[i]] = value
    pred = (x[:, keep] @ sol.unsqueeze(1)).squeeze(1)
    residuals = []
    for r, yp in zip(rows, pred.tolist()):
        residuals.append(dict(vocab=r["config"]["vocab"], blocks=r["config"]["blocks"], chunk=r["config"]["chunk"],
                              measured=r["rss_peak_delta"], predicted=yp, residual=r["rss_peak_delta"] - yp,
                              residual_pct=100 * (r["rss_peak_delta"] - yp) / r["rss_peak_delta"]))
    rel = [abs(res["residual_pct"]) for res in residuals]
    return dict(model="peak ≈ a + b·P + k·U (b, k per regime); U = blocks_in_flight·γ·V·4 B, P = V·r·4 B", coefficients=coef,
                points=len(rows), max_abs_residual_pct=max(rel), residuals=residuals)


def loss_model_bytes(fit: dict, blocks: int, chunk: int, gamma: int, vocab: int, rank: int) -> float:
    c = fit["coefficients"]
    u = min(chunk, blocks) * gamma * vocab * 4
    regime = "chunked" if chunk < blocks else "unchunked"
    k, b = c[f"k_{regime}"], c[f"b_{regime}"]
    if k is None:  # the sweep had no run of this regime: fall back to the other one
        other = "unchunked" if regime == "chunked" else "chunked"
        k, b = c[f"k_{other}"], c[f"b_{other}"]
    return (c["a_bytes"] or 0.0) + (b or 0.0) * vocab * rank * 4 + k * u


def extrapolate(meta: dict, fits: dict, fit_name: str) -> dict:
    """Memory budget on one GPU for the target setting, per chunk size."""
    t, hf = TARGET, QWEN3_4B
    vocab, hidden, rank, gamma, anchors, seq = hf["vocab_size"], hf["hidden_size"], t["markov_rank"], t["gamma"], t["anchors"], t["seq_len"]
    q_tokens, kv_tokens = anchors * gamma, seq + anchors * gamma
    heads, kv_heads, head_dim, inter = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"]
    params = meta["drafter_params"]
    frozen = sum(v for n, v in params.items() if n in FROZEN)
    trainable = sum(v for n, v in params.items() if n not in FROZEN)
    markov = sum(v for n, v in params.items() if n.startswith("markov_head"))
    per_layer_formula = (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
                         + 3 * hidden * inter + 2 * hidden + 2 * head_dim)
    trainable_formula = (t["draft_layers"] * per_layer_formula + t["fused_layers"] * hidden * hidden + 2 * hidden
                         + 2 * vocab * rank + (hidden + rank + 1))
    target_params = meta["target_params"]
    kv_cache = hf["num_hidden_layers"] * 2 * kv_heads * head_dim * 2 * seq  # target's paged KV for one sequence
    static = {
        "target Qwen3-4B weights (bf16, frozen)": target_params * 2,
        "target KV cache, 4096 tokens (bf16)": kv_cache,
        "drafter frozen embedding + LM head (bf16)": frozen * 2,
        "drafter trainable weights (bf16) + bf16 grads": trainable * 4,
        "fp32 master + fp32 grad accumulators + AdamW m, v": trainable * 16,
    }
    extra_attn = q_tokens * kv_tokens * heads * 4  # one fp32 [heads, Q, S+Q] matrix
    fit_used = fits[fit_name]
    loss_by_fit = {name: {chunk: loss_model_bytes(f, anchors, chunk, gamma, vocab, rank) for chunk in (512, 64, 16)}
                   for name, f in fits.items()}
    budgets = {}
    for attention in ("fused", "math"):
        acts = meta["activations"][attention]
        act_bytes = acts["saved_bytes"] + 2 * acts["output_bytes"]  # + drafter output and its gradient
        # After the loss is done, backward through the last draft layer needs, at its worst, the MLP
        # gradients ([Q, I] bf16 ×3) and for the math path two fp32 score-sized tensors (grad of the
        # probabilities and of the scores). Estimate, not measured.
        layer_bwd = 3 * q_tokens * inter * 2 + (2 * extra_attn if attention == "math" else 2 * q_tokens * heads * head_dim * 4)
        rows = {}
        for chunk in (512, 64, 16):
            loss = loss_model_bytes(fit_used, anchors, chunk, gamma, vocab, rank)
            at_loss = sum(static.values()) + act_bytes + loss
            at_layer_bwd = sum(static.values()) + act_bytes + layer_bwd
            peak = max(at_loss, at_layer_bwd)
            slack = 0.10 * (act_bytes + max(loss, layer_bwd))
            rows[chunk] = dict(loss_bytes=loss, loss_unit_bytes=min(chunk, anchors) * gamma * vocab * 4,
                               peak_during_loss=at_loss, peak_during_layer_backward=at_layer_bwd, peak=peak,
                               allocator_slack_10pct=slack, total_with_slack=peak + slack,
                               fits=(peak + slack) / GIB <= GPU_USABLE_GIB)
        budgets[attention] = dict(activation_bytes=act_bytes, layer_backward_transient_bytes=layer_bwd, chunks=rows)
    return dict(
        loss_fit_used=fit_name, loss_bytes_by_fit=loss_by_fit,
        parameters=dict(target=target_params, drafter_trainable=trainable, drafter_trainable_formula=trainable_formula,
                        drafter_frozen=frozen, markov=markov),
        static=static, budgets=budgets, gpu_usable_gib=GPU_USABLE_GIB,
        shapes=dict(vocab=vocab, hidden=hidden, rank=rank, gamma=gamma, anchors=anchors, seq_len=seq,
                    block_tokens=q_tokens, attended_tokens=kv_tokens, heads=heads, kv_heads=kv_heads,
                    head_dim=head_dim, intermediate=inter, draft_layers=t["draft_layers"]),
    )


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, load_average=os.getloadavg(), mem_total_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1))


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_configs(args) -> list[dict]:
    base = dict(hidden=args.hidden, gamma=args.gamma, rank=args.rank, tracker=not args.no_tracker)
    cfgs, seen = [], set()
    for vocab in parse_list(args.vocab):
        for blocks in parse_list(args.blocks):
            for chunk in args.chunks.split(","):
                c = blocks if chunk == "all" else min(int(chunk), blocks)
                key = ("loss", "float32", vocab, blocks, c)
                if key not in seen:
                    seen.add(key)
                    cfgs.append(dict(base, kind="loss", dtype="float32", vocab=vocab, blocks=blocks, chunk=c,
                                     tracker=base["tracker"] and vocab * blocks <= args.tracker_max))
    for dtype, specs in (("float32", args.extra), ("bfloat16", args.bf16)):
        for spec in specs.split(";") if specs else []:
            vocab, blocks, chunk = spec.split(",")
            blocks = int(blocks)
            c = blocks if chunk == "all" else min(int(chunk), blocks)
            key = ("loss", dtype, int(vocab), blocks, c)
            if key not in seen:
                seen.add(key)
                # bf16 matmuls are slow on this CPU (no AVX-512 BF16): one measured pass, no tracker pass.
                cfgs.append(dict(base, kind="loss", dtype=dtype, vocab=int(vocab), blocks=blocks, chunk=c,
                                 tracker=base["tracker"] and dtype == "float32" and int(vocab) * blocks <= args.tracker_max))
    if args.no_grad_hidden:  # hidden that does not require grad: the loss skips checkpointing
        vocab, blocks, chunk = (int(x) for x in args.no_grad_hidden.split(","))
        cfgs.append(dict(base, kind="loss", dtype="float32", vocab=vocab, blocks=blocks, chunk=chunk,
                         hidden_requires_grad=False))
    step_chunks = []
    for chunk in args.step_chunks.split(",") if args.step_chunks else []:
        c = args.step_blocks if chunk == "all" else min(int(chunk), args.step_blocks)
        if c in step_chunks:
            continue
        step_chunks.append(c)
        cfgs.append(dict(base, kind="step", dtype="float32", vocab=args.step_vocab, blocks=args.step_blocks, chunk=c,
                         layers=args.step_layers, seq_len=args.step_seq, heads=8, kv_heads=2, head_dim=args.hidden // 8,
                         intermediate=3 * args.hidden))
    steps = [c for c in cfgs if c["kind"] == "step"]
    cfgs.append(dict(kind="meta", check=steps[0] if steps else None))
    return cfgs


def fmt_mb(x: float) -> str:
    return f"{x / MB:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", default="16384,32768")
    parser.add_argument("--blocks", default="32,64,128")
    parser.add_argument("--chunks", default="all,64,16", help="chunk_blocks values; 'all' = no chunking")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--gamma", type=int, default=7)
    parser.add_argument("--rank", type=int, default=256, help="Markov rank r")
    parser.add_argument("--extra", default="8192,128,all;8192,128,64;8192,128,16;65536,64,all;65536,64,16;"
                        "16384,256,all;16384,256,64;16384,256,16",
                        help="';'-separated V,blocks,chunk: more float32 loss runs")
    parser.add_argument("--bf16", default="8192,32,all;8192,64,all;8192,64,16;8192,128,64;16384,32,all;16384,32,16",
                        help="';'-separated V,blocks,chunk loss runs with bf16 parameters (the trainer's bf16 mode)")
    parser.add_argument("--no-grad-hidden", default="32768,256,16",
                        help="V,blocks,chunk: one loss run whose hidden does not require grad ('' to skip)")
    parser.add_argument("--step-vocab", type=int, default=16384)
    parser.add_argument("--step-blocks", type=int, default=128)
    parser.add_argument("--step-seq", type=int, default=1024)
    parser.add_argument("--step-layers", type=int, default=5)
    parser.add_argument("--step-chunks", default="all,64,16")
    parser.add_argument("--no-tracker", action="store_true", help="skip the second (torch MemTracker) pass")
    parser.add_argument("--tracker-max", type=int, default=16384 * 64,
                        help="run the MemTracker pass only for float32 loss runs with V·blocks up to this (time)")
    parser.add_argument("--jobs", type=int, default=2, help="workers in parallel (memory is per process)")
    parser.add_argument("--quick", action="store_true", help="a small sweep (a smoke test of the script)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss_memory_cpu.json"))
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    if args.quick:
        args.vocab, args.blocks, args.extra, args.step_blocks, args.step_seq = "16384", "32,64", "16384,128,64", 32, 256
        args.bf16 = "8192,32,all;8192,32,16"
        args.no_grad_hidden = "16384,64,16"
    cfgs = build_configs(args)
    # Largest first so that the two parallel workers finish together.
    order = sorted(cfgs, key=lambda c: -(c.get("vocab", 0) * c.get("blocks", 0) * (8 if c.get("dtype") == "bfloat16" else 1)
                                         + (10**12 if c["kind"] == "meta" else 0)))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_worker, order))
    wall = time.perf_counter() - started
    loss_rows = [r for r in results if r["config"]["kind"] == "loss"]
    loss_rows.sort(key=lambda r: (r["config"]["dtype"], not r["config"].get("hidden_requires_grad", True),
                                  r["config"]["vocab"], r["config"]["blocks"], -r["config"]["chunk"]))
    step_rows = sorted((r for r in results if r["config"]["kind"] == "step"), key=lambda r: -r["config"]["chunk"])
    meta = next(r for r in results if r["config"]["kind"] == "meta")

    fp32 = [r for r in loss_rows if r["config"]["dtype"] == "float32" and r["config"].get("hidden_requires_grad", True)]
    bf16 = [r for r in loss_rows if r["config"]["dtype"] == "bfloat16"]
    fits = {"float32": fit_loss(fp32)}
    if len(bf16) >= 4:
        fits["bfloat16"] = fit_loss(bf16)
    used = "bfloat16" if "bfloat16" in fits else "float32"

    # Step check: measured peak vs (saved activations, by torch's hooks) + (fitted fp32 loss model).
    for r in step_rows:
        c = r["config"]
        loss = loss_model_bytes(fits["float32"], c["blocks"], c["chunk"], c["gamma"], c["vocab"], c["rank"])
        r["predicted_peak"] = r["saved"]["saved_bytes"] + loss
        r["prediction_note"] = ("saved activations (hooks) + fitted float32 loss model; the layers' parameter "
                                "gradients only appear after the loss tensors are freed")

    extrapolation = extrapolate(meta, fits, used)
    payload = dict(
        benchmark="drafter loss memory (CPU measurement + arithmetic)",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine_info(),
        command=" ".join([Path(sys.executable).name, *sys.argv]), wall_seconds=round(wall, 1),
        method=dict(peak="ru_maxrss after clear_refs reset, minus VmRSS right before the measured pass; "
                         "MALLOC_MMAP_THRESHOLD_=65536; one fresh process per configuration; torch.set_num_threads(1)",
                    torch_account="torch.distributed._tools.mem_tracker.MemTracker peak minus its value at entry "
                                  "(second pass of the same work in the same process)"),
        loss_measurements=loss_rows, step_measurements=step_rows, fits=fits, meta_accounting=meta,
        extrapolation=extrapolation,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print_report(payload)
    print(f"\nwrote {out} ({wall:.0f} s)")


def print_report(p: dict) -> None:
    print(f"## Loss peak memory, CPU (torch {p['machine']['torch']}, {p['machine']['cpu']}, H={p['loss_measurements'][0]['config']['hidden']}, "
          f"γ={p['loss_measurements'][0]['config']['gamma']}, r={p['loss_measurements'][0]['config']['rank']})\n")
    print("| dtype | V | blocks | chunk | unit U (MB) | peak RSS Δ (MB) | torch MemTracker Δ (MB) | peak / U | fit (MB) | residual |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in p["loss_measurements"]:
        c = r["config"]
        fit = p["fits"].get(c["dtype"]) if c.get("hidden_requires_grad", True) else None
        pred = loss_model_bytes(fit, c["blocks"], c["chunk"], c["gamma"], c["vocab"], c["rank"]) if fit else None
        tracker = (r.get("torch_tracker") or {}).get("peak_delta")
        chunk = "all" if c["chunk"] >= c["blocks"] else str(c["chunk"])
        if not c.get("hidden_requires_grad", True):
            chunk += " (hidden no grad)"
        u = unit_bytes(c)
        res = f"{100 * (r['rss_peak_delta'] - pred) / r['rss_peak_delta']:+.1f}%" if pred else "—"
        print(f"| {c['dtype']} | {c['vocab']} | {c['blocks']} | {chunk} | {fmt_mb(u)} | {fmt_mb(r['rss_peak_delta'])} | "
              f"{fmt_mb(tracker) if tracker is not None else '—'} | {r['rss_peak_delta'] / u:.2f} | "
              f"{fmt_mb(pred) if pred else '—'} | {res} |")
    print("\n## Fits (peak ≈ a + b·P + k·U per regime; U = blocks_in_flight·γ·V·4 B, P = V·r·4 B)\n")
    print("| params | a (MB) | b unchunked (× P) | k unchunked (× U) | b chunked (× P) | k chunked (× U) | points | max abs residual |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    num = lambda v: f"{v:.2f}" if v is not None else "—"
    for name, f in p["fits"].items():
        c = f["coefficients"]
        print(f"| {name} | {fmt_mb(c['a_bytes'] or 0)} | {num(c['b_unchunked'])} | {num(c['k_unchunked'])} | "
              f"{num(c['b_chunked'])} | {num(c['k_chunked'])} | {f['points']} | {f['max_abs_residual_pct']:.1f}% |")
    if p["step_measurements"]:
        c0 = p["step_measurements"][0]["config"]
        print(f"\n## Whole drafter step (forward_train + loss + backward), CPU fp32: V={c0['vocab']}, H={c0['hidden']}, "
              f"{c0['layers']} layers, {c0['blocks']} anchors × γ={c0['gamma']}, {c0['seq_len']} context tokens\n")
        print("| chunk | peak RSS Δ (MB) | torch MemTracker Δ (MB) | RSS after forward Δ (MB) | saved activations, hooks (MB) "
              "| of which attention-matrix-sized (MB) | predicted peak (MB) | residual |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in p["step_measurements"]:
            c = r["config"]
            tracker = (r.get("torch_tracker") or {}).get("peak_delta")
            chunk = "all" if c["chunk"] >= c["blocks"] else c["chunk"]
            print(f"| {chunk} | {fmt_mb(r['rss_peak_delta'])} | {fmt_mb(tracker) if tracker is not None else '—'} | "
                  f"{fmt_mb(r['rss_after_forward_delta'])} | {fmt_mb(r['saved']['saved_bytes'])} | "
                  f"{fmt_mb(r['saved']['attention_matrix_bytes'])} | {fmt_mb(r['predicted_peak'])} | "
                  f"{100 * (r['rss_peak_delta'] - r['predicted_peak']) / r['rss_peak_delta']:+.1f}% |")
        check = (p["meta_accounting"].get("reduced_check") or {}).get("activations")
        if check:
            real = p["step_measurements"][0]["saved"]["saved_bytes"]
            print(f"\nSame step shapes on the meta device (the method used for the extrapolation): saved activations "
                  f"{fmt_mb(check['fused']['saved_bytes'])} MB with the fused-kernel stand-in, "
                  f"{fmt_mb(check['math']['saved_bytes'])} MB with the math path; hooks on the real CPU run: {fmt_mb(real)} MB.")
    e = p["extrapolation"]
    s = e["shapes"]
    print(f"\n## Extrapolation: one 80 GB GPU ({e['gpu_usable_gib']} GiB usable), {s['anchors']} anchors × γ={s['gamma']} × "
          f"V={s['vocab']}, Qwen3-4B-sized drafter, {s['seq_len']}-token sequence (loss k from the {e['loss_fit_used']} fit)\n")
    chunks = list(e["budgets"]["fused"]["chunks"])
    print("| component | " + " | ".join(f"chunk {c}{' (unchunked)' if c == s['anchors'] else ''} GiB" for c in chunks) + " |")
    print("|---|" + "---:|" * len(chunks))
    for name, value in e["static"].items():
        print(f"| {name} | " + " | ".join(f"{value / GIB:.2f}" for _ in chunks) + " |")
    for attention, label in (("fused", "fused attention kernel"), ("math", "math-fallback attention")):
        b = e["budgets"][attention]
        print(f"| drafter activations saved for backward ({label}) | " + " | ".join(f"{b['activation_bytes'] / GIB:.2f}" for _ in chunks) + " |")
    for name, losses in e["loss_bytes_by_fit"].items():
        mark = " (used below)" if name == e["loss_fit_used"] else ""
        print(f"| loss peak, {name}-parameter fit{mark} | " + " | ".join(f"{losses[c] / GIB:.2f}" for c in chunks) + " |")
    for attention, label in (("fused", "fused attention"), ("math", "math-fallback attention")):
        b = e["budgets"][attention]
        print(f"| after the loss: last layer's backward transient, {label} (estimate) | "
              + " | ".join(f"{b['layer_backward_transient_bytes'] / GIB:.2f}" for _ in chunks) + " |")
    for attention, label in (("fused", "fused attention"), ("math", "math-fallback attention")):
        b = e["budgets"][attention]["chunks"]
        phase = lambda r: "loss" if r["peak_during_loss"] >= r["peak_during_layer_backward"] else "layer bwd"
        print(f"| **peak, {label}** (+10 % allocator slack); phase | " + " | ".join(
            f"**{b[c]['peak'] / GIB:.1f}** ({b[c]['total_with_slack'] / GIB:.1f}); {phase(b[c])}; "
            f"{'fits' if b[c]['fits'] else 'DOES NOT FIT'}" for c in chunks) + " |")


if __name__ == "__main__":
    main()
