"""EAGLE-3 drafter (docs/design.md §2.7; Li et al., arXiv 2503.01840, in the variant DeepSpec trains as its baseline:
full target vocabulary, frozen copies of the target's embedding and LM head, `block_size` = TTT length = 7).

One decoder layer with the target's layer shapes. Row t (RoPE position t) pairs a hidden state g_t with the
embedding of the *next* token x_{t+1} and predicts x_{t+2}:
    u_t      = [input_layernorm(emb(x_{t+1})) ; hidden_norm(g_t)]                         [2H]
    a_t      = o_proj(attention(q_proj u_t, k_proj u_t, v_proj u_t))  (q/k/v: 2H → heads·D, o: heads·D → H)
    r_t      = g_t + a_t ;   o_t = r_t + mlp(post_attention_layernorm(r_t))                [H]
    logits_t = lm_head(norm(o_t))                                                          [V]  → x_{t+2}
Attention is causal over the drafter's own rows (Qwen3: per-head q/k RMSNorm, as in the target).
g_t = fc(concat of the target's layer outputs at t) (L·H → H, docs/design.md §2.1) for verified positions; while
drafting, g is the layer's own output o (before the final norm) of the previous row.

Inference, per round and sequence (anchor x0 = token_ids[-1] at position a; verified positions 0..a−1):
  1. ingest the newly verified rows t (g_t = fc(f_t), token x_{t+1}; for t = a−1 that is x0) into the
     drafter's paged KV cache, where they stay;
  2. d_1 ~ q_1 = logits_to_probs(logits(o_{a−1})) — the last context row's output predicts x_{a+1};
  3. for k ≥ 1: draft row at position a+k−1 with g = o of the previous row and token d_k gives o, and
     d_{k+1} ~ q_{k+1} = logits_to_probs(logits(o));
  4. roll the cache back to a (drafted rows are dropped; the next round's verified rows replace them).
Each q_k is the exact float32 tensor d_k was sampled from and is returned as the draft distribution.

Training-time test (TTT, `forward_train`), stated in "chain" indexing: chain t is the sequence of drafts
started from verified position t (anchor a = t+1). For steps k = 0..K−1 (K = block_size):
  - input: token x_{t+1+k}, RoPE position t+k, g = fc(f_t) for k = 0 and the step k−1 output o^{k−1}_t else;
  - attention: the query of (step k, chain t) sees the step-0 keys of rows s ≤ t and the keys of steps
    1..k of chain t (its own chain, itself included) — nothing else;
  - output: logits^k_t predicts x_{t+2+k}.
This is exactly what inference computes for anchor a = t+1 when the drafts are teacher-forced to
d_j = x_{t+1+j}: step 0 of chain t is context row a−1 and step k is draft row a+k−1 (same token, same
RoPE position, same g, same visible keys). In position indexing (position p = t+k), step k's g at
position p is step k−1's output at position p−1, and its query sees the context rows < p−k+1 plus its
chain. It is the mask of DeepSpec/SpecForge (causal on step-0 keys, "diagonal" on later steps).
Loss (`eagle3_ttt_loss`): soft cross-entropy of logits^k_t against p_t = softmax(target lm_head(target
final hidden at t+1+k)) (the target's distribution over the same token x_{t+2+k}), supervised where
x_{t+2+k} exists and is a response token, weights 0.8^k, each step a mean over its supervised rows.

Checkpoint (HF-style folder: config.json = the target's config + `architectures: ["Eagle3DraftModel"]`,
`num_hidden_layers: 1`, `num_target_layers`, `target_layer_ids`, `block_size`, `tie_word_embeddings:
false`; model.safetensors). Tensor names follow the EAGLE-3 / SpecForge layout (one `midlayer`, no d2t/t2d
since the draft vocabulary is the target's):
  embed_tokens.weight [V, H], fc.weight [H, L·H], norm.weight [H], lm_head.weight [V, H],
  midlayer.hidden_norm.weight [H], midlayer.input_layernorm.weight [H],
  midlayer.self_attn.q_proj.weight [heads·D, 2H], midlayer.self_attn.k_proj.weight [kv·D, 2H],
  midlayer.self_attn.v_proj.weight [kv·D, 2H], midlayer.self_attn.o_proj.weight [H, heads·D]
  (+ `.bias` where the target family has them), midlayer.self_attn.{q,k}_norm.weight [D] (Qwen3),
  midlayer.post_attention_layernorm.weight [H], midlayer.mlp.{gate,up}_proj.weight [I, H],
  midlayer.mlp.down_proj.weight [H, I].

The runtime shared with the MTP drafter (one causal layer over its own cache, row t fed by the target
feature at t and token x_{t+1}) is `CausalFeatureDrafter` below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dspark.decoding.sampling import logits_to_probs, sample
from dspark.devices import to_device
from dspark.errors import CheckpointError, RequestError
from dspark.models.checkpoint import IndexExpectation
from dspark.models.config import DecoderConfig, architectures_field, int_field, parse_decoder_config
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter, draft_uniforms
from dspark.models.drafters.common import (
    DraftCheckpointMixin,
    check_drafter_target,
    compute_dtype,
    context_handle,
    init_draft_weights,
)
from dspark.models.drafters.registry import register_drafter
from dspark.models.drafters.static_causal import StaticCausalRound
from dspark.models.static_step import static_forwards
from dspark.models.kv_cache import AttentionMetadata, PagedKVCache
from dspark.models.layers import Attention, GatedMLP, RMSNorm, fuse_projections
from dspark.models.rope import RotaryEmbedding

ARCHITECTURE = "Eagle3DraftModel"
STEP_LOSS_DECAY = 0.8


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

def parse_feature_drafter_fields(
    hf: dict[str, Any], where: str, kind: str
) -> tuple[DecoderConfig, int, tuple[int, ...]]:
    """Shared part of the one-layer drafters' configs: the layer shapes (parsed with the target family's
    rules), `num_target_layers` and `target_layer_ids`. Returns (layers, num_target_layers, ids)."""
    missing = [f for f in ("num_target_layers", "target_layer_ids") if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"{where}: drafter field(s) {', '.join(missing)} missing (not an {kind} checkpoint?)")
    architectures_field(hf, where)
    target_like = {k: v for k, v in hf.items() if k != "architectures"}
    target_like["tie_word_embeddings"] = False
    layers = parse_decoder_config(target_like, where)
    if layers.num_layers != 1:
        raise CheckpointError(
            f"{where}: an {kind} drafter has exactly one decoder layer, num_hidden_layers={layers.num_layers}"
        )
    num_target_layers = int_field(hf, "num_target_layers", where)
    ids = hf["target_layer_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{where}: target_layer_ids must be a non-empty list of integers, got {ids!r}")
    if any(not -1 <= i < num_target_layers for i in ids) or any(a >= b for a, b in zip(ids, ids[1:])):
        raise CheckpointError(
            f"{where}: target_layer_ids {ids} must be strictly increasing in [-1, {num_target_layers - 1}] "
            "(-1 = embedding output)"
        )
    return layers, num_target_layers, tuple(ids)


@dataclass(frozen=True)
class Eagle3Config:
    layers: DecoderConfig  # shapes of the draft layer (= the target's), num_layers = 1
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    block_size: int = 7  # drafts per round = TTT steps it was trained with
    hf_config: dict | None = None  # the full config.json (target fields included), written back on save

    def to_hf_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.hf_config or {})
        out.update(
            architectures=[ARCHITECTURE],
            num_hidden_layers=1,
            num_target_layers=self.num_target_layers,
            target_layer_ids=list(self.target_layer_ids),
            block_size=self.block_size,
            tie_word_embeddings=False,
        )
        return out


def parse_eagle3_config(hf: dict[str, Any], where: str = "config.json") -> Eagle3Config:
    """Validate an EAGLE-3 drafter config.json and build an `Eagle3Config`."""
    layers, num_target_layers, ids = parse_feature_drafter_fields(hf, where, "EAGLE-3")
    block = int_field(hf, "block_size", where, default=7)
    return Eagle3Config(layers, num_target_layers, ids, block, hf_config=dict(hf))


def eagle3_config_for_target(
    target_hf_config: dict, *, target_layer_ids: tuple[int, ...], block_size: int = 7
) -> Eagle3Config:
    """An EAGLE-3 config with the target's layer shapes (DeepSpec's construction; docs/design.md §2.7)."""
    hf = dict(target_hf_config)
    hf.update(
        num_target_layers=target_hf_config["num_hidden_layers"], num_hidden_layers=1,
        target_layer_ids=list(target_layer_ids), block_size=block_size,
    )
    return parse_eagle3_config(hf, where="drafter config")


# ---------------------------------------------------------------------------------------------------
# Pieces shared with the MTP drafter
# ---------------------------------------------------------------------------------------------------

def shift_left(x: torch.Tensor, shift: int, pad: float | int | bool = 0) -> torch.Tensor:
    """[N, S, ...] → same shape with out[:, t] = x[:, t + shift] (`pad` past the end)."""
    out = torch.full_like(x, pad)
    if shift < x.shape[1]:
        out[:, : x.shape[1] - shift] = x[:, shift:]
    return out


def dense_qkv(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, S, in] → q [N, Hq, S, D], k, v [N, Hkv, S, D] (q/k normed if Qwen3, rotated at their positions)."""
    q, k, v = attn.project_qkv(x, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def chain_attention(
    q: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    chain_k: list[torch.Tensor],
    chain_v: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """TTT attention. q [N, Hq, S, D]; ctx_k/ctx_v [N, Hkv, S, D] (step-0 rows); chain_k/chain_v: lists of
    [N, Hkv, S, D] (one per later step). Query row t sees ctx rows s ≤ t and row t of every chain tensor.
    With empty chains this is plain causal attention. Returns [N, Hq, S, D]."""
    groups = q.shape[1] // ctx_k.shape[1]

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t

    length = q.shape[2]
    scores = (q @ per_head(ctx_k).transpose(-1, -2)) * scale  # [N, Hq, S, S]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    if chain_k:
        diagonal = torch.stack([(q * per_head(k)).sum(-1) for k in chain_k], dim=-1) * scale  # [N, Hq, S, j]
        scores = torch.cat([scores, diagonal], dim=-1)
    weights = torch.softmax(scores.to(compute_dtype(q.dtype)), dim=-1).to(q.dtype)
    out = weights[..., :length] @ per_head(ctx_v)
    for j, v in enumerate(chain_v):
        out = out + weights[..., length + j, None] * per_head(v)
    return out


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """−Σ_v softmax(target)_v · log softmax(logits)_v over the last axis, in float32 (float64 if given)."""
    dtype = compute_dtype(logits.dtype)
    p_t = torch.softmax(target_logits.to(dtype), dim=-1)
    return -(p_t * torch.log_softmax(logits.to(dtype), dim=-1)).sum(-1)


# ---------------------------------------------------------------------------------------------------
# The EAGLE-3 network
# ---------------------------------------------------------------------------------------------------

class Eagle3Attention(Attention):
    """Attention whose q/k/v projections read the 2H-wide input and whose output projection writes H."""

    def __init__(self, c: DecoderConfig):
        super().__init__(
            2 * c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            qkv_bias=c.qkv_bias, o_bias=c.o_bias, qk_norm=c.qk_norm, eps=c.rms_norm_eps,
        )
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)


class Eagle3Layer(nn.Module):
    """The single draft layer ("midlayer"): [norm(emb) ; norm(g)] → attention → residual on g → MLP."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Eagle3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)

    def layer_input(self, emb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """emb, g [..., H] → [..., 2H] = [input_layernorm(emb) ; hidden_norm(g)]."""
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(g)], dim=-1)

    def _finish(self, g: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        h = g + attended
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_paged(self, emb, g, cos, sin, k_pool, v_pool, meta) -> torch.Tensor:
        """Inference. emb, g [T, H] (ragged rows of several sequences) → o [T, H]; writes the rows' K/V."""
        return self._finish(g, self.self_attn(self.layer_input(emb, g), cos, sin, k_pool, v_pool, meta))

    def forward_ttt(self, emb, g, cos, sin, ctx_kv, chain_kv):
        """Training, one TTT step. emb, g [N, S, H]; cos/sin [N, S, D]; ctx_kv: (k, v) of step 0 or None (this
        is step 0); chain_kv: (k, v) of steps 1..k−1. Returns (o [N, S, H], this step's k, v [N, Hkv, S, D])."""
        attn = self.self_attn
        q, k, v = dense_qkv(attn, self.layer_input(emb, g), cos, sin)
        if ctx_kv is None:
            ctx_k, ctx_v, chain_k, chain_v = k, v, [], []
        else:
            (ctx_k, ctx_v), chain_k, chain_v = ctx_kv, [c[0] for c in chain_kv] + [k], [c[1] for c in chain_kv] + [v]
        out = chain_attention(q, ctx_k, ctx_v, chain_k, chain_v, attn.scale)
        n, length = emb.shape[:2]
        attended = attn.o_proj(out.transpose(1, 2).reshape(n, length, attn.num_heads * attn.head_dim))
        return self._finish(g, attended), k, v


class Eagle3Model(DraftCheckpointMixin, nn.Module):
    """The EAGLE-3 drafter network; module names are the checkpoint's tensor names (module docstring)."""

    parse_config = staticmethod(parse_eagle3_config)

    @classmethod
    def index_expectation(cls, config: Eagle3Config, with_target_tensors: bool = True) -> IndexExpectation:
        """One unnumbered `midlayer`; its q_proj [heads·D, 2H] and (released layout) the embedding [V, H]
        fixed by the config."""
        c = config.layers
        shapes = {"midlayer.self_attn.q_proj.weight": (c.num_heads * c.head_dim, 2 * c.hidden_size)}
        if with_target_tensors:
            shapes["embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
        return IndexExpectation(None, 1, shapes)

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        c = config.layers
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(len(config.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, c.max_position_embeddings)

    @property
    def feature_width(self) -> int:
        return self.fc.in_features

    # -- inference ------------------------------------------------------------------------------------
    def ingest(
        self, cache: PagedKVCache, handles: list[int], features: list[torch.Tensor], next_tokens: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Append context rows to `cache` (kept): sequence b gets rows for its next n_b positions.

        features[b] [n_b ≥ 1, L·H] target features of those positions; next_tokens[b] [n_b] the token after
        each (x_{t+1}). Returns per sequence the rows' outputs o [n_b, H]. On failure the cache is unchanged.
        """
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
        """The context rows of a prepared forward: features [T, L·H], next_tokens [T] → o [T, H]."""
        g = self.fc(features.to(self.fc.weight.dtype))
        cos, sin = self.rotary(meta.positions, g.dtype)
        return self.midlayer.forward_paged(self.embed_tokens(next_tokens), g, cos, sin, cache.k_pools[0],
                                           cache.v_pools[0], meta)

    def draft_step(
        self, cache: PagedKVCache, handles: list[int], hidden: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """One autoregressive draft row per sequence, appended to `cache` (the caller rolls it back).
        hidden [B, H] = o of each sequence's previous row (fed back as g); tokens [B] = the draft just sampled.
        Returns o [B, H] of the new rows."""
        return self.draft_step_pass(cache, cache.prepare(handles, [1] * len(handles)), hidden, tokens)

    def draft_step_pass(self, cache: PagedKVCache, meta: AttentionMetadata, hidden: torch.Tensor, tokens: torch.Tensor
                        ) -> torch.Tensor:
        """`draft_step` on a prepared forward of one row per sequence."""
        cos, sin = self.rotary(meta.positions, hidden.dtype)
        return self.midlayer.forward_paged(self.embed_tokens(tokens), hidden, cos, sin, cache.k_pools[0],
                                           cache.v_pools[0], meta)

    # -- training -------------------------------------------------------------------------------------
    def forward_train(
        self, features: torch.Tensor, input_ids: torch.Tensor, num_steps: int | None = None
    ) -> torch.Tensor:
        """Training-time test, unrolled over `num_steps` (default block_size) steps (module docstring).

        features [N, S, L·H] target layer outputs of every position; input_ids [N, S] (right-padded rows
        are fine: attention is causal, so padding never reaches real rows). Returns logits [K, N, S, V]
        (float32; float64 for a float64 model) with logits[k, :, t] predicting x_{t+2+k}; rows whose input
        token x_{t+1+k} lies past the sequence are computed on padding (token 0) and must not be supervised.
        """
        steps = self.config.block_size if num_steps is None else num_steps
        n, length = input_ids.shape
        g = self.fc(features.to(self.fc.weight.dtype))
        rows = torch.arange(length, device=input_ids.device)
        ctx_kv, chain_kv, logits = None, [], []
        for k in range(steps):
            emb = self.embed_tokens(shift_left(input_ids, k + 1))
            cos, sin = self.rotary((rows + k).expand(n, -1), g.dtype)
            g, key, value = self.midlayer.forward_ttt(emb, g, cos, sin, ctx_kv, chain_kv)
            if ctx_kv is None:
                ctx_kv = (key, value)
            else:
                chain_kv.append((key, value))
            logits.append(self.logits(g))
        return torch.stack(logits)


@dataclass
class TTTLossOutput:
    total: torch.Tensor  # scalar, differentiable: Σ_k 0.8^k · (Σ_t m_kt CE_kt) / D_k
    step_losses: torch.Tensor  # [K] detached mean soft CE per step
    step_accuracy: torch.Tensor  # [K] detached: argmax draft == argmax target, over supervised rows
    denominators: torch.Tensor  # [K] D_k used (supervised rows per step)


def ttt_supervision(loss_mask: torch.Tensor, num_steps: int) -> torch.Tensor:
    """loss_mask [N, S] bool (1 on response tokens) → [K, N, S] bool: (step k, row t) is supervised iff its
    label x_{t+2+k} exists and is a response token."""
    n, length = loss_mask.shape
    out = torch.zeros(num_steps, n, length, dtype=torch.bool, device=loss_mask.device)
    for k in range(num_steps):
        out[k] = shift_left(loss_mask.bool(), k + 2, pad=False)
    return out


def eagle3_ttt_loss(
    step_logits: torch.Tensor,
    target_final_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    decay: float = STEP_LOSS_DECAY,
    denominators: torch.Tensor | None = None,
) -> TTTLossOutput:
    """The TTT loss (docs/design.md §2.7). step_logits [K, N, S, V] from `forward_train`; target_final_hidden [N, S, H]
    (the target's post-norm hidden state: p_t at position p = softmax(lm_head(·)) over token p+1);
    lm_head_weight [V, H] (the frozen head shared with the target); loss_mask [N, S].

    Step k, row t is scored against the target distribution at position t+1+k with soft cross-entropy,
    weight decay^k, averaged over the step's supervised rows (`ttt_supervision`). `denominators` [K]
    replaces the per-step counts (a data-parallel trainer sums them over ranks first)."""
    steps = step_logits.shape[0]
    supervised = ttt_supervision(loss_mask, steps)
    counts = supervised.flatten(1).sum(-1).to(torch.float32)
    denom = counts if denominators is None else denominators.to(torch.float32)
    with torch.no_grad():
        target_logits = F.linear(target_final_hidden.to(lm_head_weight.dtype), lm_head_weight)
    total = step_logits.new_zeros((), dtype=torch.float32)
    losses, accuracy = [], []
    for k in range(steps):
        labels = shift_left(target_logits, k + 1)
        ce = soft_cross_entropy(step_logits[k], labels)
        m = supervised[k]
        step_sum = (ce * m).sum().float()
        total = total + decay**k * step_sum / denom[k].clamp_min(1.0)
        with torch.no_grad():
            losses.append(step_sum / counts[k].clamp_min(1.0))
            hits = (step_logits[k].argmax(-1) == labels.argmax(-1)) & m
            accuracy.append(hits.sum().float() / counts[k].clamp_min(1.0))
    return TTTLossOutput(total, torch.stack(losses).detach(), torch.stack(accuracy), denom)


def init_eagle3_from_target(config: Eagle3Config, target, *, seed: int = 0, std: float = 0.02) -> Eagle3Model:
    """A freshly initialised EAGLE-3 drafter for `target` (a `DecoderModel`), see `init_draft_weights`."""
    with torch.device(next(target.parameters()).device):
        model = Eagle3Model(config)
    return init_draft_weights(model, target, seed=seed, std=std)


# ---------------------------------------------------------------------------------------------------
# Runtime: the Drafter (shared with MTP)
# ---------------------------------------------------------------------------------------------------

class CausalFeatureDrafter(Drafter):
    """Runs a one-layer causal drafter whose row t is fed by the target feature at t and token x_{t+1}
    (EAGLE-3, MTP). The model provides `ingest`, `logits`, `feature_width`, `config` (layers,
    num_target_layers, target_layer_ids, block_size) and, if block_size > 1, `draft_step`.

    Per sequence the drafter keeps its own paged KV cache of the verified context rows and the output o of
    the last one (row a−1, whose token is the anchor), from which the first draft is sampled; drafted rows
    are dropped after each round. Every draft is sampled from q = logits_to_probs(logits, the request's
    sampling parameters) and exactly that float32 tensor is returned (docs/design.md §1).
    """

    def __init__(self, model, *, name: str, cache_page_size: int = 16, graphs: bool | None = None):
        """graphs: replay rounds from captured graphs (`use_graphs`); None = on CUDA only."""
        self.model = model.eval()
        cfg = model.config
        self.name = name
        self.block_size = cfg.block_size
        self.feature_layer_ids = cfg.target_layer_ids
        param = model.lm_head.weight
        c = cfg.layers
        self.cache = PagedKVCache(
            1, c.num_kv_heads, c.head_dim, page_size=cache_page_size, dtype=param.dtype, device=param.device
        )
        self._handles: dict[int, int] = {}
        self._last_hidden: dict[int, torch.Tensor] = {}  # seq_id → o of its last context row [H]
        self.static: StaticCausalRound | None = None
        self.use_graphs(graphs)

    def check_target(self, target_config: DecoderConfig) -> None:
        check_drafter_target(self.name, self.model.config, target_config)

    def _validate(self, batch: list[DraftInput]) -> tuple[list[int], list[tuple]]:
        """The batch's cache handles, and (seq_id, handle, features, next tokens) of each sequence with new
        context rows (on the device). Raises RequestError."""
        device = self.model.lm_head.weight.device
        handles, todo = [], []
        for item in batch:
            handle = context_handle(self, self.cache, self._handles, item)
            seen, n_new = self.cache.length(handle), item.new_features.shape[0]
            if n_new and item.new_features.shape[-1] != self.model.feature_width:
                raise RequestError(
                    f"sequence {item.seq_id}: target features are {item.new_features.shape[-1]} wide, drafter "
                    f"'{self.name}' expects {self.model.feature_width} (layers {self.feature_layer_ids})"
                )
            if n_new == 0 and item.seq_id not in self._last_hidden:
                raise RequestError(f"sequence {item.seq_id}: no verified position before the anchor to draft from")
            handles.append(handle)
            if n_new:
                tokens = torch.as_tensor(list(item.token_ids[seen + 1 :]), dtype=torch.long, device=device)
                todo.append((item.seq_id, handle, item.new_features.to(device), tokens))
        return handles, todo

    def _ingest(self, todo: list[tuple]) -> None:
        """Append the new context rows (`_validate`'s todo) and keep each sequence's last row output."""
        if todo:
            outputs = self.model.ingest(self.cache, [t[1] for t in todo], [t[2] for t in todo], [t[3] for t in todo])
            for (seq_id, *_), rows in zip(todo, outputs):
                self._last_hidden[seq_id] = rows[-1].clone()  # not a view pinning all rows

    def use_graphs(self, enabled: bool | None = None, *, max_batch: int = 256, attention="auto") -> None:
        """Replay rounds of up to `max_batch` sequences (context rows and every draft step) from captured graphs
        (`StaticCausalRound`), or run them eagerly (`--enforce-eager`). None: on CUDA only. attention: the rounds' attention
        kernel (`dspark.models.static_step.static_forwards`)."""
        self.static = static_forwards(self.model.lm_head.weight.device, enabled, attention,
                                      lambda **kw: StaticCausalRound(self, max_batch=max_batch, **kw))

    @torch.inference_mode()
    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        handles, todo = self._validate(batch)
        limits = [max(0, min(item.max_tokens, self.block_size)) for item in batch]
        width, count = max(limits, default=0), len(batch)
        samplings = [item.sampling for item in batch]
        uniforms = draft_uniforms(batch, self.block_size)
        bucket = None
        if self.static is not None and width and len(todo) == count and (
                uniforms is not None or all(s.greedy for s in samplings)):
            bucket = self.static.bucket([self.cache.length(h) for h in handles], [t[2].shape[0] for t in todo], samplings)
        if bucket is not None:
            return self.static.propose(batch, handles, todo, limits, uniforms, bucket)
        self._ingest(todo)
        if width == 0:
            return DraftProposal.empty(count)
        hidden = torch.stack([self._last_hidden[item.seq_id] for item in batch])
        device, vocab = hidden.device, self.model.config.layers.vocab_size
        tokens = torch.zeros(count, width, dtype=torch.long, device=device)
        probs = torch.zeros(count, width, vocab, dtype=torch.float32, device=device)
        verified = [self.cache.length(h) for h in handles]
        uniforms = None if uniforms is None else uniforms[:, :width]
        slot_rows = [[b for b in range(count) if limits[b] > k] for k in range(width)]
        # Every slot's rows and the uniforms reach the device in one asynchronous copy per dtype.
        indices = to_device([torch.tensor(rows, dtype=torch.long) for rows in slot_rows]
                            + ([] if uniforms is None else [uniforms]), device)
        uniforms = None if uniforms is None else indices.pop()
        try:
            for k, (rows, index) in enumerate(zip(slot_rows, indices)):
                if k > 0:
                    step_handles = [handles[b] for b in rows]
                    stepped = self.model.draft_step(self.cache, step_handles, hidden[index], tokens[index, k - 1])
                    hidden = hidden.index_copy(0, index, stepped)
                q = logits_to_probs(self.model.logits(hidden[index]), [batch[b].sampling for b in rows])
                tokens[index, k] = sample(q, generator, None if uniforms is None else uniforms[index, k])
                probs[index, k] = q
        finally:
            for handle, length in zip(handles, verified):
                self.cache.truncate(handle, length)
        return DraftProposal(tokens=tokens, lengths=torch.tensor(limits, dtype=torch.long), probs=probs)

    def release(self, seq_id: int) -> None:
        handle = self._handles.pop(seq_id, None)
        self._last_hidden.pop(seq_id, None)
        if handle is not None:
            self.cache.free_sequence(handle)


class Eagle3Drafter(CausalFeatureDrafter):
    def __init__(self, model: Eagle3Model, *, cache_page_size: int = 16):
        super().__init__(model, name="eagle3", cache_page_size=cache_page_size)


def load_eagle3_drafter(folder: str | Path, *, device="auto", dtype=None, target=None) -> Eagle3Drafter:
    model = Eagle3Model.from_pretrained(folder, device=device, dtype=dtype, target=target)
    fuse_projections(model)  # a loaded drafter only drafts: fused projections (training builds its own)
    return Eagle3Drafter(model)


register_drafter(ARCHITECTURE, load_eagle3_drafter)
