"""Paged attention (dspark/models/layers.py, kv_cache.py) against attention written out per sequence.

A prompt (or prompt chunk after cached context) is one sequence whose queries are the last q of its c
positions: it runs through SDPA with GQA and, for a whole prompt, SDPA's own causal mask — no [q, c] mask
at all (issue 17: a 32k-token prompt used to build a 1 GB mask on the host); a chunk gets its causal band
built on the device; several sequences are padded together with a mask.
Both layouts must equal softmax(q·kᵀ·scale + causal mask)·v computed sequence by sequence.
"""

from __future__ import annotations

import pytest
import torch

from dspark.models.kv_cache import PagedKVCache
from dspark.models.layers import paged_attention

HEADS, KV_HEADS, DIM = 4, 2, 8


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, Hq, D] at positions start..start+n-1; keys/values [c, Hkv, D] positions 0..c-1."""
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1)  # [c, Hq, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) * DIM**-0.5
    allowed = torch.arange(keys.shape[0])[None, :] <= (start + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("cached, new_lens", [
    ([0], [37]),  # a whole prompt
    ([21], [13]),  # a chunk after cached context: bottom-right alignment
    ([5, 9, 30], [1, 4, 2]),  # decoding and verification rows padded together
    ([3, 40], [1, 25]),  # a decoding row beside a prompt chunk (two attention groups)
])
def test_paged_attention_equals_attention_per_sequence(cached, new_lens):
    gen = torch.Generator().manual_seed(sum(cached) + sum(new_lens))
    cache = PagedKVCache(1, KV_HEADS, DIM, page_size=4, dtype=torch.float64)
    seqs = [cache.new_sequence() for _ in cached]
    full_k, full_v = [], []
    for seq, n in zip(seqs, cached):
        k, v = torch.randn(n, KV_HEADS, DIM, generator=gen, dtype=torch.float64), torch.randn(n, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
        if n:
            meta = cache.prepare([seq], [n])
            cache.k_pools[0].index_copy_(0, meta.slot_mapping, k)
            cache.v_pools[0].index_copy_(0, meta.slot_mapping, v)
        full_k.append(k)
        full_v.append(v)
    meta = cache.prepare(seqs, new_lens)
    total = sum(new_lens)
    q = torch.randn(total, HEADS, DIM, generator=gen, dtype=torch.float64)
    k_new = torch.randn(total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
    v_new = torch.randn(total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
    cache.k_pools[0].index_copy_(0, meta.slot_mapping, k_new)
    cache.v_pools[0].index_copy_(0, meta.slot_mapping, v_new)
    out = paged_attention(q, cache.k_pools[0], cache.v_pools[0], meta, DIM**-0.5)
    start = 0
    for b, (n, m) in enumerate(zip(cached, new_lens)):
        keys = torch.cat([full_k[b], k_new[start: start + m]])
        values = torch.cat([full_v[b], v_new[start: start + m]])
        torch.testing.assert_close(out[start: start + m], reference(q[start: start + m], keys, values, n))
        start += m
    if len(cached) == 1 and new_lens[0] > 1:
        assert meta.groups[0].causal_lower_right and (meta.groups[0].attn_mask is None) == (cached[0] == 0)


def test_a_long_prompt_builds_no_mask():
    cache = PagedKVCache(1, KV_HEADS, DIM, page_size=16)
    seq = cache.new_sequence()
    meta = cache.prepare([seq], [32_768])
    (group,) = meta.groups
    assert group.attn_mask is None and group.causal_lower_right
    other = cache.new_sequence()
    mixed = cache.prepare([seq, other], [1, 3])  # two sequences padded together still need a mask
    assert mixed.groups[0].attn_mask is not None and not mixed.groups[0].causal_lower_right
