"""MTP-1 drafter: DeepSeek-V3's multi-token-prediction module used as a one-token drafter (docs/design.md §2.7; the
paper's production baseline, which always verifies exactly one draft; DeepSeek-V3 technical report §2.2).

Row t (RoPE position t) combines the target's feature h_t with the embedding of the next token x_{t+1} and
predicts x_{t+2}:
    h'_t     = eh_proj([enorm(emb(x_{t+1})) ; hnorm(h_t)])                      (2H → H, no bias)
    o_t      = decoder layer (the target's layer shapes) on h'_t, causal over the drafter's own rows
    logits_t = lm_head(norm(o_t))                                                           → x_{t+2}
h_t is the raw output of one target decoder layer (docs/design.md §2.1; `target_layer_ids`, by default the last
layer). The concatenation puts the embedding first, as DeepSeek-V3's released MTP weights (and the
vLLM/SGLang loaders for them) lay out `eh_proj`; the paper writes [h ; emb] — the same model up to a
permutation of eh_proj's input columns.

Inference, per round and sequence (anchor x0 at position a): ingest the newly verified rows t (token
x_{t+1}; x0 for t = a−1) into the drafter's paged KV cache, where they stay, and sample the single draft
d_1 ~ q_1 = logits_to_probs(logits(o_{a−1})) from the last row. Nothing is appended for the draft, so there
is nothing to roll back. The runtime is `CausalFeatureDrafter` (shared with EAGLE-3) with one draft per round.

Training (`forward_train`, teacher-forced over whole sequences) is the same computation for every row at
once; `mtp_loss` is cross-entropy against the data token x_{t+2}, optionally mixed with soft cross-entropy
against the target's distribution over the same token.

Checkpoint (HF-style folder: config.json = the target's config + `architectures: ["MTPDraftModel"]`,
`num_hidden_layers: 1`, `num_target_layers`, `target_layer_ids` (one layer), `block_size: 1`,
`num_nextn_predict_layers: 1`, `tie_word_embeddings: false`; model.safetensors). Tensor names:
  embed_tokens.weight [V, H], enorm.weight [H], hnorm.weight [H], eh_proj.weight [H, 2H],
  layers.0.input_layernorm.weight [H], layers.0.self_attn.{q,k,v}_proj.weight [heads·D | kv·D, H],
  layers.0.self_attn.o_proj.weight [H, heads·D] (+ `.bias` where the target family has them),
  layers.0.self_attn.{q,k}_norm.weight [D] (Qwen3), layers.0.post_attention_layernorm.weight [H],
  layers.0.mlp.{gate,up}_proj.weight [I, H], layers.0.mlp.down_proj.weight [H, I],
  norm.weight [H], lm_head.weight [V, H].
(DeepSeek-V3 names the last two `shared_head.norm` / `shared_head.head` and nests everything under
`model.layers.{N}`; those map one to one.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dspark.errors import CheckpointError
from dspark.models.config import DecoderConfig, int_field
from dspark.models.decoder import DecoderLayer
from dspark.models.drafters.common import DraftCheckpointMixin, compute_dtype, init_draft_weights
from dspark.models.drafters.eagle3 import (
    CausalFeatureDrafter,
    chain_attention,
    dense_qkv,
    parse_feature_drafter_fields,
    shift_left,
    soft_cross_entropy,
)
from dspark.models.drafters.registry import register_drafter
from dspark.models.kv_cache import AttentionMetadata, PagedKVCache
from dspark.models.layers import RMSNorm, fuse_projections
from dspark.models.rope import RotaryEmbedding

ARCHITECTURE = "MTPDraftModel"


@dataclass(frozen=True)
class MTPConfig:
    layers: DecoderConfig  # shapes of the MTP block (= the target's), num_layers = 1
    num_target_layers: int
    target_layer_ids: tuple[int, ...]  # exactly one target layer
    hf_config: dict | None = None

    @property
    def block_size(self) -> int:
        return 1  # MTP-1: one draft per round

    def to_hf_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.hf_config or {})
        out.update(
            architectures=[ARCHITECTURE],
            num_hidden_layers=1,
            num_target_layers=self.num_target_layers,
            target_layer_ids=list(self.target_layer_ids),
            block_size=1,
            num_nextn_predict_layers=1,
            tie_word_embeddings=False,
        )
        return out


def parse_mtp_config(hf: dict[str, Any], where: str = "config.json") -> MTPConfig:
    """Validate an MTP drafter config.json and build an `MTPConfig`."""
    layers, num_target_layers, ids = parse_feature_drafter_fields(hf, where, "MTP")
    if len(ids) != 1:
        raise CheckpointError(f"{where}: an MTP drafter reads exactly one target layer, target_layer_ids={list(ids)}")
    if ids[0] == -1:
        raise CheckpointError(f"{where}: an MTP drafter reads a decoder layer's output, not the embedding (-1)")
    for field in ("block_size", "num_nextn_predict_layers"):
        if int_field(hf, field, where, default=1) != 1:
            raise CheckpointError(f"{where}: {field}={hf[field]!r}; MTP-1 drafts exactly one token per round")
    return MTPConfig(layers, num_target_layers, ids, hf_config=dict(hf))


def mtp_config_for_target(target_hf_config: dict, *, target_layer_ids: tuple[int, ...] | None = None) -> MTPConfig:
    """An MTP-1 config with the target's layer shapes; by default it reads the target's last decoder layer."""
    num_target_layers = target_hf_config["num_hidden_layers"]
    hf = dict(target_hf_config)
    hf.update(
        num_target_layers=num_target_layers, num_hidden_layers=1,
        target_layer_ids=list(target_layer_ids or (num_target_layers - 1,)),
    )
    return parse_mtp_config(hf, where="drafter config")


class MTPModel(DraftCheckpointMixin, nn.Module):
    """The MTP module; module names are the checkpoint's tensor names (module docstring)."""

    parse_config = staticmethod(parse_mtp_config)

    def __init__(self, config: MTPConfig):
        super().__init__()
        self.config = config
        c = config.layers
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, c.max_position_embeddings)

    @property
    def feature_width(self) -> int:
        return self.config.layers.hidden_size

    def combine(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """h'_t: features [..., H] (target layer output at t), next_tokens [...] (x_{t+1}) → [..., H]."""
        emb = self.embed_tokens(next_tokens)
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(features.to(emb.dtype))], dim=-1))

    # -- inference ------------------------------------------------------------------------------------
    def ingest(
        self, cache: PagedKVCache, handles: list[int], features: list[torch.Tensor], next_tokens: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Append context rows to `cache` (kept). features[b] [n_b ≥ 1, H], next_tokens[b] [n_b] (x_{t+1}).
        Returns per sequence the block outputs o [n_b, H]. On failure the cache is unchanged."""
        starts = [cache.length(h) for h in handles]
        meta = cache.prepare(handles, [f.shape[0] for f in features])
        try:
            out = self.ingest_pass(cache, meta, torch.cat(features), torch.cat(next_tokens))
        except BaseException:
            for handle, start in zip(handles, starts):
                cache.truncate(handle, start)
            raise
        return list(torch.split(out, [f.shape[0] for f in features]))

    def ingest_pass(self, cache: PagedKVCache, meta: AttentionMetadata, features: torch.Tensor, next_tokens: torch.Tensor
                    ) -> torch.Tensor:
        """The context rows of a prepared forward: features [T, H], next_tokens [T] → o [T, H]."""
        h = self.combine(features, next_tokens)
        cos, sin = self.rotary(meta.positions, h.dtype)
        return self.layers[0](h, cos, sin, cache.k_pools[0], cache.v_pools[0], meta)

    # -- training -------------------------------------------------------------------------------------
    def forward_train(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over whole sequences. features [N, S, H] (target layer output at every position),
        input_ids [N, S] (right padding is fine) → logits [N, S, V] (float32; float64 for a float64 model),
        row t predicting x_{t+2} (rows t ≥ S−2 have no label)."""
        n, length = input_ids.shape
        layer = self.layers[0]
        attn = layer.self_attn
        h = self.combine(features, shift_left(input_ids, 1))
        positions = torch.arange(length, device=input_ids.device).expand(n, -1)
        cos, sin = self.rotary(positions, h.dtype)
        q, k, v = dense_qkv(attn, layer.input_layernorm(h), cos, sin)
        out = chain_attention(q, k, v, [], [], attn.scale)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(n, length, attn.num_heads * attn.head_dim))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.logits(h)


@dataclass
class MTPLossOutput:
    total: torch.Tensor  # scalar, differentiable
    ce: torch.Tensor  # detached mean CE against the data token
    soft_ce: torch.Tensor  # detached mean soft CE against the target distribution (0 if not computed)
    accuracy: torch.Tensor  # detached: argmax == data token, over supervised rows
    denominator: torch.Tensor


def mtp_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    target_final_hidden: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    soft_weight: float = 0.0,
    denominator: torch.Tensor | None = None,
) -> MTPLossOutput:
    """Loss of `forward_train`'s logits [N, S, V]. Row t is supervised iff x_{t+2} exists and is a response
    token (loss_mask [N, S]); total = ((1 − soft_weight)·Σ CE(x_{t+2}) + soft_weight·Σ softCE(p_t)) / D, with
    p_t = softmax(lm_head(target_final_hidden[t+1])) the target's distribution over x_{t+2} and D the number
    of supervised rows (or `denominator`, e.g. summed over data-parallel ranks)."""
    supervised = shift_left(loss_mask.bool(), 2, pad=False)
    labels = shift_left(input_ids, 2)
    count = supervised.sum().to(torch.float32)
    denom = (count if denominator is None else denominator.to(torch.float32)).clamp_min(1.0)
    ce = F.cross_entropy(logits.to(compute_dtype(logits.dtype)).flatten(0, 1), labels.flatten(), reduction="none")
    ce_sum = (ce.view_as(labels) * supervised).sum().float()
    soft_sum = torch.zeros((), device=logits.device)
    if soft_weight > 0:
        if target_final_hidden is None or lm_head_weight is None:
            raise ValueError("soft_weight > 0 needs the target's final hidden states and the LM head weight")
        with torch.no_grad():
            target_logits = shift_left(F.linear(target_final_hidden.to(lm_head_weight.dtype), lm_head_weight), 1)
        soft_sum = (soft_cross_entropy(logits, target_logits) * supervised).sum().float()
    total = ((1 - soft_weight) * ce_sum + soft_weight * soft_sum) / denom
    with torch.no_grad():
        hits = ((logits.argmax(-1) == labels) & supervised).sum().float()
        safe = count.clamp_min(1.0)
    return MTPLossOutput(total, (ce_sum / safe).detach(), (soft_sum / safe).detach(), hits / safe, denom)


def init_mtp_from_target(config: MTPConfig, target, *, seed: int = 0, std: float = 0.02) -> MTPModel:
    """A freshly initialised MTP drafter for `target` (a `DecoderModel`), see `init_draft_weights`."""
    with torch.device(next(target.parameters()).device):
        model = MTPModel(config)
    return init_draft_weights(model, target, seed=seed, std=std)


class MTPDrafter(CausalFeatureDrafter):
    def __init__(self, model: MTPModel, *, cache_page_size: int = 16):
        super().__init__(model, name="mtp", cache_page_size=cache_page_size)


def load_mtp_drafter(folder: str | Path, *, device="auto", dtype=None, target=None) -> MTPDrafter:
    model = MTPModel.from_pretrained(folder, device=device, dtype=dtype, target=target)
    fuse_projections(model)  # a loaded drafter only drafts: fused projections (training builds its own)
    return MTPDrafter(model)


register_drafter(ARCHITECTURE, load_mtp_drafter)
