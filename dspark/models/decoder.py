"""The target decoder (Llama / Qwen2 / Qwen3 family), in plain PyTorch, over a paged KV cache.

Module and parameter names mirror Hugging Face (`model.layers.{i}.self_attn.q_proj.weight`, ...), so a
`*ForCausalLM` safetensors checkpoint loads directly. One forward handles a ragged batch: several new
tokens per sequence, a different count per sequence (prefill, decode and verification alike).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from dspark.models.config import DecoderConfig
from dspark.models.kv_cache import AttentionMetadata, PagedKVCache
from dspark.models.layers import Attention, GatedMLP, RMSNorm, fuse_projections
from dspark.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            qkv_bias=c.qkv_bias, o_bias=c.o_bias, qk_norm=c.qk_norm, eps=c.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)

    def forward(self, h, cos, sin, k_pool, v_pool, meta, dense_parts=None):
        """h [T, H] → [T, H]. dense_parts: the (before, after) pair run around the paged attention — the
        eager functions below by default, their compiled versions (`compiled_dense_parts`) on request."""
        before, after = dense_parts or (before_attention, after_attention)
        q, k, v = before(self, h, cos, sin)
        return after(self, h, self.self_attn.attend(q, k, v, k_pool, v_pool, meta))


def before_attention(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Input norm, fused q/k/v projection, q/k norms, RoPE: h [T, H] → q [T, Hq, D], k, v [T, Hkv, D]."""
    return layer.self_attn.project_qkv(layer.input_layernorm(h), cos, sin)


def after_attention(layer: DecoderLayer, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """o_proj and residual, post-attention norm, MLP and residual: h [T, H], attended [T, Hq, D] → [T, H]."""
    h = h + layer.self_attn.o_proj(attended.flatten(-2))
    return h + layer.mlp(layer.post_attention_layernorm(h))


@functools.cache
def compiled(function):
    """`torch.compile(function, dynamic=True, fullgraph=True)`, once per process: one graph serves every layer,
    every model of the same shapes and every token count. Used for the dense parts of a layer; the paged
    attention between them stays eager (its grouping is host-side Python)."""
    return torch.compile(function, dynamic=True, fullgraph=True)


def compiled_dense_parts():
    """The target layer's (before_attention, after_attention), compiled."""
    return compiled(before_attention), compiled(after_attention)


class DecoderBackbone(nn.Module):
    """HF's `model.*` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [N, V] float32, rows chosen by `logits_rows` (all T rows by default)
    features: torch.Tensor | None  # [T, L * H]: raw outputs of the requested layers, concatenated
    final_hidden: torch.Tensor | None  # [T, H] post-norm hidden state (when requested)


class DecoderModel(nn.Module):
    """`*ForCausalLM`-compatible decoder. `forward` runs T flattened tokens of a ragged batch."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBackbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self.dense_parts = None  # None: eager; `compile_dense_parts()` → torch.compile'd

    def compile_dense_parts(self) -> None:
        """Run every layer's dense parts through `torch.compile` (Inductor: C++ on the CPU with the system
        compiler, Triton on CUDA); the first forwards compile (seconds to minutes), later ones reuse."""
        self.dense_parts = compiled_dense_parts()

    def fuse_projections(self) -> None:
        """Inference: every layer's q/k/v and gate/up projections as one GEMM each (`layers.fuse_projections`)."""
        fuse_projections(self)

    def output_embeddings(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def validate_feature_layers(self, layer_ids: tuple[int, ...]) -> None:
        n = self.config.num_layers
        for layer_id in layer_ids:
            if not -1 <= layer_id < n:
                raise ValueError(f"target layer id {layer_id} out of range [-1, {n - 1}] (-1 = embedding output)")

    def forward(
        self,
        token_ids: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        *,
        logits_rows: torch.Tensor | None = None,
        feature_layer_ids: tuple[int, ...] = (),
        return_final_hidden: bool = False,
    ) -> DecoderOutput:
        """token_ids: [T] long. Writes the tokens' K/V into `cache` at `meta.slot_mapping`.

        `feature_layer_ids`: decoder layers whose raw output (the residual stream after that layer, not
        normalised; -1 = the embedding output) is returned, concatenated → [T, L·H] (docs/design.md §2.1).
        """
        h = self.model.embed_tokens(token_ids)
        cos, sin = self.rotary(meta.positions, h.dtype)
        wanted = {layer_id: None for layer_id in feature_layer_ids}
        if -1 in wanted:
            wanted[-1] = h
        for index, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, cache.k_pools[index], cache.v_pools[index], meta, self.dense_parts)
            if index in wanted:
                wanted[index] = h
        features = torch.cat([wanted[i] for i in feature_layer_ids], dim=-1) if feature_layer_ids else None
        rows = h if logits_rows is None else h[logits_rows]
        final = self.model.norm(rows)
        logits = torch.nn.functional.linear(final, self.output_embeddings()).float()
        final_hidden = None
        if return_final_hidden:
            final_hidden = final if logits_rows is None else self.model.norm(h)
        return DecoderOutput(logits=logits, features=features, final_hidden=final_hidden)
