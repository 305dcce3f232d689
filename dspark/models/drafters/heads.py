"""DSpark's sequential heads and confidence head (paper §3.1–3.2.1, docs/design.md §2.3–2.4).

Sequential heads add a prefix-dependent bias B_k to the backbone's base logits U_k:
    p_k(v | x0, x<k) = softmax(U_k + B_k(x0, x<k, ·))                                   (paper Eq. 4)
Slot k's predecessor is x_{k−1}; slot 1's predecessor is the anchor x0 itself.

- Markov (paper Eq. 5): B(x_{k−1}) = W2 · W1[x_{k−1}], W1: V×r table, W2: r→V, rank r (default 256).
- Gated Markov (DeepSpec's `GatedMarkovHead`, not in the paper): g = σ(G[h_k; W1[x_{k−1}]] + b_G) ∈ R^r,
  B = W2 (g ⊙ W1[x_{k−1}]).
- RNN (paper Eq. 6): z_k = [s_{k−1}; W1[x_{k−1}]; h_k]; one Linear (2r+H → 3r, bias) split in this order
  into gate, candidate, output; s_k = σ(gate)⊙s_{k−1} + (1−σ(gate))⊙tanh(candidate); B_k = W2 tanh(output);
  s_0 = 0.
- Confidence (paper Eq. 7): c_k = σ(wᵀ[h_k; W1[x_{k−1}]] + b) (or σ(wᵀh_k + b) without the Markov feature),
  the conditional probability that slot k survives given slots < k were accepted.

Module and parameter names follow the released checkpoints (docs/design.md §7): `markov_head.markov_w1`,
`markov_head.markov_w2`, `markov_head.gate_proj`, `markov_head.joint_proj`, `confidence_head.proj`.
Every head offers a teacher-forced block API (training: previous tokens are data tokens) and a
single-step API with explicit state (inference: previous tokens are the ones just sampled).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("vanilla", "gated", "rnn")


class SequentialHead(nn.Module):
    """Shared W1 (V×r embedding) and W2 (r→V projection); subclasses define how the bias is formed."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot. prev_tokens [N] long, hidden [N, H] → (bias [N, V], new state)."""
        raise NotImplementedError

    def block_bias(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced bias for whole blocks. prev_tokens [N, K], hidden [N, K, H] → [N, K, V]."""
        state = self.initial_state(prev_tokens.shape[0], hidden)
        out = []
        for k in range(prev_tokens.shape[1]):
            bias, state = self.step(prev_tokens[:, k], hidden[:, k], state)
            out.append(bias)
        return torch.stack(out, dim=1)


class MarkovHead(SequentialHead):
    """Vanilla low-rank first-order transition bias (paper Eq. 5)."""

    def step(self, prev_tokens, hidden, state):
        return self.markov_w2(self.markov_w1(prev_tokens)), None

    def block_bias(self, prev_tokens, hidden):
        return self.markov_w2(self.markov_w1(prev_tokens))


class GatedMarkovHead(SequentialHead):
    """Markov bias with a gate computed from the backbone hidden state and the previous token."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, hidden_size, rank)
        self.gate_proj = nn.Linear(hidden_size + rank, rank, bias=True)

    def step(self, prev_tokens, hidden, state):
        emb = self.markov_w1(prev_tokens)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb.to(hidden.dtype)], dim=-1)))
        return self.markov_w2(gate.to(emb.dtype) * emb), None

    def block_bias(self, prev_tokens, hidden):
        emb = self.markov_w1(prev_tokens)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb.to(hidden.dtype)], dim=-1)))
        return self.markov_w2(gate.to(emb.dtype) * emb)


class RNNHead(SequentialHead):
    """Gated recurrent state over the block's prefix (paper Eq. 6)."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, hidden_size, rank)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank, bias=True)

    def initial_state(self, batch, like):
        return like.new_zeros(batch, self.rank)

    def step(self, prev_tokens, hidden, state):
        emb = self.markov_w1(prev_tokens).to(hidden.dtype)
        gate, candidate, output = self.joint_proj(torch.cat([state, emb, hidden], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(gate)
        state = g * state + (1 - g) * torch.tanh(candidate)
        return self.markov_w2(torch.tanh(output).to(self.markov_w2.weight.dtype)), state


SEQUENTIAL_HEADS = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RNNHead}


class ConfidenceHead(nn.Module):
    """c_k = σ(wᵀ[h_k; W1[x_{k−1}]] + b); returns the logit (σ is applied by the caller)."""

    def __init__(self, hidden_size: int, markov_rank: int = 0):
        super().__init__()
        self.proj = nn.Linear(hidden_size + markov_rank, 1, bias=True)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H], prev_embedding [..., r] or None → logits [...] float32."""
        x = hidden if prev_embedding is None else torch.cat([hidden, prev_embedding.to(hidden.dtype)], dim=-1)
        return self.proj(x).squeeze(-1).float()
