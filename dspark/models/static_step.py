"""Static-shape decoding and verification forwards, replayed from captured graphs (docs/architecture.md,
"the static step"; issue 17 item 2).

Eager PyTorch launches each kernel from Python; at one request on a GPU a 36-layer target's ~1,100 launches
per step (31 ATen operations per layer, docs/benchmarks.md) take about as long as the kernels themselves
(~5 µs each against a 4.5 ms H100 step). A forward whose sequences each bring at most `max_query_len`
new tokens — plain decoding (1 row each) and verification (1 + drafts rows each), the steady state of every
engine — is padded to a *capture bucket* (`Bucket`):

    B sequences: 1, 2, 4, 8, then multiples of 8     Q rows each: a power of two
    P key pages per sequence: a power of two          (and the feature layers the drafter reads)

Within a bucket every tensor has a fixed shape (`PagedKVCache.prepare_static`: padding rows write to and
read the cache's scratch slot, padded keys are masked), so the whole forward — embedding, every layer, the
paged attention, the LM head — is captured once per bucket into a CUDA graph and replayed with one launch:
the step copies its inputs into the capture's buffer (one host→device copy, then one on the device), replays,
and copies the rows it needs out of the shared output buffers before the next replay can overwrite them.

On the CPU nothing is gained by replaying (there is no launch to save), so graphs are off there by default;
`graphs=True` on the CPU replays by re-running the captured function on the capture's own buffers
(`HostGraph`), which is how the tests exercise everything but the CUDA capture itself. With `compile`, the
dense layer parts inside the captured forward are Inductor's kernels (`DecoderModel.compile_dense_parts`).

Captures are made lazily, the first time a bucket is needed, into one memory pool shared by all of them:
replays never overlap and each replay's outputs are copied out before the next, so one graph reusing another's
freed intermediates is safe. Re-allocating the KV pools (`PagedKVCache.generation`) drops every capture.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from dspark.decoding.sampling import RowSampling, SamplingParams
from dspark.devices import to_device
from dspark.models.flex_paged import attention_kernel
from dspark.models.kv_cache import PagedKVCache, StaticLayout


def configure_graphs(runner, drafter, *, enforce_eager: bool, max_batch: int, attention: str = "auto") -> None:
    """`--enforce-eager`, `--cuda-graph-max-bs` and `--attention-backend` on a loaded `TargetRunner` and drafter
    (or None): graphs off, or on CUDA for steps of up to `max_batch` sequences; their attention
    (`dspark.models.flex_paged.attention_kernel`) (`use_graphs`)."""
    graphs = False if enforce_eager else None
    runner.use_graphs(graphs, max_batch=max_batch, attention=attention)
    if drafter is not None:
        drafter.use_graphs(graphs, max_batch=max_batch, attention=attention)


def static_forwards(device: torch.device, enabled: bool | None, attention, make: Callable[..., "PaddedForwards"]
                    ) -> "PaddedForwards | None":
    """What every `use_graphs` builds: make(graphs=..., kernel=...) with graphs `enabled` (None: on CUDA only)
    and the kernel of `attention` on `device` (`attention_kernel`), or None when neither is wanted (every
    forward then runs ragged, with SDPA)."""
    kernel = attention_kernel(attention, device)
    graphs = torch.device(device).type == "cuda" if enabled is None else enabled
    return make(graphs=graphs, kernel=kernel) if graphs or kernel is not None else None


def batch_bucket(sequences: int) -> int:
    """Padded batch size: 1, 2, 4, 8, then the next multiple of 8 (at most 2× below 8 sequences, +7 above)."""
    if sequences <= 8:
        return 1 << max(sequences - 1, 0).bit_length()
    return -(-sequences // 8) * 8


def power_of_two_bucket(n: int) -> int:
    """The least power of two ≥ n (n ≥ 1)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Bucket:
    """The fixed shapes of one captured forward."""

    batch: int  # sequences (real ones first, then padding)
    query_len: int  # rows per sequence
    context_pages: int  # key pages gathered per sequence
    feature_layer_ids: tuple[int, ...]  # target layers whose outputs the forward also returns

    @property
    def rows(self) -> int:
        return self.batch * self.query_len


class HostGraph:
    """What a CUDA graph is on the CPU: `replay()` re-runs the captured function on the capture's own buffers."""

    def __init__(self, function: Callable[[], None]):
        self.function = function

    def replay(self) -> None:
        self.function()


@dataclass
class Capture:
    """One bucket's graph: it reads `inputs` (its own copies) and writes `outputs` (views of shared buffers)."""

    inputs: list[torch.Tensor]
    graph: torch.cuda.CUDAGraph | HostGraph
    outputs: list[torch.Tensor | None]


class CapturedGraphs:
    """The captures of one padded forward, keyed by bucket, and their replay: a CUDA graph each on CUDA, a
    `HostGraph` on the CPU. Used by every `PaddedForwards`: the target's step and the drafters' rounds.

    `replay(key, inputs, forward)`: forward(inputs) must take device tensors of fixed shapes per key and return
    2-D outputs [rows, width] (or None), rows ≤ max_rows. The first time a key occurs, forward runs once eagerly
    on copies of this step's inputs (a warm-up: lazy initialisations, cuBLAS workspaces, compiled kernels; it
    writes the same K/V the replay will), then is captured; every time, the inputs are copied into the
    capture's own and the graph replayed. Output i goes to a buffer [max_rows, width_i] shared by every capture
    (allocated outside any capture), so no capture holds memory of its own for logits; the returned views are
    valid until the next replay. A wider output replaces the buffer and drops the captures that wrote to it.

    A capture that fails (an operation CUDA cannot record) is reported once as a RuntimeWarning and kept in
    `error`; from then on every forward runs eagerly, and the failed one returns its warm-up's outputs."""

    def __init__(self, cache: PagedKVCache, max_rows: int):
        self.cache, self.max_rows = cache, max_rows
        self.captures: dict = {}
        self.error: str | None = None
        self._generation = cache.generation
        self._pool = None
        self._buffers: list[torch.Tensor | None] = []

    def replay(self, key, inputs: list[torch.Tensor], forward: Callable[[list[torch.Tensor]], list]) -> list:
        if self.error is not None:
            return forward(inputs)
        capture, warm_up = self._capture(key, inputs, forward)
        if capture is None:
            return warm_up
        for own, given in zip(capture.inputs, inputs):
            own.copy_(given, non_blocking=True)
        capture.graph.replay()
        return capture.outputs

    def _capture(self, key, inputs: list[torch.Tensor], forward) -> tuple[Capture | None, list | None]:
        """(the key's capture, None), made now if new; (None, the warm-up's outputs) if capturing failed."""
        if self.cache.generation != self._generation:  # the pools the captures wrote to are gone
            self.captures.clear()
            self._generation = self.cache.generation
        if key in self.captures:
            return self.captures[key], None
        own = [t.clone() for t in inputs]
        warm_up = forward(own)
        views = self._output_views(warm_up)

        def run() -> None:
            for view, output in zip(views, forward(own)):
                if view is not None:
                    view.copy_(output)

        try:
            graph = self._make_graph(run)
        except RuntimeError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"capturing a graph for {key} failed, running eagerly from now on: {self.error}",
                          RuntimeWarning, stacklevel=2)
            return None, warm_up
        self.captures[key] = Capture(own, graph, views)
        return self.captures[key], None

    def _make_graph(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph | HostGraph:
        return self._capture_cuda(run) if self.cache.device.type == "cuda" else HostGraph(run)

    def _output_views(self, outputs: list) -> list[torch.Tensor | None]:
        while len(self._buffers) < len(outputs):
            self._buffers.append(None)
        for i, out in enumerate(outputs):
            buffer = self._buffers[i]
            if out is not None and (buffer is None or buffer.shape[1] < out.shape[1] or buffer.dtype != out.dtype):
                self.captures = {key: c for key, c in self.captures.items()  # those writing into the old buffer go
                                 if i >= len(c.outputs) or c.outputs[i] is None}
                self._buffers[i] = torch.empty(self.max_rows, out.shape[1], dtype=out.dtype, device=out.device)
        return [None if out is None else self._buffers[i][: out.shape[0], : out.shape[1]]
                for i, out in enumerate(outputs)]

    def _capture_cuda(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Capture `run` into the pool shared by every capture (the warm-up already ran on these inputs). Only
        this thread's CUDA calls are restricted while capturing ("thread_local"): the server's other threads
        may go on (a "global" capture would fail on, e.g., a memory query from another thread)."""
        device = self.cache.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.current_stream(device).synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            run()
        return graph


class PaddedForwards:
    """What every padded forward shares (the target's `StaticStep`, the drafters' `StaticRound`s): the cache,
    the limits, `CapturedGraphs` when `graphs` (else the padded forward runs eagerly: how `--enforce-eager`
    still reads the cache in place with a paged kernel, and the tests' way of checking the padding alone), the
    attention `kernel` (None: SDPA over gathered keys; `dspark.models.flex_paged`) and the count of padded
    forwards run.

    A forward whose paged kernel fails (a compiler or Triton error on a machine it was never run on) is reported
    once as a RuntimeWarning, kept in `kernel_error`, and run again with SDPA, as is every later one: the
    failed run wrote the same K/V the rerun writes."""

    def __init__(self, cache: PagedKVCache, *, graphs: bool, max_batch: int, max_rows: int, kernel=None):
        if min(max_batch, max_rows) < 1:
            raise ValueError("max_batch and max_rows must be positive")
        self.cache, self.max_batch, self.max_rows, self.kernel = cache, max_batch, max_rows, kernel
        self.graphs = CapturedGraphs(cache, max_rows) if graphs else None
        self.replays = 0  # forwards run in a bucket's shapes (graph replays when `graphs`)
        self.kernel_error: str | None = None

    @property
    def captures(self) -> dict:
        return {} if self.graphs is None else self.graphs.captures

    def metadata(self, packed: torch.Tensor, batch: int, query_len: int, context_pages: int, kv_only_len: int = 0):
        """`StaticLayout.metadata` of a padded forward, read by this forwards' attention kernel."""
        return StaticLayout.metadata(packed, batch, query_len, context_pages, self.cache.page_size,
                                     self.cache.scratch_slot, kv_only_len, kernel=self.kernel)

    def run(self, bucket, inputs: list[torch.Tensor], forward: Callable[[list[torch.Tensor]], list]) -> list:
        """forward(inputs), replayed from the bucket's capture when there are graphs."""
        self.replays += 1
        if self.kernel is None:
            return self._run(bucket, inputs, forward)
        try:
            return self._run(bucket, inputs, forward)
        except Exception as exc:  # noqa: BLE001 — compiler and Triton failures share no base class
            self.kernel_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"the {self.kernel.name} attention kernel failed, using SDPA from now on: "
                          f"{self.kernel_error}", RuntimeWarning, stacklevel=2)
            self.kernel = None
            if self.graphs is not None:  # captures made with the kernel are dropped with it
                self.graphs.captures.clear()
            return self._run(bucket, inputs, forward)

    def _run(self, bucket, inputs: list[torch.Tensor], forward: Callable[[list[torch.Tensor]], list]) -> list:
        return forward(inputs) if self.graphs is None else self.graphs.replay(bucket, inputs, forward)


class StaticStep(PaddedForwards):
    """Runs a `DecoderModel` forward in a capture bucket's fixed shapes (`PaddedForwards`).

    max_batch, max_query_len: the largest bucket; max_rows: the most rows (B · Q) one bucket may have (it sizes
    the shared output buffers: max_rows × vocabulary float32 logits). `TargetRunner.forward` runs the ragged
    path for a forward without a bucket (`bucket` returns None)."""

    def __init__(self, model, cache: PagedKVCache, *, graphs: bool, max_batch: int = 256, max_query_len: int = 32,
                 max_rows: int = 512, kernel=None):
        super().__init__(cache, graphs=graphs, max_batch=max_batch, max_rows=max_rows, kernel=kernel)
        self.model, self.max_query_len = model, max_query_len

    def bucket(self, query_lens: list[int], lengths: list[int], feature_layer_ids: tuple[int, ...]) -> Bucket | None:
        """The bucket of a forward appending query_lens[b] tokens to sequences of lengths[b] cached tokens, or
        None when it does not fit one (too many sequences, rows or tokens per sequence)."""
        if not query_lens or len(query_lens) > self.max_batch or max(query_lens) > self.max_query_len:
            return None
        size = self.cache.page_size
        pages = max(-(-(length + q) // size) for length, q in zip(lengths, query_lens))
        bucket = Bucket(min(batch_bucket(len(query_lens)), self.max_batch), power_of_two_bucket(max(query_lens)),
                        power_of_two_bucket(pages), tuple(feature_layer_ids))
        return bucket if bucket.rows <= self.max_rows else None

    @torch.inference_mode()
    def forward(self, seq_ids: list[int], tokens: torch.Tensor, query_lens: list[int], bucket: Bucket,
                logits_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append tokens [T] (host, long; sequence b's q_b tokens in turn) in `bucket`'s shapes. logits_rows:
        the rows of the T new tokens whose logits are returned (host, long; None = all). Returns logits
        [len(logits_rows) or T, V] float32 and the features [T, L·H] of the bucket's layers (None without)."""
        layout = self.cache.prepare_static(seq_ids, query_lens, bucket.batch, bucket.query_len, bucket.context_pages)
        padded = torch.zeros(bucket.rows, dtype=torch.long)
        padded[layout.real_rows] = tokens
        wanted = layout.real_rows if logits_rows is None else layout.real_rows[logits_rows]
        inputs, feature_rows, logit_rows = to_device([torch.cat([padded, layout.packed()]), layout.real_rows, wanted],
                                                     self.cache.device)
        logits, features = self.run(bucket, [inputs], lambda own: self._padded_forward(own[0], bucket))
        return logits.index_select(0, logit_rows), None if features is None else features.index_select(0, feature_rows)

    def _padded_forward(self, inputs: torch.Tensor, bucket: Bucket) -> list[torch.Tensor | None]:
        """The forward a graph captures: padded token ids [B·Q] then `StaticLayout.packed()` → [logits [B·Q, V]
        float32, features [B·Q, L·H] or None]."""
        tokens, packed = inputs.split([bucket.rows, inputs.numel() - bucket.rows])
        meta = self.metadata(packed, bucket.batch, bucket.query_len, bucket.context_pages)
        out = self.model(tokens, self.cache, meta, feature_layer_ids=bucket.feature_layer_ids)
        return [out.logits, out.features]


@dataclass(frozen=True)
class RoundBucket:
    """The fixed shapes of one captured drafter round."""

    batch: int  # sequences (real ones first)
    context_rows: int  # new context rows per sequence
    context_pages: int  # key pages gathered per sequence
    sampling: str  # `RowSampling.mode` of the round's requests: "greedy", "temperature" or "filtered"


class StaticRound(PaddedForwards):
    """What the drafters' captured rounds share (`drafters/static_block.py`, `drafters/static_causal.py`): the
    drafter, its model and cache (`PaddedForwards`), and the bucket of a round. Rounds beyond
    max_batch sequences, max_context_rows new rows per sequence (a prompt's first round) or max_rows rows
    (B · N and B · γ; it sizes the shared [max_rows, V] buffer of the drafts' q) run eagerly (`bucket` returns
    None). Subclasses set `extra_rows`: the rows a round appends after the context rows (its keys' reach)."""

    extra_rows: int

    def __init__(self, drafter, *, graphs: bool, max_batch: int = 256, max_context_rows: int = 32, max_rows: int = 512,
                 kernel=None):
        super().__init__(drafter.cache, graphs=graphs, max_batch=max_batch, max_rows=max_rows, kernel=kernel)
        self.drafter, self.model, self.max_context_rows = drafter, drafter.model, max_context_rows

    def bucket(self, lengths: list[int], context_rows: list[int], samplings: list[SamplingParams]) -> RoundBucket | None:
        """The bucket of a round over sequences of lengths[b] cached rows bringing context_rows[b] new ones and
        drafting with samplings[b]."""
        if not lengths or len(lengths) > self.max_batch or max(context_rows) > self.max_context_rows:
            return None
        size = self.cache.page_size
        pages = max(-(-(length + n + self.extra_rows) // size) for length, n in zip(lengths, context_rows))
        bucket = RoundBucket(min(batch_bucket(len(lengths)), self.max_batch), power_of_two_bucket(max(max(context_rows), 1)),
                             power_of_two_bucket(pages), RowSampling.mode_of(samplings))
        return bucket if bucket.batch * max(bucket.context_rows, self.drafter.block_size) <= self.max_rows else None
