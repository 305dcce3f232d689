"""Building blocks of the Llama / Qwen2 / Qwen3 decoder, shared with the drafters.

Shapes use flattened ragged batches: T = total new tokens of all sequences in the forward.
Parameter names mirror Hugging Face's so checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.kv_cache import AttentionGroup, AttentionMetadata
from dspark.models.rope import apply_rotary


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), the statistic computed in float32 (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)). [T, H] → [T, H]."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of T ragged queries against each sequence's cached keys (new ones included), one
    padded call per `AttentionGroup` of the metadata.

    q: [T, Hq, D]; pools: [slots, Hkv, D]. Returns [T, Hq, D].
    GQA packing: the G = Hq/Hkv query heads sharing a KV head are laid out as G·max_q query rows of that
    head, so each KV head is read once for all its query heads and all new tokens of a sequence (docs/design.md §6).
    """
    if len(meta.groups) == 1 and meta.groups[0].token_rows is None:
        return _group_attention(q, k_pool, v_pool, meta.groups[0], scale)
    out = torch.empty_like(q)
    for group in meta.groups:
        out[group.token_rows] = _group_attention(q[group.token_rows], k_pool, v_pool, group, scale)
    return out


def _group_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group: AttentionGroup,
                     scale: float) -> torch.Tensor:
    batch, max_q, max_c = group.batch_size, group.max_query_len, group.gather_slots.shape[1]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_pool.shape[1]
    groups = num_heads // num_kv
    if group.num_tokens == batch * max_q:
        padded = q
    else:
        padded = q.new_zeros(batch * max_q, num_heads, head_dim)
        padded[group.padded_index] = q
    # [B, max_q, Hkv, G, D] -> [B, Hkv, G * max_q, D]
    packed = padded.view(batch, max_q, num_kv, groups, head_dim).permute(0, 2, 3, 1, 4)
    packed = packed.reshape(batch, num_kv, groups * max_q, head_dim)
    flat_slots = group.gather_slots.view(-1)
    keys = k_pool.index_select(0, flat_slots).view(batch, max_c, num_kv, head_dim).transpose(1, 2)  # [B, Hkv, max_c, D]
    values = v_pool.index_select(0, flat_slots).view(batch, max_c, num_kv, head_dim).transpose(1, 2)
    mask = group.attn_mask
    if mask is not None and groups > 1:
        mask = mask.expand(batch, 1, max_q, max_c).repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scale)
    out = out.view(batch, num_kv, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch * max_q, num_heads, head_dim)
    return out if group.num_tokens == batch * max_q else out[group.padded_index]


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE, optional biases and optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., T, H] -> q [..., T, Hq, D], k [..., T, Hkv, D] (normed, rotated), v [..., T, Hkv, D]."""
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x, cos, sin)
        k_pool.index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
        v_pool.index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
        out = paged_attention(q, k_pool, v_pool, meta, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))
