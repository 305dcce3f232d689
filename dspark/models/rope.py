"""Rotary position embeddings (RoPE) and the context-extension variants Llama / Qwen configs use.

Supported `rope_type`s: "default", "linear" (position interpolation), "yarn" (YaRN, arXiv 2309.00071,
as used by Qwen2/Qwen3 long-context configs), "llama3" (Llama 3.1 frequency smoothing).

Deliberately unsupported: "dynamic" (NTK) and "longrope". Both recompute the frequencies from the
current sequence length, so a token's logits would depend on how many tokens share its forward pass;
verification of several draft tokens in one pass could then disagree with one-token decoding, which
breaks lossless speculative decoding. Loading such a config fails with a clear error instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters, normalised from either `rope_scaling` (older configs) or `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32 on the CPU, attention_scaling) — cos/sin are multiplied by the latter."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope, max_position_embeddings), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, head_dim, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig, max_pos: int) -> torch.Tensor:
    factor = rope.factor
    old_context = rope.original_max_position_embeddings or max_pos
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings or max_pos
    factor = rope.factor if rope.factor is not None else max_pos / original

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep_extrapolation = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolation) + extrapolation * keep_extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for arbitrary positions, computed on the fly in float32 (no max-length table), in the form
    `apply_rotary` takes: a head axis included, and rotate-half's sign folded into sin.

    `forward(positions [..., T], dtype) -> (cos [..., T, 1, head_dim], sin [..., T, 1, head_dim])`, where the
    first half of sin is negated (rotate_half(x) = (−x₂, x₁) = roll(x, D/2) ⊙ (−1…−1, 1…1)).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
        super().__init__()
        inv_freq, scaling = rope_inverse_frequencies(rope, head_dim, max_position_embeddings)
        self.inv_freq = inv_freq  # plain attribute: stays float32 when the module is cast to bf16
        self.attention_scaling = scaling
        half = head_dim // 2
        self.sin_sign = torch.cat([torch.full((half,), -scaling, device="cpu"), torch.full((half,), scaling, device="cpu")])

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            self.sin_sign = self.sin_sign.to(positions.device)
        freqs = positions.to(torch.float32).unsqueeze(-1).unsqueeze(-1) * self.inv_freq  # [..., T, 1, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.sin_sign).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, heads, head_dim]; cos/sin: [..., T, 1, head_dim] from `RotaryEmbedding` (sin signed).
    Rotate-half convention (HF Llama/Qwen): x·cos + rotate_half(x)·sin, in three operations."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
