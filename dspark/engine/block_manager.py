"""The KV budget: a fixed number of pages shared by the target's and the drafter's caches.

Both caches are allocated once with the same `num_pages` pages of `page_size` tokens (`PagedKVCache.allocate`)
and never grow. A request holds pages in the budget for the positions it may occupy in either cache before
its next commit; every cache it touches then fits, because

* the target's cache of a request holds at most its committed tokens + 1 + ℓ (ℓ ≤ γ) during a step, and
* a drafter's cache holds at most the verified context (≤ committed tokens) + γ block or chain rows,

so holding ⌈(committed + 1 + γ) / page_size⌉ pages covers both (γ = 0 without a drafter). The manager counts
pages only; the caches keep their own page tables. A request that cannot hold what its next step needs is
preempted by the scheduler (`dspark.engine.scheduler`), never allowed to overflow a cache.

The size comes from a token count (`kv_cache_tokens`) or from a memory fraction (`kv_cache_memory_fraction`
of the device memory free after the weights are loaded: CUDA's `mem_get_info`; on a CPU, `MemAvailable` of
/proc/meminfo, at most `CPU_KV_CACHE_BYTES` as vLLM's CPU backend does), and never more than
`max_num_seqs` sequences of the model's whole context could use.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from dspark.errors import ConfigError
from dspark.models.kv_cache import PagedKVCache

CPU_KV_CACHE_BYTES = 4 << 30  # default cap of the KV budget on a CPU (vLLM's VLLM_CPU_KVCACHE_SPACE default)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-max(0, tokens) // page_size)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory now: CUDA's free bytes, or a CPU's MemAvailable (capped at CPU_KV_CACHE_BYTES)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024, CPU_KV_CACHE_BYTES)
    except OSError:
        pass
    return CPU_KV_CACHE_BYTES


def budget_pages(caches: Sequence[PagedKVCache], *, page_size: int, max_tokens_needed: int,
                 kv_cache_tokens: int | None = None, memory_fraction: float | None = None,
                 device: torch.device | None = None) -> int:
    """Pages of the shared budget: from `kv_cache_tokens`, else from `memory_fraction` of the free memory
    (bytes per page = page_size × the caches' bytes per token together), capped at the pages
    `max_tokens_needed` tokens could ever use. ConfigError when the result is not a single page."""
    if kv_cache_tokens is not None:
        if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < page_size:
            raise ConfigError(f"kv_cache_tokens must be an integer ≥ the page size {page_size}, got {kv_cache_tokens!r}")
        pages = kv_cache_tokens // page_size
    else:
        fraction = 0.9 if memory_fraction is None else memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"kv_cache_memory_fraction must lie in (0, 1], got {fraction!r}")
        per_page = page_size * sum(c.bytes_per_token for c in caches)
        memory = available_memory_bytes(device or caches[0].device)
        pages = int(memory * fraction) // per_page
        if pages < 1:
            raise ConfigError(f"kv_cache_memory_fraction={fraction}: {memory * fraction / 2**20:.1f} MiB hold no "
                              f"KV page of {per_page} bytes; free memory or give kv_cache_tokens")
    return max(1, min(pages, pages_for(max_tokens_needed, page_size)))


class BlockManager:
    """Fixed page budget of the target's and the drafter's caches (module docstring).

    caches: every cache a request's tokens land in (the target's first); num_pages, page_size: the budget;
    lookahead: positions a step may add past the committed tokens (1 + γ)."""

    def __init__(self, caches: Sequence[PagedKVCache], num_pages: int, page_size: int, lookahead: int):
        if num_pages < 1 or page_size < 1:
            raise ConfigError(f"the KV budget needs ≥ 1 page of ≥ 1 token, got {num_pages} pages of {page_size}")
        self.caches = list(caches)
        for cache in self.caches:
            cache.allocate(num_pages, page_size)
        self.num_pages = num_pages
        self.page_size = page_size
        self.lookahead = lookahead
        self._held: dict[Hashable, int] = {}
        self._total_held = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._total_held

    @property
    def used_pages(self) -> int:
        return self._total_held

    @property
    def usage(self) -> float:
        """Share of the budget held, in [0, 1]."""
        return self._total_held / self.num_pages

    def pages_needed(self, committed_tokens: int) -> int:
        """Pages a request with `committed_tokens` in the target's cache holds for its next step."""
        return pages_for(committed_tokens + self.lookahead, self.page_size)

    def fits_alone(self, max_committed_tokens: int) -> bool:
        """Whether a request that may reach `max_committed_tokens` fits the empty budget."""
        return self.pages_needed(max_committed_tokens) <= self.num_pages

    def held(self, key: Hashable) -> int:
        return self._held.get(key, 0)

    def try_hold(self, key: Hashable, committed_tokens: int) -> bool:
        """Grow `key`'s holding to what `committed_tokens` needs (never shrinks); False (nothing changed)
        when the free pages do not suffice."""
        need = self.pages_needed(committed_tokens) - self._held.get(key, 0)
        if need <= 0:
            return True
        if need > self.free_pages:
            return False
        self._held[key] = self._held.get(key, 0) + need
        self._total_held += need
        return True

    def release(self, key: Hashable) -> None:
        self._total_held -= self._held.pop(key, 0)

    def check_no_leak(self) -> list[str]:
        """Problems when nothing is held: pages held, pages not back on a cache's free list, live sequences."""
        problems = []
        if self._held:
            problems.append(f"{len(self._held)} requests still hold {self._total_held} pages")
        for index, cache in enumerate(self.caches):
            if cache.num_sequences:
                problems.append(f"cache {index} has {cache.num_sequences} live sequences")
            if cache.num_free_pages != cache.num_pages:
                problems.append(f"cache {index}: {cache.num_pages - cache.num_free_pages} pages not freed")
        return problems
