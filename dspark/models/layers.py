"""Building blocks of the Llama / Qwen2 / Qwen3 decoder, shared with the drafters.

Shapes use flattened ragged batches: T = total new tokens of all sequences in the forward.
Parameter names mirror Hugging Face's so checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.flex_paged import FlexPagedGroup
from dspark.models.kv_cache import AttentionGroup, AttentionMetadata
from dspark.models.rope import apply_rotary


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps): one `F.rms_norm`, which computes in float32 for half-precision
    inputs (as HF does) and returns x's dtype. HF rounds x / rms to that dtype before multiplying by w; here
    w is applied before the one rounding (≤ 1 unit in the last place apart in bf16; equal in float32). A weight
    of another dtype than x is applied after, promoting as HF does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:  # one kernel (the weight applied in float32 before the one rounding)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight


def fuse_projections(module: nn.Module) -> None:
    """Inference: every `Attention`'s q/k/v and every `GatedMLP`'s gate/up inside `module` as one GEMM each.
    The fused path runs only without autograd (a training forward uses the parameters themselves), and the
    parameters stay views of the fused weights: move the module to its device and dtype before fusing."""
    for child in module.modules():
        if isinstance(child, (Attention, GatedMLP)):
            child.fuse()


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [Σ out, in] (and bias) for linears that read the same input, so they run as one GEMM;
    each linear's parameters become views of it (no second copy of the weights; state_dict keeps HF's
    names). Returns (weight, bias or None)."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(weight[start: start + rows], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[start: start + rows], requires_grad=False)
            start += rows
    return weight, bias


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)). [T, H] → [T, H]."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # `fuse()`d weight and bias

    def fuse(self) -> None:
        """Inference: gate and up as one GEMM (`fuse_linears`)."""
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None or torch.is_grad_enabled():  # training: through the parameters, for their gradients
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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
        group = meta.groups[0]
        if isinstance(group, FlexPagedGroup):  # a static forward read in place (`dspark.models.flex_paged`)
            return group.attend(q, k_pool, v_pool, scale)
        return _group_attention(q, k_pool, v_pool, group, scale)
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
    if group.causal_lower_right:  # one sequence: causal band (or SDPA's own mask), GQA without packing
        keys = k_pool.index_select(0, group.gather_slots[0]).transpose(0, 1).unsqueeze(0)  # [1, Hkv, max_c, D]
        values = v_pool.index_select(0, group.gather_slots[0]).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=group.attn_mask,
                                             is_causal=group.attn_mask is None, scale=scale, enable_gqa=groups > 1)
        return out[0].transpose(0, 1)
    if group.num_tokens == batch * max_q:
        padded = q
    else:
        padded = q.new_zeros(batch * max_q, num_heads, head_dim)
        padded[group.padded_index] = q
    # [B, max_q, Hkv, G, D] -> [B, Hkv, G * max_q, D] (one query per sequence: a view)
    if max_q == 1:
        packed = padded.view(batch, num_kv, groups, head_dim)
    else:
        packed = padded.view(batch, max_q, num_kv, groups, head_dim).permute(0, 2, 3, 1, 4)
        packed = packed.reshape(batch, num_kv, groups * max_q, head_dim)
    keys = k_pool.index_select(0, group.flat_slots).view(batch, max_c, num_kv, head_dim).transpose(1, 2)  # [B, Hkv, max_c, D]
    values = v_pool.index_select(0, group.flat_slots).view(batch, max_c, num_kv, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=group.packed_mask(groups), scale=scale)
    if max_q == 1:
        return out.view(batch, num_heads, head_dim)
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
        self.eps = eps
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # `fuse()`d weight and bias
        self.qk_norm_weight: torch.Tensor | None = None  # [Hq + Hkv, D]: q_norm's for q heads, k_norm's for k

    def fuse(self) -> None:
        """Inference: q, k and v as one GEMM (`fuse_linears`); with Qwen3's per-head norms, q and k are then
        normalised and rotated together (one RMSNorm and one RoPE for both)."""
        self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if self.q_norm is not None:
            self.qk_norm_weight = torch.cat([self.q_norm.weight.detach().expand(self.num_heads, -1),
                                             self.k_norm.weight.detach().expand(self.num_kv_heads, -1)])

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., T, H] -> q [..., T, Hq, D], k [..., T, Hkv, D] (normed, rotated), v [..., T, Hkv, D]."""
        shape = x.shape[:-1]
        if self.qkv is not None and not torch.is_grad_enabled():  # training: unfused, for the gradients
            return self._project_fused(x, cos, sin)
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _project_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads, kv = self.num_heads, self.num_kv_heads
        qkv = F.linear(x, *self.qkv).view(*x.shape[:-1], heads + 2 * kv, self.head_dim)
        qk, v = qkv.split([heads + kv, kv], dim=-2)
        if self.qk_norm_weight is not None:
            qk = F.rms_norm(qk, (self.head_dim,), None, self.eps) * self.qk_norm_weight
        q, k = apply_rotary(qk, cos, sin).split([heads, kv], dim=-2)
        return q, k, v

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
        return self.o_proj(self.attend(q, k, v, k_pool, v_pool, meta).flatten(-2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Write the new k, v [T, Hkv, D] into the pools at `meta.slot_mapping`, then paged attention of q
        [T, Hq, D] → [T, Hq, D] (before o_proj)."""
        k_pool.index_copy_(0, meta.slot_mapping, k if k.dtype == k_pool.dtype else k.to(k_pool.dtype))
        v_pool.index_copy_(0, meta.slot_mapping, v if v.dtype == v_pool.dtype else v.to(v_pool.dtype))
        return paged_attention(q, k_pool, v_pool, meta, self.scale)
