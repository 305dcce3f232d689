"""The loop's contract with feature-conditioned drafters: each round a drafter receives the target
features of exactly the positions verified since its previous call, in order, so that over a sequence's
life it has seen features for positions 0..len(history)-2 (everything before the anchor x0), and they
equal the features of one full forward over the final token history."""

from __future__ import annotations

import pytest
import torch

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

LAYERS = (-1, 1, 3)


class RecordingDrafter(Drafter):
    """Proposes random tokens and records every feature slice it is given, per sequence."""

    name = "recording"
    block_size = 4
    feature_layer_ids = LAYERS

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.histories: dict[int, list[int]] = {}
        self.released: list[int] = []

    def propose(self, batch: list[DraftInput], generator=None) -> DraftProposal:
        width = max(item.max_tokens for item in batch)
        tokens = torch.randint(0, self.vocab, (len(batch), width), generator=generator)
        for item in batch:
            assert item.new_features is not None
            self.seen.setdefault(item.seq_id, []).append(item.new_features.clone())
            received = sum(f.shape[0] for f in self.seen[item.seq_id])
            assert received == len(item.token_ids) - 1, "features must cover exactly the positions before x0"
            self.histories[item.seq_id] = list(item.token_ids)
        return DraftProposal(tokens=tokens, lengths=torch.tensor([i.max_tokens for i in batch]))

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = build_random_model(tmp_path_factory.mktemp("feat") / "m", "tiny-qwen3", seed=1, init_std=0.1, with_tokenizer=False)
    return TargetRunner.from_pretrained(folder)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafter_receives_exact_features_of_verified_positions(runner, temperature):
    vocab = runner.config.vocab_size
    drafter = RecordingDrafter(vocab)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 9, 1)]
    generate(runner, prompts, sampling=SamplingParams(temperature=temperature), max_new_tokens=[20, 7, 13],
             drafter=drafter, seed=5)
    assert sorted(drafter.released) == sorted(drafter.seen)
    assert len(drafter.seen) == 3
    for seq_id, slices in drafter.seen.items():
        history = drafter.histories[seq_id]
        got = torch.cat(slices)
        fresh = runner.new_sequence()
        try:
            ref = runner.forward([fresh], [history[:-1]], feature_layer_ids=LAYERS).features
        finally:
            runner.free_sequence(fresh)
        assert got.shape == ref.shape == (len(history) - 1, len(LAYERS) * runner.config.hidden_size)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_features_are_not_requested_without_a_feature_drafter(runner):
    seq = runner.new_sequence()
    try:
        out = runner.forward([seq], [[1, 2, 3]])
    finally:
        runner.free_sequence(seq)
    assert out.features is None

