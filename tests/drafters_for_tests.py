"""Drafters used only by the tests.

* `AlwaysWrongDrafter` — deterministic junk drafts (almost never what the target picks), q = None.
* `RandomDrafter` — a *correct* stochastic drafter: q is a fresh random distribution per slot, the drafts
  are sampled from q, and exactly that q is reported. Any output-distribution error with it is a bug in
  verification / the generation loop, never in the drafter.
* `BiasedQDrafter` — deliberately *incorrect* stochastic drafters (negative controls): the q they report
  is not the distribution their drafts were drawn from, so lossless verification is no longer lossless.
* `OracleDrafter` — proposes a known continuation (e.g. the plain greedy output), for stop-token tests.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch

from dspark.decoding.sampling import SamplingParams, logits_to_probs
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter


def _budget(batch: list[DraftInput], cap: int) -> tuple[list[int], int]:
    lengths = [max(0, min(item.max_tokens, cap)) for item in batch]
    return lengths, max(lengths, default=0)


class AlwaysWrongDrafter(Drafter):
    """Proposes d_1 = (x0 + offset) % V, d_{i+1} = (d_i + offset) % V — a fixed shift the target has no reason
    to follow. Deterministic (probs = None) and always proposes the full budget."""

    name = "always-wrong"

    def __init__(self, vocab_size: int, block_size: int = 7, offset: int = 1):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.offset = offset
        self.calls = 0

    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        self.calls += 1
        lengths, width = _budget(batch, self.block_size)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (item, n) in enumerate(zip(batch, lengths)):
            tok = int(item.token_ids[-1])
            for i in range(n):
                tok = (tok + self.offset) % self.vocab_size
                tokens[row, i] = tok
        return DraftProposal(tokens=tokens, lengths=torch.tensor(lengths, dtype=torch.long))


class RandomDrafter(Drafter):
    """Correct stochastic drafter. Per sequence and slot: logits z ~ N(0, scale²) from the shared generator,
    q = logits_to_probs(z, the sequence's SamplingParams) (so greedy requests get a one-hot q, top-k/top-p
    requests a truncated q), d ~ q by torch.multinomial, and q is returned as `probs` — exactly."""

    name = "random"

    def __init__(self, vocab_size: int, block_size: int = 7, scale: float = 1.5,
                 base_logits: Sequence[float] | None = None):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.scale = scale
        # Optional fixed preference added to the random logits (a drafter that "likes" some tokens).
        self.base_logits = None if base_logits is None else torch.tensor(base_logits, dtype=torch.float32)
        self.calls = 0

    # Overridden by the biased variants: (distribution sampled from, distribution reported).
    def _distributions(self, logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        q = logits_to_probs(logits, sampling)
        return q, q

    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        self.calls += 1
        lengths, width = _budget(batch, self.block_size)
        count, vocab = len(batch), self.vocab_size
        logits = torch.randn(count, width, vocab, generator=generator, dtype=torch.float32) * self.scale
        if self.base_logits is not None:
            logits = logits + self.base_logits
        sampled_from = torch.empty(count, width, vocab, dtype=torch.float32)
        reported = torch.empty(count, width, vocab, dtype=torch.float32)
        # Group rows by sampling setting (one logits_to_probs call per setting).
        groups: dict[SamplingParams, list[int]] = {}
        for row, item in enumerate(batch):
            groups.setdefault(item.sampling, []).append(row)
        for sampling, rows in groups.items():
            index = torch.tensor(rows)
            s, r = self._distributions(logits[index], sampling)
            sampled_from[index], reported[index] = s, r
        if width:
            tokens = torch.multinomial(sampled_from.reshape(-1, vocab), 1, generator=generator).reshape(count, width)
        else:
            tokens = torch.zeros(count, 0, dtype=torch.long)
        return DraftProposal(tokens=tokens, lengths=torch.tensor(lengths, dtype=torch.long), probs=reported)


class BiasedQDrafter(RandomDrafter):
    """Negative controls: drafts are sampled from one distribution, a different one is reported as q.

    mode="sharpened": samples from softmax(sharpen · z / T) but reports softmax(z / T) (e.g. a drafter
        that applies an extra temperature when sampling and forgets it in the returned q).
    mode="topk_unreported": samples from the top-k-truncated distribution (k = the request's top_k, or
        `top_k` if the request has none) but reports the un-truncated softmax — the classic bug of
        huggingface/transformers#47932.
    """

    name = "biased-q"

    def __init__(self, vocab_size: int, mode: str, block_size: int = 7, scale: float = 1.5,
                 base_logits: Sequence[float] | None = None, sharpen: float = 3.0, top_k: int = 2):
        super().__init__(vocab_size, block_size, scale, base_logits)
        if mode not in ("sharpened", "topk_unreported"):
            raise ValueError(mode)
        self.mode, self.sharpen, self.top_k = mode, sharpen, top_k

    def _distributions(self, logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "sharpened":
            return logits_to_probs(logits * self.sharpen, sampling), logits_to_probs(logits, sampling)
        k = sampling.top_k or self.top_k
        sampled = logits_to_probs(logits, replace(sampling, top_k=k))
        reported = logits_to_probs(logits, replace(sampling, top_k=0))
        return sampled, reported


class OracleDrafter(Drafter):
    """Proposes the continuation of a known token sequence: for a history h that is a prefix of one of
    `continuations` (keyed by prompt), proposes the next tokens of that sequence. `cut_after` (optional)
    ends every proposal right after the first occurrence of that token."""

    name = "oracle"

    def __init__(self, continuations: Mapping[tuple[int, ...], Sequence[int]], block_size: int = 7,
                 cut_after: int | None = None):
        self.full = {prompt: list(prompt) + list(cont) for prompt, cont in continuations.items()}
        self.block_size = block_size
        self.cut_after = cut_after

    def _reference(self, history: list[int]) -> list[int]:
        # Greedy continuations are a function of the history, so any matching reference will do; take the
        # longest (prompts may be prefixes of one another).
        matches = [seq for seq in self.full.values() if seq[: len(history)] == history]
        if not matches:
            raise AssertionError(f"history {history} is not a prefix of any reference sequence")
        return max(matches, key=len)

    def propose(self, batch: list[DraftInput], generator: torch.Generator | None = None) -> DraftProposal:
        drafts = []
        for item in batch:
            history = [int(t) for t in item.token_ids]
            n = max(0, min(item.max_tokens, self.block_size))
            ref = self._reference(history)
            d = ref[len(history): len(history) + n]
            if self.cut_after is not None and self.cut_after in d:
                d = d[: d.index(self.cut_after) + 1]
            drafts.append(d)
        width = max((len(d) for d in drafts), default=0)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, d in enumerate(drafts):
            tokens[row, : len(d)] = torch.tensor(d, dtype=torch.long)
        return DraftProposal(tokens=tokens, lengths=torch.tensor([len(d) for d in drafts], dtype=torch.long))


def save_dspark_folder(target_dir, out, *, seed: int = 1, block_size: int = 3, target_layer_ids=(0, 1),
                       markov_rank: int = 8, std: float = 0.3):
    """A random DSpark drafter folder (one draft layer, Markov and confidence heads) for the target at
    `target_dir`, saved to `out`; returns the folder."""
    from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
    from dspark.models.target_runner import TargetRunner

    runner = TargetRunner.from_pretrained(target_dir, dtype="float32")
    config = dspark_config_for_target(
        runner.hf_config, target_layer_ids=tuple(target_layer_ids), mask_token_id=runner.config.vocab_size - 1,
        num_draft_layers=1, block_size=block_size, markov_rank=markov_rank, enable_confidence_head=True,
    )
    return init_from_target(config, runner.model, seed=seed, std=std).save_pretrained(out)


STATIC_PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 11, 2, 6, 6, 1, 9], [40, 2], [7] * 19]


def static_path_folders(root) -> tuple:
    """(target, DSpark drafter) folders under `root` for the static-path tests: a tiny Qwen3 (V = 48, three
    layers, GQA 4:2, no tokenizer) and a random DSpark drafter for it (γ = 4, features of layers 0 and 2)."""
    from dspark.models.random_init import build_random_model

    target = build_random_model(root / "target", "tiny-qwen3", seed=4, init_std=0.3, with_tokenizer=False,
                                vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return target, save_dspark_folder(target, root / "dspark", block_size=4, target_layer_ids=(0, 2))


def with_static_rounds(drafter, graphs: bool, max_context_rows: int = 8):
    """`drafter`, set to run its rounds padded to capture buckets (dspark.models.static_step.StaticRound):
    replayed from `HostGraph`s when `graphs`, else padded but run eagerly; a round with more than
    `max_context_rows` new rows per sequence stays on the eager path."""
    assert drafter.static is None  # graphs are off by default on the CPU
    drafter.use_graphs(True)
    if not graphs:
        drafter.static.graphs = None
    drafter.static.max_context_rows = max_context_rows
    return drafter


def next_round_input(drafter, histories: dict, seq_id: int, rows: int, *, width: int, vocab: int, sampling,
                     max_tokens: int, uniforms: bool, generator: torch.Generator) -> DraftInput:
    """Sequence `seq_id`'s input to `drafter`'s next round: `rows` new context rows (random float64 features
    `width` wide, random tokens below `vocab`) after the rows the drafter holds; histories[seq_id] (its token
    history) is updated. uniforms: one per slot, or None."""
    seen = drafter.cache.length(drafter._handles[seq_id]) if seq_id in drafter._handles else 0
    histories[seq_id] = histories[seq_id][:seen] + torch.randint(0, vocab, (rows + 1,), generator=generator).tolist()
    return DraftInput(
        seq_id=seq_id, token_ids=list(histories[seq_id]),
        new_features=torch.randn(rows, width, generator=generator, dtype=torch.float64), max_tokens=max_tokens,
        sampling=sampling,
        uniforms=torch.rand(drafter.block_size, generator=generator, dtype=torch.float64) if uniforms else None)
