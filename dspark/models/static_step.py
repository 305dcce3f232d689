"""Static-shape decoding and verification forwards, replayed from captured graphs (docs/architecture.md
"Static step"; issue 17 item 2).

Eager PyTorch launches each kernel from Python; at one request on a GPU a 36-layer target's ~450 launches per
step take longer than the kernels themselves. A forward whose sequences each bring at most `max_query_len`
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

from dataclasses import dataclass
from typing import Callable

import torch

from dspark.devices import to_device
from dspark.models.kv_cache import AttentionGroup, AttentionMetadata, PagedKVCache, StaticLayout


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
    """One bucket's graph: it reads `inputs` (token ids, then `StaticLayout.packed()`) and writes `logits`
    [B·Q, V] and `features` [B·Q, L·H] (views of the shared output buffers)."""

    inputs: torch.Tensor
    graph: torch.cuda.CUDAGraph | HostGraph
    logits: torch.Tensor
    features: torch.Tensor | None


class StaticStep:
    """Runs a `DecoderModel` forward in a capture bucket's fixed shapes, from a captured graph when `graphs`.

    max_batch, max_query_len: the largest bucket; max_rows: the most rows (B · Q) one bucket may have (it sizes
    the shared output buffers: max_rows × vocabulary float32 logits). Forwards beyond them run eagerly
    (`TargetRunner.forward` asks `fits` first)."""

    def __init__(self, model, cache: PagedKVCache, *, graphs: bool, max_batch: int = 256, max_query_len: int = 32,
                 max_rows: int = 512):
        if min(max_batch, max_query_len, max_rows) < 1:
            raise ValueError("max_batch, max_query_len and max_rows must be positive")
        self.model, self.cache, self.graphs = model, cache, graphs
        self.max_batch, self.max_query_len, self.max_rows = max_batch, max_query_len, max_rows
        self.captures: dict[Bucket, Capture] = {}
        self.replays = 0  # forwards run in a bucket's shapes (graph replays when `graphs`)
        self._generation = cache.generation
        self._pool = None
        self._outputs: dict[str, torch.Tensor] = {}  # shared by every capture: "logits" [max_rows, V], "features"

    def bucket(self, query_lens: list[int], lengths: list[int], feature_layer_ids: tuple[int, ...]) -> Bucket | None:
        """The bucket of a forward appending query_lens[b] tokens to sequences of lengths[b] cached tokens, or
        None when it does not fit one (too many sequences, rows or tokens per sequence)."""
        if not query_lens or len(query_lens) > self.max_batch or max(query_lens) > self.max_query_len:
            return None
        size = self.cache.page_size
        pages = max(-(-(length + q) // size) for length, q in zip(lengths, query_lens))
        bucket = Bucket(batch_bucket(len(query_lens)), power_of_two_bucket(max(query_lens)),
                        power_of_two_bucket(pages), tuple(feature_layer_ids))
        if bucket.batch > self.max_batch:
            bucket = Bucket(self.max_batch, bucket.query_len, bucket.context_pages, bucket.feature_layer_ids)
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
        self.replays += 1
        if self.graphs:
            capture = self._capture(bucket)
            capture.inputs.copy_(inputs, non_blocking=True)
            capture.graph.replay()
            logits, features = capture.logits, capture.features
        else:
            logits, features = self._padded_forward(inputs, bucket)
        return logits.index_select(0, logit_rows), None if features is None else features.index_select(0, feature_rows)

    def _padded_forward(self, inputs: torch.Tensor, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward a graph captures: inputs as `Capture.inputs` → logits [B·Q, V] float32, features
        [B·Q, L·H] or None. Only device operations on fixed shapes: the attention mask comes from the layout's
        query starts and context lengths (`StaticLayout`)."""
        batch, query_len, width = bucket.batch, bucket.query_len, bucket.context_pages * self.cache.page_size
        rows = bucket.rows
        tokens, positions, slots, query_starts, context_lens, gather = inputs.split(
            [rows, rows, rows, batch, batch, batch * width])
        keys = torch.arange(width, device=inputs.device).view(1, 1, width)
        last_key = (query_starts.view(batch, 1) + torch.arange(query_len, device=inputs.device)).unsqueeze(-1)
        mask = (keys < context_lens.view(batch, 1, 1)) & (keys <= last_key)  # [B, Q, C]
        group = AttentionGroup(token_rows=None, gather_slots=gather.view(batch, width),
                               padded_index=tokens.new_zeros(0), attn_mask=mask.unsqueeze(1),
                               max_query_len=query_len, num_tokens=rows)
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, query_lens=[query_len] * batch,
                                 context_lens=[width] * batch, groups=[group])
        out = self.model(tokens, self.cache, meta, feature_layer_ids=bucket.feature_layer_ids)
        return out.logits, out.features

    def _capture(self, bucket: Bucket) -> Capture:
        """The bucket's capture, made now if it is new (or the KV pools were re-allocated since)."""
        if self.cache.generation != self._generation:
            self.captures.clear()
            self._generation = self.cache.generation
        if bucket in self.captures:
            return self.captures[bucket]
        idle = StaticLayout.idle(bucket.batch, bucket.query_len, bucket.context_pages * self.cache.page_size,
                                 self.cache.scratch_slot)
        inputs = torch.cat([torch.zeros(bucket.rows, dtype=torch.long), idle.packed()]).to(self.cache.device)
        logits_out, features_out = self._output_views(bucket)

        def run() -> None:
            logits, features = self._padded_forward(inputs, bucket)
            logits_out.copy_(logits)
            if features is not None:
                features_out.copy_(features)

        graph = self._capture_cuda(run) if self.cache.device.type == "cuda" else HostGraph(run)
        self.captures[bucket] = Capture(inputs, graph, logits_out, features_out)
        return self.captures[bucket]

    def _output_views(self, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bucket's views of the shared output buffers, allocated outside any capture so they outlive every
        graph. A bucket wanting more feature columns than the buffer has replaces it, and drops the captures
        that wrote into the old one."""
        device, config = self.cache.device, self.model.config
        if "logits" not in self._outputs:
            self._outputs["logits"] = torch.empty(self.max_rows, config.vocab_size, dtype=torch.float32, device=device)
        width = len(bucket.feature_layer_ids) * config.hidden_size
        if not width:
            return self._outputs["logits"][: bucket.rows], None
        if "features" not in self._outputs or self._outputs["features"].shape[1] < width:
            self.captures = {b: c for b, c in self.captures.items() if not b.feature_layer_ids}
            dtype = next(self.model.parameters()).dtype
            self._outputs["features"] = torch.empty(self.max_rows, width, dtype=dtype, device=device)
        return self._outputs["logits"][: bucket.rows], self._outputs["features"][: bucket.rows, :width]

    def _capture_cuda(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (lazy initialisations, cuBLAS workspaces, compiled kernels), then capture."""
        device = self.cache.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            run()
        return graph
