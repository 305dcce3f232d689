"""A DSpark / DFlash drafter's round — block pass and sequential head — in capture buckets' fixed shapes,
replayed from one captured graph per bucket (docs/architecture.md, "the static step"; the target's step is
`dspark.models.static_step`).

Each round the block pass appends every sequence's n_b new context rows (the fused target features of the
tokens accepted last round: K/V only) and runs its γ block rows, which attend to every key of their sequence
(docs/design.md §2.2); the sequential head then samples the γ drafts left to right. In the steady state
n_b ≤ γ + 1, so the round is padded to a bucket — B sequences (1, 2, 4, 8, then multiples of 8), N context
rows each (a power of two), P key pages (a power of two) — and replayed from one CUDA graph per bucket.
Padding rows write to the drafter cache's scratch page; padded feature rows are zeros; padding sequences are
greedy. The head reads each request's sampling parameters as tensors (`RowSampling`,
`logits_to_probs_by_row`: the same distributions as `logits_to_probs`, value for value) and its uniforms, so
a round is captured once whatever mix of requests it serves; a round without uniforms for its sampled rows
(a caller's own generator) runs eagerly.
"""

from __future__ import annotations

import contextlib

import torch

from dspark.decoding.sampling import RowSampling, SamplingParams
from dspark.devices import to_device
from dspark.models.kv_cache import PagedKVCache
from dspark.models.static_step import RoundBucket, StaticRound


@contextlib.contextmanager
def blocks_dropped_after(cache: PagedKVCache, handles: list[int], new_features: list[torch.Tensor]):
    """Around a block pass: afterwards (or after a failure) each sequence keeps its context up to the anchor,
    the new context rows included, and drops the block's K/V."""
    anchors_at = [cache.length(h) + f.shape[0] for h, f in zip(handles, new_features)]
    try:
        yield
    finally:
        for handle, anchor in zip(handles, anchors_at):
            cache.truncate(handle, min(anchor, cache.length(handle)))


class StaticDraftStep(StaticRound):
    """A `DSparkDrafter`'s round (`DSparkModel.block_pass`, then `DSparkDrafter.sample_block` by row) in a
    `RoundBucket`'s shapes, replayed from `CapturedGraphs` when `graphs` (limits: `StaticRound`)."""

    @property
    def extra_rows(self) -> int:
        return self.drafter.block_size  # the block rows

    @torch.inference_mode()
    def propose(self, handles: list[int], new_features: list[torch.Tensor], anchor_tokens: torch.Tensor,
                samplings: list[SamplingParams], uniforms: torch.Tensor | None, bucket: RoundBucket
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append new_features[b] [n_b, L·H] (on the device) as sequence b's context rows, run its block from
        anchor_tokens[b] (host, long [B]) and sample its drafts with samplings[b] from uniforms[b] (host [B, γ];
        None only when every row is greedy) → tokens [B, γ], probs [B, γ, V] float32, confidence logits [B, γ]
        or None, as `DSparkDrafter.sample_block`. The block's K/V is dropped afterwards."""
        block_size, batch, padded = self.model.config.block_size, len(handles), bucket.batch
        if uniforms is None:
            uniforms = torch.zeros(batch, block_size, dtype=torch.float64)
        anchors = torch.zeros(padded, dtype=torch.long)
        anchors[:batch] = anchor_tokens
        padded_uniforms = torch.zeros(padded, block_size, dtype=uniforms.dtype)
        padded_uniforms[:batch] = uniforms
        temperature, top_k, top_p, greedy = RowSampling.host_tensors(samplings, padded)
        with blocks_dropped_after(self.cache, handles, new_features):
            layout = self.cache.prepare_static(
                handles, [block_size] * batch, padded, block_size, bucket.context_pages,
                kv_only_lens=[f.shape[0] for f in new_features], kv_only_len=bucket.context_rows, causal=False)
            longs, kv_rows, floats, greedy, padded_uniforms = to_device(
                [torch.cat([anchors, top_k, layout.packed()]), layout.real_kv_only_rows,
                 torch.cat([temperature, top_p]), greedy, padded_uniforms], self.cache.device)
            features = new_features[0].new_zeros(padded * bucket.context_rows, new_features[0].shape[1])
            features.index_copy_(0, kv_rows, torch.cat(new_features))
            inputs = [longs, features, floats, greedy, padded_uniforms]
            tokens, probs, confidence = self.run(bucket, inputs, lambda own: self._padded_round(own, bucket))
        probs = probs[: batch * block_size].view(batch, block_size, -1).clone()
        return tokens[:batch].clone(), probs, None if confidence is None else confidence[:batch].clone()

    def _padded_round(self, inputs: list[torch.Tensor], bucket: RoundBucket) -> list[torch.Tensor | None]:
        """The round a graph captures: [anchors [B], top-k [B] and `StaticLayout.packed()`; features [B·N, L·H];
        temperature and top-p [2B]; greedy [B]; uniforms [B, γ]] → [tokens [B, γ], probs [B·γ, V],
        confidence logits [B, γ] or None]."""
        block_size, batch = self.model.config.block_size, bucket.batch
        longs, features, floats, greedy, uniforms = inputs
        anchors, top_k, packed = longs.split([batch, batch, longs.numel() - 2 * batch])
        temperature, top_p = floats.split([batch, batch])
        meta = self.metadata(packed, batch, block_size, bucket.context_pages, bucket.context_rows)
        hidden = self.model.block_pass(self.cache, meta, self.model.fuse_context(features), anchors)
        rows = RowSampling(temperature, top_k, top_p, greedy, bucket.sampling)
        tokens, probs, confidence = self.drafter.sample_block(hidden.view(batch, block_size, -1), anchors, rows, None,
                                                              uniforms)
        return [tokens, probs.reshape(batch * block_size, -1), confidence]
