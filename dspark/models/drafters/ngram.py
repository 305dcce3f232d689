"""Model-free n-gram drafter ("prompt lookup decoding"): if the last n tokens occurred earlier in the
sequence, propose the tokens that followed their most recent earlier occurrence. Longest n first
(`max_ngram` down to `min_ngram`), as vLLM's `ngram` method does. Deterministic: q is one-hot.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from dspark.errors import RequestError
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter


def lookup_continuation(tokens: np.ndarray, max_ngram: int, min_ngram: int, max_tokens: int) -> np.ndarray:
    """Tokens following the latest earlier match of the longest matching suffix n-gram (or empty)."""
    length = tokens.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = tokens[length - n:]
        windows = sliding_window_view(tokens[: length - 1], n)  # windows starting before the suffix
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + max_tokens]
    return tokens[:0]


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, num_draft_tokens: int = 7, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise RequestError(f"n-gram drafter needs 1 ≤ min_ngram ≤ max_ngram, got {min_ngram}, {max_ngram}")
        if num_draft_tokens < 1:
            raise RequestError(f"n-gram drafter needs num_draft_tokens ≥ 1, got {num_draft_tokens}")
        self.block_size = num_draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        drafts = []
        for item in batch:
            limit = min(item.max_tokens, self.block_size)
            tokens = np.asarray(item.token_ids, dtype=np.int64)
            drafts.append(lookup_continuation(tokens, self.max_ngram, self.min_ngram, limit) if limit > 0 else tokens[:0])
        width = max((d.shape[0] for d in drafts), default=0)
        out = torch.zeros(len(batch), width, dtype=torch.long)
        for row, d in enumerate(drafts):
            out[row, : d.shape[0]] = torch.from_numpy(d)
        return DraftProposal(tokens=out, lengths=torch.tensor([d.shape[0] for d in drafts], dtype=torch.long))
