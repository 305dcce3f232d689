"""SpecStats: τ (mean accepted length), acceptance rate, prefix survival vs conditional acceptance, merge —
checked against values computed by hand, and against what the generation loop records."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.models.drafters.ngram import NgramDrafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import RandomDrafter

# Hand-made rounds: RoundRecord(drafted, verified, accepted, emitted)
R1 = RoundRecord(3, 3, 3, 4)  # all 3 accepted + bonus
R2 = RoundRecord(3, 3, 1, 2)  # 1 accepted + correction
R3 = RoundRecord(3, 2, 0, 1)  # budget allowed only 2 to be verified; first rejected
R4 = RoundRecord(0, 0, 0, 1)  # nothing drafted: plain step
R5 = RoundRecord(3, 3, 2, 2)  # 2 accepted, the second is a stop token: no bonus
HAND = [R1, R2, R3, R4, R5]


def _stats(records):
    s = SpecStats()
    for r in records:
        s.add(r)
    return s


def test_hand_computed_totals_tau_and_acceptance():
    s = _stats(HAND)
    assert (s.rounds, s.drafted_tokens, s.verified_tokens, s.accepted_tokens, s.emitted_tokens) == (5, 12, 11, 6, 10)
    assert s.drafts == 4  # every round but the plain step R4 verified a draft
    assert s.mean_accepted_length == pytest.approx(10 / 5)  # τ = 2.0
    assert s.acceptance_rate == pytest.approx(6 / 11)  # per verified draft, bonus not counted


def test_hand_computed_per_position():
    s = _stats(HAND)
    # slot k verified in rounds with verified > k
    assert s.verified_per_position == [4, 4, 3]  # R1 R2 R3 R5 | R1 R2 R3 R5 | R1 R2 R5
    # slots 0..k all accepted (accepted > k)
    assert s.accepted_per_position == [3, 2, 1]  # R1 R2 R5 | R1 R5 | R1
    # slot k verified and slots < k accepted (accepted ≥ k)
    assert s.reached_per_position == [4, 3, 2]  # all four | R1 R2 R5 (not R3) | R1 R5
    assert s.prefix_survival == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert s.conditional_acceptance == pytest.approx([3 / 4, 2 / 3, 1 / 2])


def test_prefix_survival_is_product_of_conditionals_when_all_rounds_verify_k():
    s = _stats([R1, R2, R5, RoundRecord(3, 3, 0, 1)])
    assert s.conditional_acceptance == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert s.prefix_survival == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    for k in range(3):
        assert s.prefix_survival[k] == pytest.approx(math.prod(s.conditional_acceptance[: k + 1]))


def test_empty_and_plain_stats():
    empty = SpecStats()
    assert empty.mean_accepted_length is None and empty.acceptance_rate is None
    assert empty.prefix_survival == [] and empty.conditional_acceptance == []
    plain = _stats([R4, R4, R4])
    assert plain.mean_accepted_length == 1.0 and plain.acceptance_rate is None
    assert plain.verified_per_position == []
    d = _stats(HAND).to_dict()
    assert d["mean_accepted_length"] == 2.0 and d["reached_per_position"] == [4, 3, 2]
    assert d["conditional_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1 / 2])


@pytest.mark.parametrize("split", [([R1, R4], [R2, R3, R5]), ([R3], [R1, R2, R4, R5]), ([R4], HAND[:3] + [R5]), ([], HAND)])
def test_merge_equals_adding_all(split):
    whole = _stats(HAND).to_dict()
    a, b = split
    left, right = _stats(a), _stats(b)
    left.merge(right)
    assert left.to_dict() == whole
    left, right = _stats(a), _stats(b)  # the other way round (narrower into wider and vice versa)
    right.merge(left)
    assert right.to_dict() == whole


def test_merge_does_not_alias():
    a, b = SpecStats(), _stats([R1])
    a.merge(b)
    b.add(R1)
    assert a.to_dict() == _stats([R1]).to_dict()


records = st.integers(0, 6).flatmap(
    lambda drafted: st.integers(0, drafted).flatmap(
        lambda verified: st.integers(0, verified).flatmap(
            lambda accepted: st.integers(1, accepted + 1).map(
                lambda emitted: RoundRecord(drafted, verified, accepted, emitted)))))


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=12), st.lists(records, max_size=12))
def test_merge_property(first, second):
    merged = _stats(first)
    merged.merge(_stats(second))
    assert merged.to_dict() == _stats(first + second).to_dict()
    s = merged
    for k in range(len(s.verified_per_position)):
        assert s.accepted_per_position[k] <= s.reached_per_position[k] <= s.verified_per_position[k]
        assert s.conditional_acceptance[k] >= s.prefix_survival[k]
    if s.rounds:
        assert s.mean_accepted_length == pytest.approx(s.emitted_tokens / s.rounds)


# ------------------------------------------------------------------------------------------------
# What the generation loop records
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = build_random_model(
        tmp_path_factory.mktemp("stats") / "tiny", "tiny-qwen3", seed=1, init_std=0.3, with_tokenizer=False,
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    return TargetRunner.from_pretrained(folder, dtype="float64")


@pytest.mark.parametrize("drafter_factory,sampling_t", [(lambda: NgramDrafter(5), 0.0), (lambda: RandomDrafter(16, 4), 1.0)])
def test_generation_stats_are_consistent_with_rounds(runner, drafter_factory, sampling_t):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 16, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (12,), generator=g)]
    budgets = [int(b) for b in torch.randint(1, 20, (12,), generator=g)]
    drafter = drafter_factory()
    out = generate(runner, prompts, sampling=SamplingParams(sampling_t), max_new_tokens=budgets,
                   drafter=drafter, stop_token_ids=(5,), record_rounds=True, seed=3)
    pooled = SpecStats()
    for seq in out.sequences:
        assert seq.stats.to_dict() == _stats(seq.rounds).to_dict()
        assert len(seq.token_ids) == 1 + sum(r.emitted for r in seq.rounds)
        for r in seq.rounds:
            assert 0 <= r.accepted <= r.verified <= r.drafted
            assert 1 <= r.emitted <= r.accepted + 1
        pooled.merge(seq.stats)
    assert out.stats.to_dict() == pooled.to_dict()
    assert out.stats.verified_tokens > 0 and out.stats.accepted_tokens > 0
    assert 1.0 <= out.stats.mean_accepted_length <= 1 + drafter.block_size


def test_plain_generation_stats(runner):
    out = generate(runner, [[1, 2, 3], [4]], max_new_tokens=[5, 3], record_rounds=True)
    assert out.stats.rounds == 4 + 2 and out.stats.mean_accepted_length == 1.0
    assert out.stats.acceptance_rate is None and out.stats.verified_tokens == 0
