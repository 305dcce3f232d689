"""Lossless verification of drafted tokens: speculative rejection sampling (docs/design.md §1; Leviathan et al. 2023,
Chen et al. 2023), batched over sequences with a different verification length per sequence (0 allowed).

For sequence b with drafts d_1..d_ℓ drawn from q_1..q_ℓ and target distributions p_1..p_{ℓ+1}:
accept d_k with probability min(1, p_k(d_k) / q_k(d_k)), left to right; at the first rejection k emit a
correction token from norm(max(0, p_k − q_k)); if all ℓ are accepted emit a bonus token from p_{ℓ+1}.
With ℓ = 0 this is exactly plain sampling from p_1, so plain decoding runs through the same code.

q is the exact float32 distribution each draft was sampled from, or None for deterministic drafters
(n-gram lookup): then q_k is the one-hot of d_k, acceptance probability is p_k(d_k), and the residual is
p_k with d_k removed. With greedy sampling p is one-hot, so this reduces to argmax matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.decoding.sampling import sample


@dataclass
class VerificationResult:
    num_accepted: torch.Tensor  # [B] long: accepted drafts per sequence (0..ℓ_b)
    next_tokens: torch.Tensor  # [B] long: correction token (after a rejection) or bonus token

    def emitted(self, draft_tokens: torch.Tensor) -> list[list[int]]:
        """Per sequence: accepted drafts followed by the correction/bonus token."""
        out = []
        for b, n in enumerate(self.num_accepted.tolist()):
            out.append(draft_tokens[b, :n].tolist() + [int(self.next_tokens[b])])
        return out


def verify(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    verify_lens: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> VerificationResult:
    """Batched rejection sampling.

    target_probs: [B, L+1, V] float32, row b valid for slots 0..ℓ_b (slot k is p_{k+1}; padding ignored).
    draft_tokens: [B, L] long (padding ignored). verify_lens: [B] long, ℓ_b ∈ [0, L].
    draft_probs:  [B, L, V] float32 distributions the drafts were sampled from, or None (one-hot drafts).
    uniforms: [B, W ≥ L+1] in [0, 1): column k decides slot k's acceptance, the last column draws the
    correction or bonus token (per-request draws, `dspark.decoding.randomness`); None = from `generator`.
    """
    batch, slots, vocab = target_probs.shape
    max_len = slots - 1
    device = target_probs.device
    if draft_tokens.shape != (batch, max_len):
        raise ValueError(f"draft_tokens {tuple(draft_tokens.shape)} does not match target_probs {tuple(target_probs.shape)}")
    verify_lens = verify_lens.to(device)
    rows = torch.arange(batch, device=device)
    if max_len > 0:
        p_of_draft = target_probs[:, :max_len].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        if draft_probs is None:
            q_of_draft = torch.ones_like(p_of_draft)
        else:
            q_of_draft = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        accept_u = (torch.rand(batch, max_len, generator=generator, device=device) if uniforms is None
                    else uniforms[:, :max_len].to(device, p_of_draft.dtype))
        # u < p/q  ⇔  u·q < p; accepted with probability min(1, p/q). q(d) > 0 since d was drawn from q.
        accepted = accept_u * q_of_draft < p_of_draft
        accepted &= torch.arange(max_len, device=device).unsqueeze(0) < verify_lens.unsqueeze(1)
        num_accepted = accepted.to(torch.long).cumprod(-1).sum(-1)
    else:
        num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    stop_slot = num_accepted  # slot whose distribution produces the next token
    final_p = target_probs[rows, stop_slot]  # [B, V]
    rejected = num_accepted < verify_lens
    # Residual for every row (no host read to skip it); rows without a rejection keep p.
    slot = stop_slot.clamp(max=max(max_len - 1, 0))
    if max_len == 0:
        q_at = torch.zeros_like(final_p)
    elif draft_probs is None:
        q_at = torch.zeros_like(final_p).scatter_(-1, draft_tokens[rows, slot].unsqueeze(-1), 1.0)
    else:
        q_at = draft_probs[rows, slot]
    residual = (final_p - q_at).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # mass is 0 only if p == q at that slot, where rejection has probability 0; guard numerically.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), final_p)
    final_p = torch.where(rejected.unsqueeze(-1), residual, final_p)
    final_u = None if uniforms is None else uniforms[:, -1]
    return VerificationResult(num_accepted=num_accepted, next_tokens=sample(final_p, generator, final_u))


def verify_greedy(target_argmax: torch.Tensor, draft_tokens: torch.Tensor, verify_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify` for greedy sequences, from the target's argmax instead of its one-hot distributions.

    target_argmax: [B, L+1] long (slot k: argmax of p_{k+1}); draft_tokens: [B, L]; verify_lens: [B].
    Returns (num_accepted [B], next_tokens [B]): d_k survives while it equals the argmax (acceptance
    probability p_k(d_k) ∈ {0, 1}), and the next token is the argmax at the first non-surviving slot (the
    residual of a one-hot p without d_k's mass is p itself; after ℓ survivors, the bonus argmax)."""
    max_len = draft_tokens.shape[1]
    if max_len:
        live = torch.arange(max_len, device=draft_tokens.device) < verify_lens.unsqueeze(1)
        num_accepted = ((draft_tokens == target_argmax[:, :max_len]) & live).to(torch.long).cumprod(-1).sum(-1)
    else:
        num_accepted = torch.zeros(draft_tokens.shape[0], dtype=torch.long, device=draft_tokens.device)
    return num_accepted, target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
