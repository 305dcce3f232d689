"""`TargetRunner`: the target model plus the KV cache it owns — the one object decoding talks to.

It serves prefill, plain decoding and verification with the same call: `forward(seq_ids, new_tokens)`
appends each sequence's new tokens (any count ≥ 1, different per sequence) and returns next-token
logits for every new position (or only the last), plus, on request, the raw outputs of chosen decoder
layers (the target features drafters condition on, docs/design.md §2.1). `truncate` rolls a sequence back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dspark.devices import resolve_device, resolve_dtype, to_device
from dspark.errors import RequestError
from dspark.models.checkpoint import IndexExpectation, check_index, load_state_into, read_tensor_index
from dspark.models.config import DecoderConfig, parse_decoder_config, read_config_json
from dspark.models.decoder import DecoderModel
from dspark.models.kv_cache import PagedKVCache
from dspark.models.static_step import StaticStep, static_forwards

def index_expectation(config: DecoderConfig) -> IndexExpectation:
    """What a target config fixes about its checkpoint before the model is built: `model.layers.{i}.` for
    i < num_layers, the embedding [V, H] and layer 0's q_proj [heads·D, H]."""
    c = config
    return IndexExpectation("model.layers.", c.num_layers, {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
    })


@dataclass
class RunnerOutput:
    """Result of one ragged forward over B sequences with query lengths q_b (T = Σ q_b)."""

    logits: torch.Tensor  # [T, V] float32 (all positions) or [B, V] (last position of each sequence)
    query_lens: list[int]
    features: torch.Tensor | None = None  # [T, L·H] raw layer outputs of the requested layers
    final_hidden: torch.Tensor | None = None  # [T, H] post-final-norm hidden states (training targets)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Split a [T, ...] tensor into per-sequence [q_b, ...] views."""
        return list(torch.split(tensor, self.query_lens))


class TargetRunner:
    """Owns a `DecoderModel` and its `PagedKVCache`; sequences are integer handles into the cache."""

    def __init__(
        self,
        model: DecoderModel,
        *,
        cache_page_size: int = 16,
        max_cache_pages: int | None = None,
        name: str = "model",
        compile: bool = False,
        graphs: bool | None = None,
    ):
        """model: moved to its device and dtype already (its q/k/v and gate/up projections are fused here,
        `DecoderModel.fuse_projections`); compile: `DecoderModel.compile_dense_parts`; graphs: run forwards of
        at most `StaticStep.max_query_len` tokens per sequence (decoding, verification) in a capture bucket's
        static shapes, replayed from captured graphs (`dspark.models.static_step`); None = on CUDA only
        (`--enforce-eager` turns it off)."""
        self.model = model.eval()
        model.fuse_projections()
        if compile:
            model.compile_dense_parts()
        self.config: DecoderConfig = model.config
        self.name = name
        self.hf_config: dict = {}  # the target's config.json, when loaded from a folder
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = self.config
        self.cache = PagedKVCache(
            c.num_layers, c.num_kv_heads, c.head_dim,
            page_size=cache_page_size, max_pages=max_cache_pages, dtype=self.dtype, device=self.device,
        )
        self.static: StaticStep | None = None
        self.use_graphs(graphs)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
        **kwargs,
    ) -> "TargetRunner":
        """Load an HF-format folder (config.json + *.safetensors) of a supported family on `device`
        (dspark.devices: "auto" = CUDA when available, else CPU)."""
        folder = Path(folder)
        device = resolve_device(device)
        hf_config = read_config_json(folder)
        where = str(folder / "config.json")
        config = parse_decoder_config(hf_config, where=where)
        torch_dtype = resolve_dtype(dtype, device)
        index = read_tensor_index(folder)
        check_index(index, index_expectation(config), folder, where)
        with torch.device("meta"):
            model = DecoderModel(config)
        optional = ("lm_head.weight",) if config.tie_word_embeddings else ()
        load_state_into(model, folder, dtype=torch_dtype, device=device, optional=optional, index=index)
        runner = cls(model, name=str(folder), **kwargs)
        runner.hf_config = hf_config
        return runner

    def use_graphs(self, enabled: bool | None = None, *, max_batch: int = 256, attention="auto") -> None:
        """Run decoding and verification forwards of up to `max_batch` sequences in capture buckets replayed from
        captured graphs (`StaticStep`), or all forwards ragged. None: on CUDA only. attention: "sdpa", "flex" or
        "auto" (`dspark.models.flex_paged.attention_kernel`); a paged kernel runs the buckets' forwards without
        graphs too (eagerly, padded). Drops earlier captures."""
        self.static = static_forwards(self.device, enabled, attention,
                                      lambda **kw: StaticStep(self.model, self.cache, max_batch=max_batch, **kw))

    # -- sequence handles ------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def new_sequence(self) -> int:
        return self.cache.new_sequence()

    def free_sequence(self, seq_id: int) -> None:
        self.cache.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.cache.length(seq_id)

    def truncate(self, seq_id: int, new_length: int) -> None:
        self.cache.truncate(seq_id, new_length)

    # -- compute ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        seq_ids: Sequence[int],
        new_tokens: Sequence[Sequence[int] | torch.Tensor],
        *,
        all_logits: bool = True,
        logits_per_sequence: Sequence[int] | None = None,
        feature_layer_ids: tuple[int, ...] = (),
        return_final_hidden: bool = False,
    ) -> RunnerOutput:
        """Append `new_tokens[b]` to sequence `seq_ids[b]` and run them through the model in one pass.

        all_logits=True → logits for every new position [T, V] (verification); False → only the last
        new position of each sequence [B, V] (prefill / plain decoding). logits_per_sequence (overrides
        all_logits): logits of the last n_b new positions of sequence b (0 ≤ n_b ≤ q_b), [Σ n_b, V] — the
        engine's mixed steps: all rows of a verified block, the last row of a finished prompt, none of a
        prompt chunk.
        return_final_hidden: also return the post-norm hidden state of every new position [T, H] (the
        target's own next-token distribution is lm_head of it; drafter losses need it, docs/design.md §2.5).
        """
        if all(isinstance(t, (list, tuple)) for t in new_tokens):  # the engine's rows: one tensor from the lists
            query_lens = [len(t) for t in new_tokens]
            ids = [token for t in new_tokens for token in t]
            lowest, highest = (min(ids), max(ids)) if ids else (0, 0)
            flat = torch.tensor(ids, dtype=torch.long)
        else:
            tensors = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in new_tokens]
            query_lens = [int(t.numel()) for t in tensors]
            flat = torch.cat(tensors)
            lowest, highest = (int(flat.min()), int(flat.max())) if flat.numel() else (0, 0)
        for seq_id, q in zip(seq_ids, query_lens):
            end = self.cache.length(seq_id) + q
            if end > self.max_context:
                raise RequestError(
                    f"sequence {seq_id} would reach {end} tokens, beyond the model's context of {self.max_context}"
                )
        self.model.validate_feature_layers(tuple(feature_layer_ids))
        vocab = self.config.vocab_size
        if lowest < 0 or highest >= vocab:
            raise RequestError(f"token id out of range [0, {vocab})")
        rows = None
        if logits_per_sequence is not None:
            counts = [int(n) for n in logits_per_sequence]
            if len(counts) != len(query_lens) or any(not 0 <= n <= q for n, q in zip(counts, query_lens)):
                raise ValueError(f"logits_per_sequence {counts} does not fit the query lengths {query_lens}")
            ends = list(itertools.accumulate(query_lens))
            rows = torch.cat([torch.arange(end - n, end) for end, n in zip(ends, counts)] + [torch.zeros(0, dtype=torch.long)])
        elif not all_logits:
            rows = torch.tensor(query_lens).cumsum(0) - 1
        starts = [self.cache.length(s) for s in seq_ids]
        bucket = None
        if self.static is not None and not return_final_hidden and flat.device.type == "cpu":
            bucket = self.static.bucket(query_lens, starts, tuple(feature_layer_ids))
        try:
            if bucket is not None:
                logits, features = self.static.forward(list(seq_ids), flat, query_lens, bucket, rows)
                return RunnerOutput(logits=logits, query_lens=query_lens, features=features)
            meta = self.cache.prepare(list(seq_ids), query_lens)
            token_ids, *moved = to_device([flat] + ([] if rows is None else [rows]), self.device)
            out = self.model(
                token_ids, self.cache, meta, logits_rows=moved[0] if moved else None, feature_layer_ids=tuple(feature_layer_ids),
                return_final_hidden=return_final_hidden,
            )
        except BaseException:
            for seq_id, start in zip(seq_ids, starts):
                if self.cache.length(seq_id) > start:
                    self.cache.truncate(seq_id, start)
            raise
        return RunnerOutput(logits=out.logits, query_lens=query_lens, features=out.features, final_hidden=out.final_hidden)
