"""DSpark and DFlash drafters: the parallel backbone with context fusion and KV injection (docs/design.md §2.2),
DSpark's sequential head and confidence head (docs/design.md §2.3–2.4, paper §3.1–3.2.1), the released checkpoint
layout (docs/design.md §7), and the `Drafter` that plugs them into the generation loop.

Backbone, per round and sequence (anchor x0 at position a = number of verified tokens):
  ctx   = RMSNorm(W_c · concat(target layer outputs))           computed once, shared by all draft layers
  block = [emb(x0), emb(mask), ..., emb(mask)]                  γ inputs → γ predictions (slot k at a + k)
  layer: queries from the block; keys/values = [K/V(ctx) for positions < a ; K/V(block)], RoPE at each
         row's own position; the block attends to all context before the anchor and bidirectionally to
         itself — never to the anchor's own features.
  U_k   = lm_head(norm(h_k))                                     base logits of all γ slots in one pass
The drafter keeps its own paged KV cache of context K/V (positions < a); each round it appends the newly
verified positions, runs the block, and drops the block's K/V again.

DFlash is the same model with markov_rank = 0 and no confidence head (as in DeepSpec, whose "DFlash"
baseline already uses the anchor-as-first-slot layout).

Where the released recipe and the paper differ (position weights exp(−k/4) vs exp(−(k−1)/γ)) the training code
follows the recipe (DeepSpec's constant, docs/design.md §2.5), so that our checkpoints behave like the released ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.decoding.sampling import RowSampling, SamplingParams, logits_to_probs, logits_to_probs_by_row, sample
from dspark.devices import to_device
from dspark.models.config import DecoderConfig
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter, draft_uniforms
from dspark.models.drafters.dspark_config import ARCHITECTURE_NAMES, DSparkConfig, parse_dspark_config
from dspark.models.drafters.heads import SEQUENTIAL_HEADS, ConfidenceHead
from dspark.models.drafters.common import DraftCheckpointMixin, check_drafter_target, context_handle, init_draft_weights
from dspark.models.decoder import after_attention, compiled
from dspark.models.drafters.registry import register_drafter
from dspark.models.drafters.static_block import StaticDraftStep, blocks_dropped_after
from dspark.models.static_step import static_forwards
from dspark.models.kv_cache import AttentionMetadata, PagedKVCache
from dspark.models.layers import Attention, GatedMLP, RMSNorm, fuse_projections
from dspark.models.rope import RotaryEmbedding, apply_rotary


class DraftAttention(Attention):
    """Attention whose keys and values also come from the fused target context (KV injection)."""

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx [..., S, H] → k, v [..., S, Hkv, D] (k normed per head if Qwen3, rotated at its positions)."""
        shape = ctx.shape[:-1]
        k = self.k_proj(ctx).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(ctx).view(*shape, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def attend_paged(self, q, k, v, kc, vc, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        """Inference: write the new context rows' kc, vc [Tc, Hkv, D] (K/V only) and the block rows' k, v,
        then paged attention of the block rows' q [Tq, Hq, D] → [Tq, Hq, D] (before o_proj)."""
        if kc.shape[0]:
            k_pool.index_copy_(0, meta.kv_only_slot_mapping, kc.to(k_pool.dtype))
            v_pool.index_copy_(0, meta.kv_only_slot_mapping, vc.to(v_pool.dtype))
        return self.attend(q, k, v, k_pool, v_pool, meta)

    def forward_dense(self, x, cos, sin, ctx, ctx_cos, ctx_sin, mask):
        """Training. x [N, Q, H] (all blocks of a sequence), ctx [N, S, H], mask [N, Q, S + Q] bool."""
        n, length = x.shape[0], x.shape[1]
        q, k, v = self.project_qkv(x, cos, sin)
        kc, vc = self.context_kv(ctx, ctx_cos, ctx_sin)
        keys = torch.cat([kc, k], dim=1).transpose(1, 2)  # [N, Hkv, S + Q, D]
        values = torch.cat([vc, v], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1), scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))


def draft_before_attention(layer, h, cos, sin, ctx, ctx_cos, ctx_sin):
    """Input norm and q/k/v of the block rows h [Tq, H]; k/v of the new context rows ctx [Tc, H] (the fused
    target features enter as keys and values only) → (q, k, v, kc, vc)."""
    q, k, v = layer.self_attn.project_qkv(layer.input_layernorm(h), cos, sin)
    kc, vc = layer.self_attn.context_kv(ctx, ctx_cos, ctx_sin)
    return q, k, v, kc, vc


class DraftLayer(nn.Module):
    """Pre-norm decoder block with the target's layer shapes; context enters only as keys/values."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DraftAttention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            qkv_bias=c.qkv_bias, o_bias=c.o_bias, qk_norm=c.qk_norm, eps=c.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)

    def forward_paged(self, h, cos, sin, ctx, ctx_cos, ctx_sin, k_pool, v_pool, meta, dense_parts=None):
        """Inference: block rows h [Tq, H], new context rows ctx [Tc, H] (may be empty) → [Tq, H]. dense_parts:
        (before, after) around the paged attention, eager by default (`DSparkModel.compile_dense_parts`)."""
        before, after = dense_parts or (draft_before_attention, after_attention)
        q, k, v, kc, vc = before(self, h, cos, sin, ctx, ctx_cos, ctx_sin)
        return after(self, h, self.self_attn.attend_paged(q, k, v, kc, vc, k_pool, v_pool, meta))

    def forward_dense(self, h, cos, sin, ctx, ctx_cos, ctx_sin, mask):
        h = h + self.self_attn.forward_dense(self.input_layernorm(h), cos, sin, ctx, ctx_cos, ctx_sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def block_attention_mask(anchor_positions: torch.Tensor, block_valid: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Training mask [N, A·γ, S + A·γ]: block b sees context j < anchor_b and every slot of its own block.

    anchor_positions [N, A] long; block_valid [N, A] bool (dummy blocks see only themselves: no NaN rows).
    """
    n, num_anchors = anchor_positions.shape
    device = anchor_positions.device
    query_block = torch.arange(num_anchors, device=device).repeat_interleave(block_size)  # [A·γ]
    ctx_idx = torch.arange(seq_len, device=device)
    anchors = anchor_positions[:, query_block]  # [N, A·γ]
    sees_ctx = (ctx_idx.view(1, 1, -1) < anchors.unsqueeze(-1)) & block_valid[:, query_block].unsqueeze(-1)
    same_block = (query_block.view(-1, 1) == query_block.view(1, -1)).unsqueeze(0).expand(n, -1, -1)
    return torch.cat([sees_ctx, same_block], dim=-1)


class DSparkModel(DraftCheckpointMixin, nn.Module):
    """The drafter network; module names are the released checkpoints' tensor names (docs/design.md §7).
    `from_pretrained` / `save_pretrained` read and write that layout (config.json + model.safetensors)."""

    parse_config = staticmethod(parse_dspark_config)

    def __init__(self, config: DSparkConfig):
        super().__init__()
        self.config = config
        c = config.layers
        hidden, vocab = c.hidden_size, c.vocab_size
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, c.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(hidden, c.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.markov_head = None
        if config.markov_rank > 0:
            self.markov_head = SEQUENTIAL_HEADS[config.markov_head_type](vocab, hidden, config.markov_rank)
        self.confidence_head = None
        if config.enable_confidence_head:
            self.confidence_head = ConfidenceHead(hidden, config.markov_rank if config.confidence_head_with_markov else 0)
        self.greedy_confidence_head = None
        if config.enable_greedy_confidence_head:
            self.greedy_confidence_head = ConfidenceHead(hidden, config.markov_rank if config.confidence_head_with_markov else 0)
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, c.max_position_embeddings)
        self.dense_parts = None  # None: eager; `compile_dense_parts()` → torch.compile'd

    def compile_dense_parts(self) -> None:
        """Run the draft layers' dense parts of the block pass through torch.compile (as the target's:
        `dspark.models.decoder.compiled`); the sequential head stays eager."""
        self.dense_parts = compiled(draft_before_attention), compiled(after_attention)

    # -- pieces shared by inference and training ----------------------------------------------------
    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """[..., L·H] concatenated target layer outputs → [..., H] (docs/design.md §2.2 context fusion)."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def block_token_ids(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """[...] anchors → [..., γ] = [x0, mask, ..., mask]."""
        ids = torch.full((*anchor_tokens.shape, self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_tokens.device)
        ids[..., 0] = anchor_tokens
        return ids

    def heads(
        self, hidden: torch.Tensor, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Teacher-forced draft logits and confidence logits for whole blocks.

        hidden [N, γ, H] post-norm block states; prev_tokens [N, γ] = [x0, x_1, ..., x_{γ−1}] →
        (logits [N, γ, V] float32 incl. the sequential bias, confidence logits [N, γ] float32 or None,
        greedy confidence logits [N, γ] float32 or None).
        """
        logits = self.lm_head(hidden).float()
        if self.markov_head is not None:
            logits = logits + self.markov_head.block_bias(prev_tokens, hidden).float()
        greedy = None if self.greedy_confidence_head is None else self._confidence(self.greedy_confidence_head, hidden, prev_tokens)
        return logits, self.confidence_logits(hidden, prev_tokens), greedy

    def _confidence(self, head: ConfidenceHead, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        prev_emb = self.markov_head.markov_w1(prev_tokens) if self.config.confidence_head_with_markov else None
        return head(hidden, prev_emb)

    def confidence_logits(
        self, hidden: torch.Tensor, prev_tokens: torch.Tensor, greedy_rows: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Raw confidence logits (paper Eq. 7): hidden [N, γ, H], prev_tokens [N, γ] (x_{k−1} per slot) →
        [N, γ] float32, or None without a confidence head. Rows flagged in greedy_rows [N] bool read the greedy
        confidence head instead, when the checkpoint has one (trained on greedy acceptance, docs/design.md §2.4)."""
        if self.confidence_head is None:
            return None
        logits = self._confidence(self.confidence_head, hidden, prev_tokens)
        if greedy_rows is not None and self.greedy_confidence_head is not None:
            greedy = self._confidence(self.greedy_confidence_head, hidden, prev_tokens)
            logits = torch.where(greedy_rows[:, None], greedy, logits)
        return logits

    # -- inference ------------------------------------------------------------------------------------
    def forward_block(
        self, cache: PagedKVCache, handles: list[int], new_features: list[torch.Tensor], anchor_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Append each sequence's new context rows to `cache`, run its block, drop the block's K/V.

        new_features[b]: [n_b, L·H]; anchor_tokens [B]. Returns post-norm block hidden states [B, γ, H].
        """
        block_size = self.config.block_size
        with blocks_dropped_after(cache, handles, new_features):
            meta = cache.prepare(handles, [block_size] * len(handles), kv_only_lens=[f.shape[0] for f in new_features],
                                 causal=False)
            ctx = self.fuse_context(torch.cat(new_features)) if meta.kv_only_positions.numel() else \
                torch.zeros(0, self.config.layers.hidden_size, dtype=self.fc.weight.dtype, device=anchor_tokens.device)
            return self.block_pass(cache, meta, ctx, anchor_tokens).view(len(handles), block_size, -1)

    def block_pass(self, cache: PagedKVCache, meta: AttentionMetadata, ctx: torch.Tensor, anchor_tokens: torch.Tensor
                   ) -> torch.Tensor:
        """The draft layers over B blocks [x0, mask, ..., mask]: ctx [Tc, H] fused context rows (written into
        `cache` as K/V at `meta.kv_only_slot_mapping`), anchor_tokens [B] → post-norm hidden states [B·γ, H]."""
        h = self.embed_tokens(self.block_token_ids(anchor_tokens).view(-1))
        cos, sin = self.rotary(meta.positions, h.dtype)
        ctx_cos, ctx_sin = self.rotary(meta.kv_only_positions, h.dtype)
        for index, layer in enumerate(self.layers):
            h = layer.forward_paged(h, cos, sin, ctx, ctx_cos, ctx_sin, cache.k_pools[index], cache.v_pools[index],
                                    meta, self.dense_parts)
        return self.norm(h)

    # -- training -------------------------------------------------------------------------------------
    def forward_train(
        self, features: torch.Tensor, anchor_positions: torch.Tensor, anchor_tokens: torch.Tensor, block_valid: torch.Tensor
    ) -> torch.Tensor:
        """All blocks of a batch in one pass.

        features [N, S, L·H] (target layer outputs of every position), anchor_positions [N, A],
        anchor_tokens [N, A], block_valid [N, A] bool → post-norm block hidden states [N, A, γ, H].
        """
        n, seq_len = features.shape[:2]
        num_anchors, block_size = anchor_positions.shape[1], self.config.block_size
        ctx = self.fuse_context(features)
        h = self.embed_tokens(self.block_token_ids(anchor_tokens).view(n, num_anchors * block_size))
        positions = (anchor_positions.unsqueeze(-1) + torch.arange(block_size, device=h.device)).view(n, -1)
        cos, sin = self.rotary(positions, h.dtype)
        ctx_cos, ctx_sin = self.rotary(torch.arange(seq_len, device=h.device).expand(n, -1), h.dtype)
        mask = block_attention_mask(anchor_positions, block_valid, seq_len, block_size)
        for layer in self.layers:
            h = layer.forward_dense(h, cos, sin, ctx, ctx_cos, ctx_sin, mask)
        return self.norm(h).view(n, num_anchors, block_size, -1)


def dspark_config_for_target(
    target_hf_config: dict,
    *,
    target_layer_ids: tuple[int, ...],
    mask_token_id: int,
    num_draft_layers: int = 5,
    block_size: int = 7,
    markov_rank: int = 256,
    markov_head_type: str = "vanilla",
    enable_confidence_head: bool = True,
    confidence_head_with_markov: bool = True,
    greedy_confidence_head: bool = False,
    num_anchors: int = 512,
) -> DSparkConfig:
    """A drafter config with the target's layer shapes (DeepSpec's construction, docs/design.md §7).
    markov_rank=0 and enable_confidence_head=False give DFlash."""
    hf = dict(target_hf_config)
    hf.update(
        num_target_layers=target_hf_config["num_hidden_layers"],
        num_hidden_layers=num_draft_layers,
        block_size=block_size,
        target_layer_ids=list(target_layer_ids),
        mask_token_id=mask_token_id,
        num_anchors=num_anchors,
        markov_rank=markov_rank,
        markov_head_type=markov_head_type,
        enable_confidence_head=enable_confidence_head,
        confidence_head_with_markov=confidence_head_with_markov and enable_confidence_head and markov_rank > 0,
        enable_greedy_confidence_head=greedy_confidence_head and enable_confidence_head,
    )
    return parse_dspark_config(hf, where="drafter config")


def init_from_target(config: DSparkConfig, target, *, seed: int = 0, std: float = 0.02) -> DSparkModel:
    """A freshly initialised drafter for `target` (a `DecoderModel`): trainable weights ~ N(0, std²), norms 1,
    biases 0; input embedding and LM head copied from the target (frozen in training, docs/design.md §2.2)."""
    with torch.device(next(target.parameters()).device):
        model = DSparkModel(config)
    return init_draft_weights(model, target, seed=seed, std=std)


class DSparkDrafter(Drafter):
    """Runs a `DSparkModel` as a drafter: one backbone pass, then the sequential sampling loop.

    Each slot's draft is sampled from the exact float32 distribution logits_to_probs(U_k + B_k) under the
    request's own sampling parameters, and that tensor is returned as q (docs/design.md §1).
    Confidences c_k = σ(confidence logit) use the token actually sampled at slot k−1; greedy requests read
    the greedy confidence head when the checkpoint has one.
    """

    def __init__(self, model: DSparkModel, *, cache_page_size: int = 16, graphs: bool | None = None):
        """graphs: run the block pass and the sequential head in capture buckets replayed from captured graphs
        (`StaticDraftStep`); None = on CUDA only (`use_graphs(False)`: `--enforce-eager`)."""
        self.model = model.eval()
        cfg = model.config
        self.name = "dflash" if cfg.is_dflash else f"dspark-{cfg.markov_head_type}"
        self.block_size = cfg.block_size
        self.feature_layer_ids = cfg.target_layer_ids
        self.provides_confidence = model.confidence_head is not None
        param = model.fc.weight
        c = cfg.layers
        self.cache = PagedKVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, page_size=cache_page_size, dtype=param.dtype, device=param.device
        )
        self._handles: dict[int, int] = {}
        self.static: StaticDraftStep | None = None
        self.use_graphs(graphs)

    def use_graphs(self, enabled: bool | None = None, *, max_batch: int = 256, attention="auto") -> None:
        """Replay rounds of up to `max_batch` sequences (block pass and sequential head) from captured graphs
        (`StaticDraftStep`), or run them eagerly (`--enforce-eager`). None: on CUDA only. attention: the rounds' attention
        kernel (`dspark.models.static_step.static_forwards`)."""
        self.static = static_forwards(self.model.fc.weight.device, enabled, attention,
                                      lambda **kw: StaticDraftStep(self, max_batch=max_batch, **kw))

    def check_target(self, target_config: DecoderConfig) -> None:
        check_drafter_target(self.name, self.model.config, target_config)

    @torch.inference_mode()
    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        handles, feats = [], []
        device = self.model.fc.weight.device
        for item in batch:
            handles.append(context_handle(self, self.cache, self._handles, item))
            feats.append(item.new_features.to(device))
        uniforms = draft_uniforms(batch, self.block_size)
        samplings = [item.sampling for item in batch]
        bucket = None
        if self.static is not None and (uniforms is not None or all(s.greedy for s in samplings)):
            bucket = self.static.bucket([self.cache.length(h) for h in handles], [f.shape[0] for f in feats], samplings)
        anchors = torch.tensor([item.token_ids[-1] for item in batch], dtype=torch.long)
        if bucket is not None:
            tokens, probs, confidence_logits = self.static.propose(handles, feats, anchors, samplings, uniforms, bucket)
        else:
            anchors, *uniforms = to_device([anchors] + ([] if uniforms is None else [uniforms]), device)
            hidden = self.model.forward_block(self.cache, handles, feats, anchors)
            tokens, probs, confidence_logits = self.sample_block(hidden, anchors, samplings, generator,
                                                                 uniforms[0] if uniforms else None)
        lengths = torch.tensor([min(item.max_tokens, self.block_size) for item in batch], dtype=torch.long)
        return DraftProposal(tokens=tokens, lengths=lengths, probs=probs, confidence_logits=confidence_logits)

    def sample_block(
        self, hidden: torch.Tensor, anchors: torch.Tensor, samplings: list[SamplingParams] | RowSampling, generator,
        uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sequential stage (paper Eq. 4): left to right, p_k = softmax(U_k + B_k(x_{k−1})), sample x_k (from
        uniforms[:, k] [B, γ] when given, else from `generator`).

        hidden [B, γ, H] → tokens [B, γ], probs [B, γ, V] float32 (exactly what was sampled from),
        confidence_logits [B, γ] float32 (the raw head's, Eq. 7; c_k = σ(logit)) or None.
        samplings as a `RowSampling` (a captured graph, `StaticDraftStep`): the same distributions and tokens
        without a host branch (`logits_to_probs_by_row`; uniforms required, any value on greedy rows).
        """
        model = self.model
        base = model.lm_head(hidden).float()
        batch, block_size = hidden.shape[:2]
        head = model.markov_head
        state = head.initial_state(batch, hidden[:, 0]) if head is not None else None
        prev = anchors
        by_row = isinstance(samplings, RowSampling)
        all_greedy = not by_row and all(s.greedy for s in samplings)
        tokens, probs = [], []
        for k in range(block_size):
            logits = base[:, k]
            if head is not None:
                bias, state = head.step(prev, hidden[:, k], state)
                logits = logits + bias.float()
            if by_row:
                q = logits_to_probs_by_row(logits, samplings)
                prev = q.argmax(-1)
                if samplings.mode != "greedy":
                    prev = torch.where(samplings.greedy, prev, sample(q, uniforms=uniforms[:, k]))
            else:
                q = logits_to_probs(logits, samplings)
                # All greedy: q is one-hot, and its argmax is the token inverse-CDF sampling would draw.
                prev = q.argmax(-1) if all_greedy else sample(q, generator, None if uniforms is None else uniforms[:, k])
            tokens.append(prev)
            probs.append(q)
        tokens = torch.stack(tokens, dim=1)
        # The confidence head reads h_k and x_{k−1} only, so it runs once over the block after sampling;
        # greedy requests read the head trained on greedy acceptance where there is one.
        greedy_rows = None
        if model.greedy_confidence_head is not None and by_row:
            greedy_rows = samplings.greedy
        elif model.greedy_confidence_head is not None:
            (greedy_rows,) = to_device([torch.tensor([s.greedy for s in samplings], dtype=torch.bool)], hidden.device)
        confidence_logits = model.confidence_logits(hidden, torch.cat([anchors[:, None], tokens[:, :-1]], dim=1),
                                                    greedy_rows)
        return tokens, torch.stack(probs, dim=1), confidence_logits

    def release(self, seq_id: int) -> None:
        handle = self._handles.pop(seq_id, None)
        if handle is not None:
            self.cache.free_sequence(handle)


def load_dspark_drafter(folder: str | Path, *, device="auto", dtype=None, target=None) -> DSparkDrafter:
    model = DSparkModel.from_pretrained(folder, device=device, dtype=dtype, target=target)
    fuse_projections(model)  # a loaded drafter only drafts: fused projections (training builds its own)
    return DSparkDrafter(model)


for _architecture in ARCHITECTURE_NAMES.values():
    register_drafter(_architecture, load_dspark_drafter)
