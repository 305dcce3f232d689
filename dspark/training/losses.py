"""Drafter losses (docs/design.md §2.5; paper §3.3, Eqs. 9–12), computed in float32 in chunks of blocks.

Per supervised slot k (0-based in its block), weight w_k = exp(−k / decay) with decay = 4 (DeepSpec's
constant; the paper writes exp(−(k−1)/γ) — we follow the released recipe, docs/design.md §2.5).
p_d = softmax(draft logits incl. the sequential bias), p_t = softmax(target lm_head(target final hidden at
the position that predicts the same label)), both float32:
    L_ce   = Σ w_k · (−log p_d,k(x*_k))
    L_tv   = Σ w_k · ‖p_d,k − p_t,k‖₁                  (the un-halved L1, as in the paper's Eq. 10)
    L_conf = Σ w_k · BCE(c_k, c*_k),   c*_k = clamp(1 − ½‖p_d,k − p_t,k‖₁, 0, 1), detached  (Eq. 8)
    L_gc   = Σ w_k · BCE(g_k, g*_k),   g*_k = 1[argmax p_d,k = argmax p_t,k]    (dspark's greedy confidence
             output, docs/design.md §2.4: the survival rule of greedy verification; only with that head)
    L      = α_ce L_ce + α_tv L_tv + α_conf L_conf + α_gc L_gc   (defaults 0.1 / 0.9 / 1.0 / 1.0; DFlash: CE only)
Each term is a weighted mean Σ w·x / Σ w. The denominator can be passed in: a data-parallel trainer
all-reduces Σ w first, so the result is a global token-weighted mean across ranks.

Memory: the [blocks × γ × V] float32 tensors are the hot spot (512 anchors × 7 × 151,936 × 4 B = 2.2 GB
each, several alive at once plus autograd buffers). Blocks are processed `chunk_blocks` at a time, each
chunk under activation checkpointing, so only one chunk's vocabulary-sized tensors exist at a time, in the
forward and in the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    decay: float = 4.0
    greedy_conf: float = 1.0

    @classmethod
    def dflash(cls) -> "LossWeights":
        return cls(ce=1.0, tv=0.0, conf=0.0, greedy_conf=0.0)


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar, differentiable
    ce: torch.Tensor  # scalars (detached)
    tv: torch.Tensor
    conf: torch.Tensor
    greedy_conf: torch.Tensor  # the greedy confidence output's BCE (0 without that head)
    acceptance_per_position: torch.Tensor  # [γ]: mean teacher-forced c*_k over supervised slots
    expected_tau: torch.Tensor  # mean over blocks of 1 + Σ_k Π_{i≤k} c*_i (supervised prefix)
    denominator: torch.Tensor  # Σ w used


def position_weights(supervised: torch.Tensor, decay: float) -> torch.Tensor:
    """supervised [..., γ] bool → w [..., γ] float32 = exp(−k/decay) on supervised slots, else 0."""
    block_size = supervised.shape[-1]
    w = torch.exp(-torch.arange(block_size, dtype=torch.float32, device=supervised.device) / decay)
    return w * supervised.float()


def _chunk_terms(draft_logits_fn, hidden, prev, target_hidden, lm_head_weight, labels, weights, need_target):
    """One chunk: ([4] = (Σ w·ce, Σ w·l1, Σ w·bce, Σ w·greedy bce), detached acceptance labels c* [m, γ])."""
    draft_logits, conf_logits, greedy_logits = draft_logits_fn(hidden, prev)
    log_pd = torch.log_softmax(draft_logits.float(), dim=-1)
    ce = -log_pd.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    target_logits = F.linear(target_hidden, lm_head_weight).float() if need_target else None
    if need_target:
        l1 = (log_pd.exp() - torch.softmax(target_logits, dim=-1)).abs().sum(-1)
    else:
        l1 = torch.zeros_like(ce)
    acceptance = (1 - 0.5 * l1).clamp(0, 1).detach()
    zeros = torch.zeros_like(ce)
    bce = zeros if conf_logits is None else \
        F.binary_cross_entropy_with_logits(conf_logits.float(), acceptance, reduction="none")
    greedy_bce = zeros
    if greedy_logits is not None and target_logits is not None:
        matches = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float()
        greedy_bce = F.binary_cross_entropy_with_logits(greedy_logits.float(), matches, reduction="none")
    sums = [(weights * term).sum() for term in (ce, l1, bce, greedy_bce)]
    return torch.stack(sums), acceptance


def drafter_block_loss(
    draft_logits_fn,
    hidden: torch.Tensor,
    prev_tokens: torch.Tensor,
    labels: torch.Tensor,
    supervised: torch.Tensor,
    target_final_hidden: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    *,
    weights: LossWeights = LossWeights(),
    denominator: torch.Tensor | None = None,
    chunk_blocks: int = 64,
) -> LossOutput:
    """The DSpark (or, with LossWeights.dflash(), DFlash) loss over M blocks.

    draft_logits_fn(hidden [m, γ, H], prev [m, γ]) → (logits [m, γ, V], confidence logits [m, γ] or None,
    greedy confidence logits [m, γ] or None): the drafter's teacher-forced heads (`DSparkModel.heads`). hidden [M, γ, H]: post-norm block states;
    prev_tokens, labels [M, γ] long; supervised [M, γ] bool; target_final_hidden [M, γ, H] (the target's
    post-norm state at the position predicting each label; may be None when weights.tv = weights.conf = 0);
    lm_head_weight [V, H]: the frozen head shared with the target.
    """
    w = position_weights(supervised, weights.decay)
    denom = w.sum() if denominator is None else denominator
    need_target = weights.tv > 0 or weights.conf > 0 or weights.greedy_conf > 0
    if need_target and target_final_hidden is None:
        raise ValueError("the TV and confidence terms need the target's final hidden states")
    sums = torch.zeros(4, device=hidden.device)
    acceptances = []
    total_blocks = hidden.shape[0]
    for start in range(0, total_blocks, chunk_blocks):
        sl = slice(start, min(start + chunk_blocks, total_blocks))
        if not bool(supervised[sl].any()):
            acceptances.append(torch.zeros(supervised[sl].shape, device=hidden.device))
            continue
        target = target_final_hidden[sl] if need_target else None
        args = (draft_logits_fn, hidden[sl], prev_tokens[sl], target, lm_head_weight, labels[sl], w[sl], need_target)
        if torch.is_grad_enabled():  # also when only the heads' parameters need gradients
            chunk_sums, acceptance = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            chunk_sums, acceptance = _chunk_terms(*args)
        sums = sums + chunk_sums
        acceptances.append(acceptance)
    safe = denom.clamp_min(1e-12)
    ce, tv, conf, greedy_conf = (sums[i] / safe for i in range(4))
    total = weights.ce * ce + weights.tv * tv + weights.conf * conf + weights.greedy_conf * greedy_conf
    with torch.no_grad():
        acceptance = torch.cat(acceptances).float() * supervised.float()
        per_position = acceptance.sum(0) / supervised.float().sum(0).clamp_min(1)
        survival = acceptance.cumprod(-1) * supervised.float()
        blocks = supervised[:, 0]
        tau = (1 + survival.sum(-1))[blocks].mean() if bool(blocks.any()) else torch.tensor(math.nan)
    return LossOutput(total, ce.detach(), tv.detach(), conf.detach(), greedy_conf.detach(), per_position, tau, denom)
