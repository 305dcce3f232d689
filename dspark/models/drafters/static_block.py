"""A DSpark / DFlash drafter's block pass in capture buckets' fixed shapes, replayed from captured graphs
(docs/architecture.md "Static step"; the target's step is `dspark.models.static_step`).

Each round the block pass appends every sequence's n_b new context rows (the fused target features of the
tokens accepted last round: K/V only) and runs its γ block rows, which attend to every key of their sequence
(docs/design.md §2.2). In the steady state n_b ≤ γ + 1, so the pass is padded to a bucket — B sequences
(1, 2, 4, 8, then multiples of 8), N context rows each (a power of two), P key pages (a power of two) — and
replayed from one CUDA graph per bucket. Padding rows write to the drafter cache's scratch page; padded
feature rows are zeros. The sequential head that follows (γ small steps with the requests' own sampling
parameters) stays eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.devices import to_device
from dspark.models.kv_cache import PagedKVCache, StaticLayout
from dspark.models.static_step import CapturedGraphs, batch_bucket, power_of_two_bucket


@dataclass(frozen=True)
class BlockBucket:
    batch: int  # sequences (real ones first)
    context_rows: int  # new K/V-only context rows per sequence
    context_pages: int  # key pages gathered per sequence


class StaticBlockPass:
    """`DSparkModel.block_pass` in a `BlockBucket`'s shapes, replayed from `CapturedGraphs` when `graphs`.
    Passes beyond max_batch sequences, max_context_rows new rows per sequence (a prompt's first pass) or
    max_rows rows run the ragged path (`bucket` returns None)."""

    def __init__(self, model, cache: PagedKVCache, *, graphs: bool, max_batch: int = 256, max_context_rows: int = 32,
                 max_rows: int = 1024):
        self.model, self.cache = model, cache
        self.max_batch, self.max_context_rows, self.max_rows = max_batch, max_context_rows, max_rows
        self.graphs = CapturedGraphs(cache, max_rows) if graphs else None
        self.replays = 0

    @property
    def captures(self) -> dict:
        return {} if self.graphs is None else self.graphs.captures

    def bucket(self, lengths: list[int], context_rows: list[int]) -> BlockBucket | None:
        """The bucket of a pass over sequences of lengths[b] cached rows bringing context_rows[b] new ones."""
        block_size = self.model.config.block_size
        if not lengths or len(lengths) > self.max_batch or max(context_rows) > self.max_context_rows:
            return None
        pages = max(-(-(length + n + block_size) // self.cache.page_size) for length, n in zip(lengths, context_rows))
        bucket = BlockBucket(min(batch_bucket(len(lengths)), self.max_batch), power_of_two_bucket(max(max(context_rows), 1)),
                             power_of_two_bucket(pages))
        fits = bucket.batch * max(block_size, bucket.context_rows) <= self.max_rows
        return bucket if fits else None

    @torch.inference_mode()
    def forward(self, handles: list[int], new_features: list[torch.Tensor], anchor_tokens: torch.Tensor,
                bucket: BlockBucket) -> torch.Tensor:
        """Append new_features[b] [n_b, L·H] as sequence b's context rows and run its block from anchor_tokens[b]
        (device, long [B]) → post-norm block hidden states [B, γ, H] (the caller drops the block's K/V)."""
        block_size, batch = self.model.config.block_size, len(handles)
        layout = self.cache.prepare_static(
            handles, [block_size] * batch, bucket.batch, block_size, bucket.context_pages,
            kv_only_lens=[f.shape[0] for f in new_features], kv_only_len=bucket.context_rows, causal=False)
        (packed, kv_rows) = to_device([layout.packed(), layout.real_kv_only_rows], self.cache.device)
        anchors = anchor_tokens.new_zeros(bucket.batch)
        anchors[:batch] = anchor_tokens
        features = new_features[0].new_zeros(bucket.batch * bucket.context_rows, new_features[0].shape[1])
        features.index_copy_(0, kv_rows, torch.cat(new_features))
        inputs = [torch.cat([anchors, packed]), features]
        self.replays += 1
        if self.graphs is not None:
            (hidden,) = self.graphs.replay(bucket, inputs, lambda own: self._padded_pass(own, bucket))
        else:
            (hidden,) = self._padded_pass(inputs, bucket)
        return hidden[: batch * block_size].view(batch, block_size, -1).clone()

    def _padded_pass(self, inputs: list[torch.Tensor], bucket: BlockBucket) -> list[torch.Tensor]:
        """The pass a graph captures: [anchors [B] then `StaticLayout.packed()`, features [B·N, L·H]] →
        [post-norm block hidden states [B·γ, H]]."""
        block_size = self.model.config.block_size
        anchors, packed = inputs[0].split([bucket.batch, inputs[0].numel() - bucket.batch])
        meta = StaticLayout.metadata(packed, bucket.batch, block_size, bucket.context_pages * self.cache.page_size,
                                     bucket.context_rows)
        return [self.model.block_pass(self.cache, meta, self.model.fuse_context(inputs[1]), anchors)]
