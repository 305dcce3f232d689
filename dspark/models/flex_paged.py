"""Paged attention that reads the KV cache where it lies: FlexAttention over the page pools (issue 17 item 3;
docs/architecture.md, "paged attention kernels").

The SDPA attention of a static forward (`StaticLayout.metadata`) gathers every sequence's keys into a padded
[B, Hkv, P · page, D] buffer per layer before attending: the context's K/V are read, written and read again.
`FlexPagedAttention` instead hands `torch.nn.attention.flex_attention` the whole pool as one key sequence of
`pool_pages · page` slots ([1, Hkv, slots, D], a view: nothing is copied) and a `BlockMask` whose KV blocks are
the cache's pages. Sequence b visits only the ⌈c_b / page⌉ pages of its page table (`StaticLayout.page_table`),
so the kernel streams each context page once from the pool. The pages every query row sees whole (below c_b and not past
query row 0's position) are the mask's full blocks, which skip the mask function; the rest (a decoding row's
last page, the pages of a verification's own rows) are its partial blocks.

The mask_mod maps a visited slot back to its place in the sequence: `owner` and `logical_page` of every
physical page are scattered from the page tables once per forward (on the device, shared by all layers). A
slot is kept iff its page belongs to the sequence, its position is below the context length c_b and, for a
query row r, not past query_starts[b] + r (the `StaticLayout` convention: a non-causal forward sets
query_starts to c_b). Padding sequences own no page (the scratch page, their whole page table, belongs to
none): their rows see no key, and FlexAttention returns zeros for them (SDPA would return NaN, which is why the
gathering path lets them see the scratch slot instead).

compiled=True (what `--attention-backend flex` runs): flex_attention under `torch.compile` with static shapes —
Triton kernels on CUDA (the flex-decoding kernel for the short queries of decoding and verification, its key
block no wider than the page), Inductor's C++ kernel on the CPU; one compilation per capture bucket's shapes,
during the bucket's warm-up (before any CUDA graph capture). compiled=False runs FlexAttention's reference
implementation, which scores every query against the whole pool: the tests' way to check the mask and the page
mapping on tiny pools, never for serving.

The block mask is PyTorch's own paged-attention construction (the one `torch.nn.attention.experimental`'s
PagedAttention builds), so no package beyond torch is needed: FlashInfer and flash-attn are not installed where
this project's GPU checks run, and FlexAttention runs on the CPU too, where CI tests it.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dspark.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")  # `--attention-backend`
RECOMPILE_LIMIT = 1024  # one compilation per bucket shape; dynamo's default limit (8) would drop to eager


def attention_kernel(backend: "str | FlexPagedAttention", device: torch.device) -> "FlexPagedAttention | None":
    """The kernel of `--attention-backend` on `device` (a kernel given is kept): None = SDPA over gathered keys.

    "auto" is SDPA on every device for now. The flex kernel has not yet run on a GPU; it compiles once per
    capture bucket's shapes the first time a bucket occurs (a stall of seconds mid-serving, where a capture
    alone takes milliseconds), and whether it beats gathering at this project's page size of 16 is what
    `benchmarks/gpu_check.py`'s `attention` section measures. auto becomes flex on CUDA once that run shows
    it faster (docs/benchmarks.md, "What the first GPU session runs")."""
    if isinstance(backend, FlexPagedAttention):
        return backend
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    return FlexPagedAttention() if backend == "flex" else None


class FlexPagedAttention:
    """FlexAttention over the paged KV pools (module docstring); compiled=False: the reference implementation."""

    def __init__(self, compiled: bool = True):
        self.compiled = compiled
        self._function = None

    @property
    def name(self) -> str:
        return "flex" if self.compiled else "flex (reference)"

    def group(self, page_table: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor,
              page_size: int, query_len: int) -> "FlexPagedGroup":
        """The attention group of one static forward from its `StaticLayout` fields (device tensors): page_table
        [B, P] (the scratch page past each sequence's pages), context_lens [B], query_starts [B]."""
        return FlexPagedGroup(self, page_table, context_lens, query_starts, page_size, query_len)

    def __call__(self, query, key, value, block_mask: BlockMask, scale: float, enable_gqa: bool) -> torch.Tensor:
        if not self.compiled:
            return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
        if self._function is None:
            self._function = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._function(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


_SKIP_Q_BLOCKS = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(
    BlockMask.from_kv_blocks).parameters else {}  # the transposed (backward) indices: not needed, not built


class FlexPagedGroup:
    """The one attention group of a static forward read through `FlexPagedAttention`: B sequences of `query_len`
    query rows each (flat row b · query_len + r). `attend` is called by every layer; the block mask is made by
    the first (it needs the pool's size) and shared by the rest."""

    token_rows = None  # every row of the forward, in order

    def __init__(self, kernel: FlexPagedAttention, page_table: torch.Tensor, context_lens: torch.Tensor,
                 query_starts: torch.Tensor, page_size: int, query_len: int):
        self.kernel, self.page_table, self.page_size, self.query_len = kernel, page_table, page_size, query_len
        self.context_lens, self.query_starts = context_lens, query_starts
        self._block_mask: BlockMask | None = None

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B · Q, Hq, D]; pools [slots, Hkv, D] (slots = pool pages · page) → [B · Q, Hq, D]."""
        batch, heads, head_dim = self.page_table.shape[0], q.shape[1], q.shape[2]
        if self._block_mask is None:
            self._block_mask = self._make_block_mask(k_pool.shape[0] // self.page_size)
        query = q.view(batch, self.query_len, heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]
        keys, values = (pool.transpose(0, 1).unsqueeze(0) for pool in (k_pool, v_pool))  # [1, Hkv, slots, D]
        out = self.kernel(query, keys, values, self._block_mask, scale, heads != k_pool.shape[1])
        return out.transpose(1, 2).reshape(batch * self.query_len, heads, head_dim)

    def _make_block_mask(self, pool_pages: int) -> BlockMask:
        table, size = self.page_table, self.page_size
        batch, pages = table.shape
        device = table.device
        used = torch.div(self.context_lens + size - 1, size, rounding_mode="floor")  # [B] pages holding keys
        scratch = pool_pages - 1  # the cache's scratch page, last in the pool: a padding sequence's only page
        live = (torch.arange(pages, device=device) < used.unsqueeze(1)) & (table != scratch)  # [B, P]
        # owner / logical page of each physical page; the entries not live land on the extra index
        scatter_at = torch.where(live, table, pool_pages).reshape(-1)
        owner = torch.full((pool_pages + 1,), -1, dtype=torch.long, device=device)
        owner.index_copy_(0, scatter_at, torch.arange(batch, device=device).repeat_interleave(pages))
        logical_page = torch.zeros(pool_pages + 1, dtype=torch.long, device=device)
        logical_page.index_copy_(0, scatter_at, torch.arange(pages, device=device).repeat(batch))
        owner, logical_page = owner[:pool_pages], logical_page[:pool_pages]
        context_lens, query_starts = self.context_lens, self.query_starts

        def mask_mod(b, h, q_idx, kv_idx):
            page = kv_idx // size
            position = logical_page[page] * size + kv_idx % size
            return (owner[page] == b) & (position < context_lens[b]) & (position <= query_starts[b] + q_idx)

        # Full pages (every query row sees every slot: below the context and not past query row 0) skip the
        # mask function; the rest of the used pages, the partial ones, apply it.
        full = torch.div(torch.minimum(self.context_lens, self.query_starts + 1), size, rounding_mode="floor")
        full = torch.where(live[:, 0], full, 0)
        columns = torch.arange(pages, device=device)
        partial = table.gather(1, (columns + full.unsqueeze(1)).clamp(max=pages - 1))  # pages full_b, full_b + 1, ...

        def indices(rows: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(batch, 1, 1, pool_pages, dtype=torch.int32, device=device)
            out[:, 0, 0, :pages] = rows.to(torch.int32)
            return out

        return BlockMask.from_kv_blocks((used - full).to(torch.int32).view(batch, 1, 1), indices(partial),
                                        full.to(torch.int32).view(batch, 1, 1), indices(table),
                                        BLOCK_SIZE=(max(128, self.query_len), size), mask_mod=mask_mod,
                                        seq_lengths=(self.query_len, pool_pages * size), **_SKIP_Q_BLOCKS)
