"""Anchor sampling and block construction for drafter training (docs/design.md §2.6; DeepSpec §1.6).

A sequence of S tokens with a loss mask (1 on response tokens) yields up to A blocks. An anchor is a
position i with loss_mask[i] = loss_mask[i+1] = 1 (the anchor is a response token and its first label is
supervised). Block slot k (0-based) of anchor a sits at position a + k and predicts the token at a + k + 1;
it is supervised iff that label index is < S and a response token, and supervision stops at the first
slot that is not (a contiguous prefix, as prefix-based verification consumes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Blocks:
    """Blocks of a batch of N sequences, A anchors each (padded with invalid dummy blocks)."""

    anchor_positions: torch.Tensor  # [N, A] long (dummy: 0)
    valid: torch.Tensor  # [N, A] bool
    labels: torch.Tensor  # [N, A, γ] long: token at anchor + k + 1 (0 where out of range)
    supervised: torch.Tensor  # [N, A, γ] bool: contiguous supervised prefix per block
    prev_tokens: torch.Tensor  # [N, A, γ] long: [anchor token, labels[..., :-1]] (teacher forcing)
    target_rows: torch.Tensor  # [N, A, γ] long: position whose target distribution predicts the label (a + k)

    @property
    def anchor_tokens(self) -> torch.Tensor:
        return self.prev_tokens[..., 0]


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [..., S] → bool [..., S]: position i can anchor a block (loss_mask[i] = loss_mask[i+1] = 1)."""
    mask = loss_mask.bool()
    candidates = torch.zeros_like(mask)
    candidates[..., :-1] = mask[..., :-1] & mask[..., 1:]
    return candidates


def sample_anchor_positions(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly draw up to `num_anchors` distinct valid anchors per sequence, sorted ascending.

    loss_mask [N, S] bool → (positions [N, A], valid [N, A]). Sequences with fewer candidates use all of
    them and pad with invalid position-0 dummies.
    """
    n, seq_len = loss_mask.shape
    candidates = anchor_candidates(loss_mask)
    keys = torch.rand(n, seq_len, generator=generator, device=loss_mask.device)
    keys = keys.masked_fill(~candidates, -1.0)  # candidates have keys in [0, 1): they win every top-k slot
    count = min(num_anchors, seq_len)
    top = torch.topk(keys, count, dim=1)
    valid = top.values >= 0
    positions = torch.where(valid, top.indices, torch.zeros_like(top.indices))
    order = torch.argsort(torch.where(valid, positions, torch.full_like(positions, seq_len)), dim=1)
    positions, valid = positions.gather(1, order), valid.gather(1, order)
    if count < num_anchors:
        pad = num_anchors - count
        positions = torch.cat([positions, positions.new_zeros(n, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(n, pad)], dim=1)
    return positions, valid


def build_blocks(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchor_positions: torch.Tensor, valid: torch.Tensor, block_size: int
) -> Blocks:
    """Labels, supervision mask and teacher-forcing inputs of every block. Shapes as in `Blocks`."""
    n, seq_len = input_ids.shape
    offsets = torch.arange(block_size, device=input_ids.device)
    rows = anchor_positions.unsqueeze(-1) + offsets  # a + k
    label_idx = rows + 1
    in_range = label_idx < seq_len
    safe = label_idx.clamp(max=seq_len - 1)
    flat = safe.view(n, -1)
    labels = input_ids.gather(1, flat).view_as(safe).masked_fill(~in_range, 0)
    response = loss_mask.bool().gather(1, flat).view_as(safe)
    supervised = (in_range & response & valid.unsqueeze(-1)).long().cumprod(-1).bool()
    anchor_tok = input_ids.gather(1, anchor_positions)
    prev = torch.cat([anchor_tok.unsqueeze(-1), labels[..., :-1]], dim=-1)
    return Blocks(anchor_positions, valid, labels, supervised, prev, rows.clamp(max=seq_len - 1))
