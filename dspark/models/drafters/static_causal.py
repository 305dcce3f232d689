"""An EAGLE-3 or MTP drafter's round in capture buckets' fixed shapes, replayed from one captured graph per
bucket (docs/architecture.md, "the static step"; the DSpark round is `static_block.py`).

A round of `CausalFeatureDrafter` appends each sequence's n_b new context rows (causal, kept), then drafts γ
tokens one at a time: the last context row's output o predicts the first draft, and each further draft runs
one more row (EAGLE-3's `draft_step`, dropped after the round). In the steady state 1 ≤ n_b ≤ γ + 1, so the
whole round — the context rows and every draft step, with their per-row sampling (`RowSampling`) — is padded
to a bucket of B sequences (1, 2, 4, 8, then multiples of 8), N context rows each (a power of two) and P key
pages (a power of two, enough for the last draft row), and replayed from one graph. Every sequence drafts all
γ slots; a slot past the request's own limit is zeroed afterwards, as the eager round leaves it. Padding rows
write to the drafter cache's scratch page. A round with a sequence that brings no new row, or sampled rows
without uniforms, runs eagerly.
"""

from __future__ import annotations

import torch

from dspark.decoding.sampling import RowSampling, logits_to_probs_by_row, sample
from dspark.devices import to_device
from dspark.models.drafters.base import DraftInput, DraftProposal
from dspark.models.kv_cache import StaticLayout
from dspark.models.static_step import RoundBucket, StaticRound


class StaticCausalRound(StaticRound):
    """A `CausalFeatureDrafter`'s round in a `RoundBucket`'s shapes, replayed from `CapturedGraphs` when `graphs`
    (limits: `StaticRound`)."""

    @property
    def extra_rows(self) -> int:
        return self.drafter.block_size - 1  # the draft steps' rows

    @torch.inference_mode()
    def propose(self, batch: list[DraftInput], handles: list[int], todo: list[tuple], limits: list[int],
                uniforms: torch.Tensor | None, bucket: RoundBucket) -> DraftProposal:
        """The round of `CausalFeatureDrafter.propose` for a batch whose every sequence brings new rows (`todo`,
        in batch order: (seq_id, handle, features [n_b, F], next tokens [n_b]) on the device); uniforms [B, γ]
        on the host (None only when every row is greedy). Keeps the context rows and each sequence's last row
        output; drops the draft rows."""
        steps, count, padded = self.drafter.block_size, len(batch), bucket.batch
        rows_per = [t[2].shape[0] for t in todo]
        if uniforms is None:
            uniforms = torch.zeros(count, steps, dtype=torch.float64)
        padded_uniforms = torch.zeros(padded, steps, dtype=uniforms.dtype)
        padded_uniforms[:count] = uniforms
        temperature, top_k, top_p, greedy = RowSampling.host_tensors([item.sampling for item in batch], padded)
        last_rows = torch.tensor([b * bucket.context_rows + n - 1 for b, n in enumerate(rows_per)]
                                 + [b * bucket.context_rows for b in range(count, padded)], dtype=torch.long)
        starts = [self.cache.length(h) for h in handles]
        try:
            layouts = [self.cache.prepare_static(handles, rows_per, padded, bucket.context_rows, bucket.context_pages)]
            verified = [self.cache.length(h) for h in handles]
            for _ in range(steps - 1):
                layouts.append(self.cache.prepare_static(handles, [1] * count, padded, 1, bucket.context_pages))
            longs, real_rows, floats, greedy, padded_uniforms = to_device(
                [torch.cat([last_rows, top_k] + [layout.packed() for layout in layouts]), layouts[0].real_rows,
                 torch.cat([temperature, top_p]), greedy, padded_uniforms], self.cache.device)
            first = todo[0][2]
            features = first.new_zeros(padded * bucket.context_rows, first.shape[1])
            features.index_copy_(0, real_rows, torch.cat([t[2] for t in todo]))
            next_tokens = torch.zeros(padded * bucket.context_rows, dtype=torch.long, device=first.device)
            next_tokens.index_copy_(0, real_rows, torch.cat([t[3] for t in todo]))
            inputs = [torch.cat([next_tokens, longs]), features, floats, greedy, padded_uniforms]
            tokens, probs, last = self.run(bucket, inputs, lambda own: self._padded_round(own, bucket))
            for b, (seq_id, *_) in enumerate(todo):
                self.drafter._last_hidden[seq_id] = last[b].clone()
        except BaseException:
            for handle, start in zip(handles, starts):
                self.cache.truncate(handle, min(start, self.cache.length(handle)))
            raise
        for handle, length in zip(handles, verified):
            self.cache.truncate(handle, length)
        width = max(limits)
        wanted = to_device([torch.arange(width).unsqueeze(0) < torch.tensor(limits).unsqueeze(1)], tokens.device)[0]
        tokens = tokens[:count, :width] * wanted
        probs = probs[: count * steps].view(count, steps, -1)[:, :width] * wanted.unsqueeze(-1)
        return DraftProposal(tokens=tokens, lengths=torch.tensor(limits, dtype=torch.long), probs=probs)

    def _padded_round(self, inputs: list[torch.Tensor], bucket: RoundBucket) -> list[torch.Tensor]:
        """The round a graph captures: [next tokens [B·N], last context row [B], top-k [B] and the `packed()`
        layouts of the context rows and of each draft step; features [B·N, F]; temperature and top-p [2B];
        greedy [B]; uniforms [B, γ]] → [tokens [B, γ], probs [B·γ, V], the last context rows' outputs [B, H]]."""
        steps, batch, context = self.drafter.block_size, bucket.batch, bucket.context_rows
        pages = bucket.context_pages
        longs, features, floats, greedy, uniforms = inputs
        step_size = StaticLayout.packed_size(batch, 1, pages)
        next_tokens, last_rows, top_k, context_layout, *step_layouts = longs.split(
            [batch * context, batch, batch, StaticLayout.packed_size(batch, context, pages)] + [step_size] * (steps - 1))
        temperature, top_p = floats.split([batch, batch])
        rows = RowSampling(temperature, top_k, top_p, greedy, bucket.sampling)
        meta = self.metadata(context_layout, batch, context, pages)
        last = self.model.ingest_pass(self.cache, meta, features, next_tokens).index_select(0, last_rows)
        hidden, tokens, probs = last, [], []
        for k in range(steps):
            if k > 0:
                meta = self.metadata(step_layouts[k - 1], batch, 1, pages)
                hidden = self.model.draft_step_pass(self.cache, meta, hidden, tokens[-1])
            q = logits_to_probs_by_row(self.model.logits(hidden), rows)
            token = q.argmax(-1)
            if rows.mode != "greedy":
                token = torch.where(rows.greedy, token, sample(q, uniforms=uniforms[:, k]))
            tokens.append(token)
            probs.append(q)
        return [torch.stack(tokens, dim=1), torch.stack(probs, dim=1).reshape(batch * steps, -1), last]
