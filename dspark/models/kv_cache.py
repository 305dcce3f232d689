"""Paged KV cache (fixed-size pages of token slots) and the metadata of one ragged forward pass.

Storage: per layer, one K pool and one V pool of shape [num_pages * page_size, num_kv_heads, head_dim]
("slots"). A sequence owns an ordered list of pages (its page table); token position p of that
sequence lives in slot `table[p // page_size] * page_size + p % page_size`. Rolling a sequence back
is just lowering its length (and returning whole pages past the new end to the free list): slots past
the length are overwritten by the next forward.

Pools are zeroed when allocated, so every slot holds a finite value: a paged kernel (`dspark.models.flex_paged`)
reads whole pages, the slots past a sequence's length included, and a masked slot's value still meets a zero
weight (NaN · 0 is NaN). Each pool holds one page more than `num_pages`: the scratch page (`scratch_slot`),
owned by no sequence. The static-shape step (`dspark.models.static_step`) points its padding rows' writes and its padded
keys there, so padding never touches a sequence's slots and never reads uninitialised memory.

Two ways to size the pools. Standalone use (training, evaluation, profiling) lets them grow on demand
(re-allocated, contents copied) up to `max_pages`. The engine calls `allocate(num_pages, page_size)` once:
the pools are then allocated exactly once and never grow; its block manager (`dspark.engine.block_manager`)
keeps every sequence within them, and `CacheCapacityError` past them is a bug, not back-pressure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from dspark.devices import to_device
from dspark.errors import CacheCapacityError


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded together into one attention call: b sequences, queries padded to
    max_q, keys gathered and padded to max_c."""

    token_rows: torch.Tensor | None  # [Tg] rows of the forward's T tokens in this group (None: all, in order)
    gather_slots: torch.Tensor  # [b, max_c] flat slots of each sequence's keys, padded with slot 0
    padded_index: torch.Tensor  # [Tg] row of each of its tokens in the padded [b * max_q] query layout
    attn_mask: torch.Tensor | None  # [b, 1, max_q, max_c] bool, True = may attend; None = see below
    max_query_len: int
    num_tokens: int
    # One sequence whose queries are the last max_q of its max_c positions, each seeing the keys up to its
    # own (a prompt, a prompt chunk, one request's verification rows): attn_mask is then None for a whole
    # prompt (max_q = max_c: SDPA's own causal mask, no mask in memory) or the [max_q, max_c] causal band
    # built on the device. False with attn_mask None: every query sees every key.
    causal_lower_right: bool = False
    _packed_masks: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.gather_slots.shape[0]

    @functools.cached_property
    def flat_slots(self) -> torch.Tensor:
        """gather_slots as [b · max_c], made once per forward and read by every layer."""
        return self.gather_slots.reshape(-1)

    def packed_mask(self, groups: int) -> torch.Tensor | None:
        """attn_mask repeated for GQA packing ([b, 1, G · max_q, max_c]: query row g · max_q + i is query i of
        the g-th head sharing a KV head), made once per forward and read by every layer."""
        if self.attn_mask is None or groups == 1:
            return self.attn_mask
        if groups not in self._packed_masks:
            self._packed_masks[groups] = self.attn_mask.repeat(1, 1, groups, 1)
        return self._packed_masks[groups]


@dataclass
class AttentionMetadata:
    """Everything attention needs for one ragged batch, built once per forward and shared by all layers.

    B sequences with query lengths q_b (≥ 1) and context lengths c_b (cached tokens + new ones), T = Σ q_b.
    Drafters may also write n_b K/V-only rows per sequence before its queries (`kv_only_*`). Attention runs
    per `AttentionGroup`: sequences of similar query length share one padded call (`group_by_query_length`),
    so prompt chunks and one-token decoding rows in one forward are not padded to each other's size.
    """

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V is written to
    query_lens: list[int]  # q_b
    context_lens: list[int]  # c_b, after this forward's tokens are written
    groups: list[AttentionGroup]
    kv_only_positions: torch.Tensor | None = None  # [Σ n_b] positions of K/V-only rows (drafter context)
    kv_only_slot_mapping: torch.Tensor | None = None  # [Σ n_b] their cache slots

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)


@dataclass
class StaticLayout:
    """Host-built inputs of one static-shape forward (`PagedKVCache.prepare_static`): `batch` sequences, each
    with `kv_only_len` K/V-only rows (row n of sequence b is flat row b · kv_only_len + n) and `query_len`
    query rows (flat row b · query_len + r), keys read from `pages` pages each. Query row r of sequence b sees
    key j iff j < context_lens[b] and j ≤ query_starts[b] + r (a non-causal forward sets query_starts[b] to the
    context length: every key of the sequence)."""

    positions: torch.Tensor  # [batch · query_len] long
    slot_mapping: torch.Tensor  # [batch · query_len] long: where each row's K/V is written (scratch for padding)
    kv_only_positions: torch.Tensor  # [batch · kv_only_len] long
    kv_only_slot_mapping: torch.Tensor  # [batch · kv_only_len] long (scratch for padding)
    query_starts: torch.Tensor  # [batch] long: the last key query row 0 sees (see above)
    context_lens: torch.Tensor  # [batch] long: keys of each sequence after the forward (1 for padding)
    page_table: torch.Tensor  # [batch, pages] long: the pages of each sequence's keys (the scratch page past them)
    real_rows: torch.Tensor  # [T] long: flat query rows of the real tokens, in the ragged batch's order
    real_kv_only_rows: torch.Tensor  # [Σ n_b] long: flat K/V-only rows of the real ones, in order

    PACKED = ("positions", "slot_mapping", "kv_only_positions", "kv_only_slot_mapping", "query_starts",
              "context_lens", "page_table")

    @classmethod
    def idle(cls, batch: int, query_len: int, pages: int, scratch_slot: int, page_size: int, kv_only_len: int = 0
             ) -> "StaticLayout":
        """Every row padding: writes to the scratch slot and reads the scratch page only."""
        def full(size: int, value: int) -> torch.Tensor:
            return torch.full((size,), value, dtype=torch.long)

        empty = torch.zeros(0, dtype=torch.long)
        return cls(positions=full(batch * query_len, 0), slot_mapping=full(batch * query_len, scratch_slot),
                   kv_only_positions=full(batch * kv_only_len, 0),
                   kv_only_slot_mapping=full(batch * kv_only_len, scratch_slot),
                   query_starts=full(batch, 0), context_lens=full(batch, 1),
                   page_table=torch.full((batch, pages), scratch_slot // page_size, dtype=torch.long),
                   real_rows=empty, real_kv_only_rows=empty)

    @staticmethod
    def packed_size(batch: int, query_len: int, pages: int, kv_only_len: int = 0) -> int:
        """Elements of `packed()` for these shapes."""
        return 2 * batch * query_len + 2 * batch * kv_only_len + 2 * batch + batch * pages

    def packed(self) -> torch.Tensor:
        """The `PACKED` fields as one flat long tensor (one copy to the device, one into a capture's buffer)."""
        return torch.cat([getattr(self, name).reshape(-1) for name in self.PACKED])

    @classmethod
    def metadata(cls, packed: torch.Tensor, batch: int, query_len: int, pages: int, page_size: int, scratch_slot: int,
                 kv_only_len: int = 0, *, kernel=None) -> AttentionMetadata:
        """`packed()` on the device → the forward's AttentionMetadata: one attention group of fixed shapes, made
        on the device (no host value read: capturable in a CUDA graph). By default the group gathers each
        sequence's keys, width = pages · page_size slots (those past its context: the scratch slot, so padding
        never reads another sequence's or a stale slot), under a mask [B, 1, Q, width]. With a paged `kernel`
        (`dspark.models.flex_paged.FlexPagedAttention`) the group is the kernel's, which reads the keys in the
        pools through the page table instead."""
        rows, kv_rows = batch * query_len, batch * kv_only_len
        positions, slots, kv_positions, kv_slots, query_starts, context_lens, table = packed.split(
            [rows, rows, kv_rows, kv_rows, batch, batch, batch * pages])
        table, width = table.view(batch, pages), pages * page_size
        if kernel is not None:
            group = kernel.group(table, context_lens, query_starts, page_size, query_len)
            return AttentionMetadata(positions=positions, slot_mapping=slots, query_lens=[query_len] * batch,
                                     context_lens=[width] * batch, groups=[group], kv_only_positions=kv_positions,
                                     kv_only_slot_mapping=kv_slots)
        keys = torch.arange(width, device=packed.device)
        gather = table.repeat_interleave(page_size, dim=1) * page_size + keys % page_size  # [B, width]
        gather = torch.where(keys < context_lens.view(batch, 1), gather, scratch_slot)
        keys = keys.view(1, 1, width)
        last_key = (query_starts.view(batch, 1) + torch.arange(query_len, device=packed.device)).unsqueeze(-1)
        mask = (keys < context_lens.view(batch, 1, 1)) & (keys <= last_key)  # [B, Q, C]
        group = AttentionGroup(token_rows=None, gather_slots=gather, padded_index=positions[:0],
                               attn_mask=mask.unsqueeze(1), max_query_len=query_len, num_tokens=rows)
        return AttentionMetadata(positions=positions, slot_mapping=slots, query_lens=[query_len] * batch,
                                 context_lens=[width] * batch, groups=[group], kv_only_positions=kv_positions,
                                 kv_only_slot_mapping=kv_slots)


MAX_PADDING = 2  # a query row of a group is padded to at most this many times its length ...
SHORT_QUERY = 16  # ... or to this many rows (decoding and verification rows always share one call)


def group_by_query_length(query_lens: list[int]) -> list[list[int]]:
    """Sequence indices in groups that share one padded attention call: by descending query length, a
    sequence joins the current group when the group's longest query is at most max(MAX_PADDING × its own,
    SHORT_QUERY), so no row's attention costs more than twice its own (apart from short rows) and a prompt
    chunk is never padded together with one-token rows. One group, in the original order, when all fit."""
    order = sorted(range(len(query_lens)), key=lambda b: -query_lens[b])
    groups, current = [], []
    for b in order:
        if current and query_lens[current[0]] > max(MAX_PADDING * query_lens[b], SHORT_QUERY):
            groups.append(current)
            current = []
        current.append(b)
    groups.append(current)
    if len(groups) == 1:
        return [list(range(len(query_lens)))]
    return groups


class PagedKVCache:
    """Paged K/V storage for `num_layers` layers plus the per-sequence page tables and lengths."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 16,
        initial_pages: int = 64,
        max_pages: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if page_size <= 0 or initial_pages <= 0:
            raise ValueError("page_size and initial_pages must be positive")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.max_pages = max_pages
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_pages = 0
        self.generation = 0  # bumped whenever the pools are re-allocated (captured CUDA graphs hold their addresses)
        self.k_pools: list[torch.Tensor] = []
        self.v_pools: list[torch.Tensor] = []
        self._free_pages: list[int] = []
        self._tables: dict[int, list[int]] = {}
        self._slot_tensors: dict[int, torch.Tensor] = {}  # flat slots of every reserved position, per sequence
        self._lengths: dict[int, int] = {}
        self._next_seq_id = 0
        self._grow(min(initial_pages, max_pages) if max_pages else initial_pages)

    # -- sequences -------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._tables[seq_id] = []
        self._slot_tensors[seq_id] = torch.zeros(0, dtype=torch.long)
        self._lengths[seq_id] = 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self._free_pages.extend(reversed(self._tables.pop(seq_id)))
        del self._lengths[seq_id], self._slot_tensors[seq_id]

    def length(self, seq_id: int) -> int:
        return self._lengths[seq_id]

    def truncate(self, seq_id: int, new_length: int) -> None:
        """Roll a sequence back to its first `new_length` tokens (0 ≤ new_length ≤ current length)."""
        current = self._lengths[seq_id]
        if not 0 <= new_length <= current:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {current} to {new_length}")
        table = self._tables[seq_id]
        keep = -(-new_length // self.page_size)
        self._free_pages.extend(reversed(table[keep:]))
        del table[keep:]
        self._slot_tensors[seq_id] = self._slot_tensors[seq_id][: keep * self.page_size]
        self._lengths[seq_id] = new_length

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    @property
    def scratch_slot(self) -> int:
        """The first slot of the scratch page (past every sequence's pages; zeroed at allocation)."""
        return self.num_pages * self.page_size

    @property
    def bytes_per_token(self) -> int:
        """K + V bytes one token position takes over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def allocate(self, num_pages: int, page_size: int) -> None:
        """Replace the pools by exactly `num_pages` pages of `page_size` tokens, allocated now and never grown.
        Only while no sequence is live (ValueError otherwise)."""
        if self._tables:
            raise ValueError(f"cannot re-allocate a KV cache holding {len(self._tables)} sequences")
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.k_pools, self.v_pools, self._free_pages = [], [], []
        self.num_pages, self.page_size, self.max_pages = 0, page_size, num_pages
        self._grow(num_pages)

    # -- storage ---------------------------------------------------------------------------------
    def _grow(self, new_num_pages: int) -> None:
        slots = (new_num_pages + 1) * self.page_size  # + the scratch page
        shape = (slots, self.num_kv_heads, self.head_dim)
        old_slots = self.num_pages * self.page_size
        for pools in (self.k_pools, self.v_pools):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(pools):
                    fresh[:old_slots].copy_(pools[layer][:old_slots])
                    pools[layer] = fresh
                else:
                    pools.append(fresh)
        self._free_pages = list(range(new_num_pages - 1, self.num_pages - 1, -1)) + self._free_pages
        self.num_pages = new_num_pages
        self.generation += 1

    def _reserve(self, seq_id: int, new_length: int) -> None:
        table = self._tables[seq_id]
        needed = -(-new_length // self.page_size) - len(table)
        if needed <= 0:
            return
        if needed > len(self._free_pages):
            target = max(self.num_pages * 2, self.num_pages + needed - len(self._free_pages))
            if self.max_pages is not None:
                target = min(target, self.max_pages)
            if target - self.num_pages + len(self._free_pages) < needed:
                raise CacheCapacityError(
                    f"KV cache full: sequence {seq_id} needs {needed} more pages of {self.page_size} tokens, "
                    f"{len(self._free_pages)} free of {self.num_pages} (max_pages={self.max_pages})"
                )
            self._grow(target)
        fresh = [self._free_pages.pop() for _ in range(needed)]
        table.extend(fresh)
        size = self.page_size
        new_slots = torch.tensor([page * size + offset for page in fresh for offset in range(size)], dtype=torch.long)
        self._slot_tensors[seq_id] = torch.cat([self._slot_tensors[seq_id], new_slots])

    def _slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat slots of positions [start, end) of a sequence (already reserved)."""
        return self._slot_tensors[seq_id][start:end]

    # -- one forward -----------------------------------------------------------------------------
    def prepare(
        self,
        seq_ids: list[int],
        query_lens: list[int],
        *,
        kv_only_lens: list[int] | None = None,
        causal: bool = True,
    ) -> AttentionMetadata:
        """Reserve room for the new tokens of each sequence, advance their lengths, and build the metadata
        of the forward that will write them. On failure nothing is changed.

        Sequence b gets `kv_only_lens[b]` K/V-only rows (default 0; drafters' context features: written, no
        query) followed by `query_lens[b]` query rows. causal=True: query i sees keys up to its own position
        (decoding, verification); causal=False: every query sees every key of its sequence (a draft block
        attends bidirectionally within itself, docs/design.md §2.2).
        """
        kv_only = kv_only_lens or [0] * len(seq_ids)
        starts, query_starts, context_lens, all_slots = self._advance(seq_ids, query_lens, kv_only)
        positions = torch.tensor([p for s, q in zip(query_starts, query_lens) for p in range(s, s + q)], dtype=torch.long)
        kv_only_positions = torch.tensor([p for s, qs in zip(starts, query_starts) for p in range(s, qs)], dtype=torch.long)
        slot_mapping = [slots[qs:] for slots, qs in zip(all_slots, query_starts)]
        kv_only_slots = [slots[start:qs] for slots, start, qs in zip(all_slots, starts, query_starts)]
        token_offsets = [0]
        for q in query_lens:
            token_offsets.append(token_offsets[-1] + q)
        members = group_by_query_length(list(query_lens))
        groups = [self._group(rows, query_lens, query_starts, context_lens, all_slots, token_offsets, causal,
                              whole=len(members) == 1) for rows in members]
        # Built on the host, moved in one asynchronous copy per dtype (`to_device`).
        fields = [(g, name) for g in groups for name in ("token_rows", "gather_slots", "padded_index", "attn_mask")
                  if getattr(g, name) is not None and getattr(g, name).device.type == "cpu"]
        moved = to_device([positions, torch.cat(slot_mapping), kv_only_positions, torch.cat(kv_only_slots)]
                          + [getattr(g, name) for g, name in fields], self.device)
        for (group, name), tensor in zip(fields, moved[4:]):
            setattr(group, name, tensor)
        return AttentionMetadata(
            positions=moved[0],
            slot_mapping=moved[1],
            query_lens=list(query_lens),
            context_lens=context_lens,
            groups=groups,
            kv_only_positions=moved[2],
            kv_only_slot_mapping=moved[3],
        )

    def _advance(self, seq_ids: list[int], query_lens: list[int], kv_only: list[int]
                 ) -> tuple[list[int], list[int], list[int], list[torch.Tensor]]:
        """Reserve pages for each sequence's n_b K/V-only rows and q_b query rows and advance its length; on
        failure (CacheCapacityError, ValueError) nothing is changed. Returns, per sequence: its start length,
        the position of its first query row, its context length after the forward, and the flat slots of all
        its positions up to that length (host tensors)."""
        if len(seq_ids) != len(query_lens) or len(kv_only) != len(seq_ids) or not seq_ids:
            raise ValueError("need one query length per sequence and at least one sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence may appear only once per forward")
        if any(q <= 0 for q in query_lens) or any(n < 0 for n in kv_only):
            raise ValueError("every sequence in a forward needs at least one query token")
        starts = [self._lengths[s] for s in seq_ids]
        snapshot = {s: list(self._tables[s]) for s in seq_ids}
        try:
            for seq_id, start, n, q in zip(seq_ids, starts, kv_only, query_lens):
                self._reserve(seq_id, start + n + q)
        except CacheCapacityError:
            for seq_id, table in snapshot.items():
                extra = self._tables[seq_id][len(table):]
                self._free_pages.extend(reversed(extra))
                self._tables[seq_id] = table
                self._slot_tensors[seq_id] = self._slot_tensors[seq_id][: len(table) * self.page_size]
            raise
        query_starts = [start + n for start, n in zip(starts, kv_only)]
        context_lens = [qs + q for qs, q in zip(query_starts, query_lens)]
        for seq_id, c in zip(seq_ids, context_lens):
            self._lengths[seq_id] = c
        return starts, query_starts, context_lens, [self._slots(s, 0, c) for s, c in zip(seq_ids, context_lens)]

    def prepare_static(self, seq_ids: list[int], query_lens: list[int], batch: int, query_len: int,
                       context_pages: int, *, kv_only_lens: list[int] | None = None, kv_only_len: int = 0,
                       causal: bool = True) -> StaticLayout:
        """`prepare` in the fixed shapes of a capture bucket: `batch` ≥ B sequences, `query_len` ≥ max q_b query
        rows and `kv_only_len` ≥ max n_b K/V-only rows each, keys read from `context_pages` pages each (the
        scratch page past a sequence's own). Padding rows (past q_b or n_b, or whole padding sequences) write
        their K/V to the scratch slot and see only real keys (a padding sequence: the scratch slot), so they
        change no sequence and no row attends to nothing. On failure nothing is changed."""
        kv_only = kv_only_lens or [0] * len(seq_ids)
        width = context_pages * self.page_size
        if len(seq_ids) > batch or max(query_lens, default=0) > query_len or max(kv_only, default=0) > kv_only_len:
            raise ValueError(f"{len(seq_ids)} sequences of up to {max(kv_only, default=0)} + {max(query_lens, default=0)} "
                             f"rows exceed the bucket {batch} × ({kv_only_len} + {query_len})")
        starts, query_starts, context_lens, all_slots = self._advance(seq_ids, query_lens, kv_only)
        if max(context_lens) > width:
            for seq_id, start in zip(seq_ids, starts):
                self.truncate(seq_id, start)
            raise ValueError(f"a context of {max(context_lens)} tokens exceeds the bucket's {width} keys")
        scratch = self.scratch_slot
        layout = StaticLayout.idle(batch, query_len, context_pages, scratch, self.page_size, kv_only_len)
        count = len(seq_ids)
        start, first_query, context = (torch.tensor(v, dtype=torch.long) for v in (starts, query_starts, context_lens))
        slots = torch.cat(all_slots + [torch.tensor([scratch])])  # the last one: scratch
        offsets = torch.cumsum(context, 0) - context  # where each sequence's slots start in `slots`

        def positions_and_slots(first: torch.Tensor, lengths: torch.Tensor, columns: int):
            """[count, columns]: positions first_b + j, and their slots for j < lengths_b (scratch past them)."""
            j = torch.arange(columns)
            positions = first.unsqueeze(1) + j
            index = torch.where(j < lengths.unsqueeze(1), offsets.unsqueeze(1) + positions, slots.numel() - 1)
            return positions, slots[index]

        page_starts = torch.arange(context_pages) * self.page_size  # the first position of each page
        first_slots = torch.where(page_starts < context.unsqueeze(1), offsets.unsqueeze(1) + page_starts, slots.numel() - 1)
        layout.page_table[:count] = torch.div(slots[first_slots], self.page_size, rounding_mode="floor")
        positions, query_slots = positions_and_slots(first_query, torch.tensor(query_lens), query_len)
        layout.positions[: count * query_len] = positions.reshape(-1)
        layout.slot_mapping[: count * query_len] = query_slots.reshape(-1)
        kv_counts = first_query - start
        positions, kv_slots = positions_and_slots(start, kv_counts, kv_only_len)
        layout.kv_only_positions[: count * kv_only_len] = positions.masked_fill(positions >= first_query.unsqueeze(1), 0).reshape(-1)
        layout.kv_only_slot_mapping[: count * kv_only_len] = kv_slots.reshape(-1)
        layout.query_starts[:count] = first_query if causal else context
        layout.context_lens[:count] = context
        layout.real_rows = torch.tensor([b * query_len + r for b, q in enumerate(query_lens) for r in range(q)],
                                        dtype=torch.long)
        layout.real_kv_only_rows = torch.tensor(
            [b * kv_only_len + r for b, (s0, qs) in enumerate(zip(starts, query_starts)) for r in range(qs - s0)],
            dtype=torch.long)
        return layout

    def _group(self, rows: list[int], query_lens: list[int], query_starts: list[int], context_lens: list[int],
               all_slots: list[torch.Tensor], token_offsets: list[int], causal: bool, whole: bool) -> AttentionGroup:
        """The padded attention layout of the sequences `rows` (indices into the forward's batch), in host
        tensors (`prepare` moves them; a lone sequence's causal band is built on the device directly)."""
        q_lens = [query_lens[b] for b in rows]
        c_lens = [context_lens[b] for b in rows]
        batch, max_q, max_c = len(rows), max(q_lens), max(c_lens)
        gather = torch.zeros(batch, max_c, dtype=torch.long)
        for i, b in enumerate(rows):
            gather[i, : c_lens[i]] = all_slots[b]
        padded_index = torch.tensor([i * max_q + k for i, q in enumerate(q_lens) for k in range(q)], dtype=torch.long)
        uniform = all(q == 1 for q in q_lens) or not causal
        uniform = uniform and all(c == max_c for c in c_lens) and all(q == max_q for q in q_lens)
        mask = None
        lower_right = not uniform and batch == 1 and causal
        if lower_right and max_q < max_c:
            mask = torch.ones(max_q, max_c, dtype=torch.bool, device=self.device).tril(max_c - max_q)
        if not uniform and not lower_right:
            q_idx = torch.arange(max_q).view(1, max_q, 1)
            k_idx = torch.arange(max_c).view(1, 1, max_c)
            ctx_t = torch.tensor(c_lens).view(batch, 1, 1)
            q_real = q_idx < torch.tensor(q_lens).view(batch, 1, 1)
            mask = (k_idx < ctx_t) & q_real
            if causal:
                mask &= k_idx <= torch.tensor([query_starts[b] for b in rows]).view(batch, 1, 1) + q_idx
            mask[..., 0] |= ~q_real[..., 0]  # padded query rows attend to one key: no NaN rows
            mask = mask.unsqueeze(1)
        token_rows = None
        if not whole:
            token_rows = torch.cat([torch.arange(token_offsets[b], token_offsets[b + 1]) for b in rows])
        return AttentionGroup(token_rows=token_rows, gather_slots=gather, padded_index=padded_index, attn_mask=mask,
                              max_query_len=max_q, num_tokens=sum(q_lens), causal_lower_right=lower_right)
