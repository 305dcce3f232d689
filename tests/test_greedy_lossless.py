"""Greedy speculative decoding is lossless: token for token the same output as greedy plain decoding, for
any drafter (docs/design.md §1), in ragged batches where sequences finish at different rounds (different budgets,
stop tokens), for several draft lengths — plus the stop-token and max_new_tokens contracts.

The target is a tiny random Qwen3 (V = 16) with weights large enough (init_std 0.3) that its greedy
continuations vary with the prompt; float64 weights make argmax ties between the plain (one token per
forward) and the speculative (several tokens per forward) paths practically impossible.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.engine.stats import SpecStats
from dspark.errors import RequestError
from dspark.models.drafters.ngram import NgramDrafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import AlwaysWrongDrafter, OracleDrafter, RandomDrafter

V = 16
NUM_PROMPTS = 208
BATCH = 16
DRAFT_LENGTHS = (1, 3, 7)  # cycled over the batches: every drafter sees every k on ~70 prompts
MODEL = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)
GREEDY = SamplingParams(temperature=0.0)



@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_random_model(
        tmp_path_factory.mktemp("greedy") / "tiny", "tiny-qwen3", seed=1, init_std=0.3, with_tokenizer=False, **MODEL
    )


@pytest.fixture(scope="module")
def runner(model_folder):
    return TargetRunner.from_pretrained(model_folder, dtype="float64")


@pytest.fixture(scope="module")
def workload():
    """Random prompts (lengths 1..20) and per-prompt budgets (1..24), fixed seed."""
    rng = random.Random(1234)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 20))] for _ in range(NUM_PROMPTS)]
    budgets = [rng.choice([1, 2, 3]) if i % 7 == 0 else rng.randint(4, 24) for i in range(NUM_PROMPTS)]
    return prompts, budgets


def _batches(n: int):
    for start in range(0, n, BATCH):
        yield start, slice(start, start + BATCH)


def _run(runner, prompts, budgets, stop, drafter=None, k_for_batch=lambda i: None):
    sequences, stats = [], []
    for i, (start, sl) in enumerate(_batches(len(prompts))):
        out = generate(
            runner, prompts[sl], sampling=GREEDY, max_new_tokens=budgets[sl], drafter=drafter,
            num_draft_tokens=k_for_batch(i), stop_token_ids=stop, seed=i,
        )
        sequences.extend(out.sequences)
        stats.append(out.stats)
    return sequences, stats


@pytest.fixture(scope="module")
def reference(runner, workload):
    """Plain greedy outputs, with a stop token chosen so that roughly half the sequences hit it."""
    prompts, budgets = workload
    free, _ = _run(runner, prompts, budgets, stop=())
    containing = Counter(t for s in free for t in set(s.token_ids))
    stop = min(range(V), key=lambda t: abs(containing[t] / len(free) - 0.4))
    plain, _ = _run(runner, prompts, budgets, stop=(stop,))
    return dict(stop=stop, free=free, plain=plain)


def _check_contracts(sequences, budgets, stop):
    reasons = Counter()
    for seq, budget in zip(sequences, budgets):
        reasons[seq.finish_reason] += 1
        assert 1 <= len(seq.token_ids) <= budget
        if seq.finish_reason == "length":
            assert len(seq.token_ids) == budget
            assert stop not in seq.token_ids
        else:
            assert seq.finish_reason == "stop"
            assert seq.token_ids[-1] == stop and stop not in seq.token_ids[:-1]
    return reasons


def test_plain_reference_respects_contracts(reference, workload):
    prompts, budgets = workload
    stop, free, plain = reference["stop"], reference["free"], reference["plain"]
    reasons = _check_contracts(plain, budgets, stop)
    assert reasons["stop"] >= 10 and reasons["length"] >= 10, reasons  # both ways of finishing occur
    # the model is not trivially constant: greedy continuations differ between prompts
    assert len({tuple(s.token_ids[:4]) for s in free}) > 20
    for f, p, budget in zip(free, plain, budgets):
        assert f.finish_reason == "length" and len(f.token_ids) == budget
        # with a stop token, greedy output is the stop-free output cut after the first stop token
        cut = f.token_ids[: f.token_ids.index(stop) + 1] if stop in f.token_ids else f.token_ids
        assert p.token_ids == cut


def _make_drafter(name: str):
    if name == "ngram":
        return NgramDrafter(num_draft_tokens=7)
    if name == "always_wrong":
        return AlwaysWrongDrafter(V, block_size=7)
    return RandomDrafter(V, block_size=7)


@pytest.mark.parametrize("drafter_name", ["ngram", "always_wrong", "random"])
def test_greedy_speculative_equals_plain(runner, workload, reference, drafter_name):
    prompts, budgets = workload
    stop, plain = reference["stop"], reference["plain"]
    drafter = _make_drafter(drafter_name)
    spec, stats = _run(runner, prompts, budgets, (stop,), drafter, k_for_batch=lambda i: DRAFT_LENGTHS[i % 3])
    for i, (s, p) in enumerate(zip(spec, plain)):
        assert s.token_ids == p.token_ids, f"prompt {i} {prompts[i]} k={DRAFT_LENGTHS[(i // BATCH) % 3]}"
        assert s.finish_reason == p.finish_reason
    reasons = _check_contracts(spec, budgets, stop)
    assert reasons["stop"] > 0 and reasons["length"] > 0
    verified = sum(st.verified_tokens for st in stats)
    accepted = sum(st.accepted_tokens for st in stats)
    assert verified > 500  # drafts were really verified
    if drafter_name in ("ngram", "random"):
        assert accepted > 0, "no draft was ever accepted: the test would be vacuous"
    if drafter_name == "ngram":
        pooled = SpecStats()
        for st in stats:
            pooled.merge(st)
        assert accepted > 100
        assert pooled.accepted_per_position[2] > 0  # rounds that accepted ≥ 3 drafts happened
    # every generated token except the prefill one is emitted by a round
    assert sum(st.emitted_tokens for st in stats) == sum(len(s.token_ids) - 1 for s in spec)


def test_greedy_float32_ngram(model_folder, workload):
    runner = TargetRunner.from_pretrained(model_folder, dtype="float32")
    prompts, budgets = workload[0][:64], workload[1][:64]
    plain, _ = _run(runner, prompts, budgets, stop=())
    spec, stats = _run(runner, prompts, budgets, (), NgramDrafter(num_draft_tokens=7), lambda i: (3, 7)[i % 2])
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(st.accepted_tokens for st in stats) > 0


def test_num_draft_tokens_zero_is_plain(runner, workload, reference):
    prompts, budgets = workload[0][:32], workload[1][:32]
    drafter = AlwaysWrongDrafter(V)
    spec, stats = _run(runner, prompts, budgets, (reference["stop"],), drafter, lambda i: 0)
    assert [s.token_ids for s in spec] == [p.token_ids for p in reference["plain"][:32]]
    assert drafter.calls == 0 and sum(st.verified_tokens for st in stats) == 0


@pytest.mark.parametrize("mode", ["past_stop", "until_stop"])
def test_stop_token_inside_accepted_drafts(runner, workload, reference, mode):
    """An oracle drafter proposes the exact greedy continuation, so whole drafts are accepted; when a stop
    token is among the accepted drafts the sequence ends right there, without the bonus token (and, in
    'past_stop' mode, without the accepted drafts after it)."""
    prompts, budgets = workload
    stop, plain = reference["stop"], reference["plain"]
    # prompts whose plain output stops at a position ≥ 2 (i.e. the stop token comes from a round, not prefill)
    chosen = [i for i, p in enumerate(plain) if p.finish_reason == "stop" and len(p.token_ids) >= 3][:32]
    assert len(chosen) >= 8
    sub_prompts = [prompts[i] for i in chosen]
    big_budgets = [40] * len(chosen)
    # reference continuations long enough to draft past the stop token
    long_free = [s.token_ids for s in generate(runner, sub_prompts, sampling=GREEDY, max_new_tokens=40).sequences]
    oracle = OracleDrafter(
        {tuple(p): cont for p, cont in zip(sub_prompts, long_free)}, block_size=7,
        cut_after=stop if mode == "until_stop" else None,
    )
    out = generate(runner, sub_prompts, sampling=GREEDY, max_new_tokens=big_budgets, drafter=oracle,
                   num_draft_tokens=7, stop_token_ids=(stop,), record_rounds=True)
    inside = past = 0
    for i, seq in zip(chosen, out.sequences):
        assert seq.token_ids == plain[i].token_ids and seq.finish_reason == "stop"
        last = seq.rounds[-1]
        if last.accepted > 0 and last.emitted <= last.accepted:  # the stop token was an accepted draft
            inside += 1
            past += last.emitted < last.accepted
        # the oracle is never wrong: every round accepts everything it verified
        assert all(r.accepted == r.verified for r in seq.rounds)
    assert inside >= len(chosen) // 2, "the stop token was rarely inside the accepted drafts"
    if mode == "past_stop":
        assert past > 0  # accepted drafts after the stop token were discarded
    else:
        assert past == 0


def test_max_new_tokens_one_and_exact_budgets(runner, workload):
    prompts = workload[0][:BATCH]
    budgets = [1, 2, 3, 4, 5, 6, 7, 8, 1, 9, 10, 11, 12, 2, 13, 14]
    plain = generate(runner, prompts, sampling=GREEDY, max_new_tokens=budgets).sequences
    spec = generate(runner, prompts, sampling=GREEDY, max_new_tokens=budgets, drafter=NgramDrafter(7),
                    record_rounds=True).sequences
    for s, p, b in zip(spec, plain, budgets):
        assert len(s.token_ids) == len(p.token_ids) == b and s.finish_reason == "length"
        assert s.token_ids == p.token_ids
        if b == 1:
            assert s.rounds == []  # the prefill token used the whole budget
        # never more drafts verified than the remaining budget allows
        produced = 1
        for r in s.rounds:
            assert r.verified <= b - produced - 1
            produced += r.emitted
        assert produced == b


@pytest.mark.parametrize("make", [
    lambda: NgramDrafter(num_draft_tokens=3), lambda: RandomDrafter(V, block_size=3),
    lambda: AlwaysWrongDrafter(V, block_size=3),
])
def test_drafter_refuses_more_than_block_size(runner, make):
    drafter = make()
    with pytest.raises(RequestError, match="at most 3"):
        generate(runner, [[1, 2, 3]], drafter=drafter, num_draft_tokens=4, max_new_tokens=4)
    with pytest.raises(RequestError):
        generate(runner, [[1, 2, 3]], drafter=drafter, num_draft_tokens=-1, max_new_tokens=4)
    out = generate(runner, [[1, 2, 3]], drafter=drafter, num_draft_tokens=3, max_new_tokens=4)  # at the limit: fine
    assert len(out.sequences[0].token_ids) <= 4


class _Overproposer(AlwaysWrongDrafter):
    """Ignores `max_tokens` and always proposes its full block (a drafter bug the loop must absorb)."""

    def propose(self, batch, generator=None):
        for item in batch:
            item.max_tokens = self.block_size
        return super().propose(batch, generator)


def test_loop_clamps_drafts_beyond_max_tokens(runner, workload, reference):
    prompts, budgets = workload[0][:48], workload[1][:48]
    spec = []
    for i, (start, sl) in enumerate(_batches(len(prompts))):
        out = generate(runner, prompts[sl], sampling=GREEDY, max_new_tokens=budgets[sl], drafter=_Overproposer(V, 7),
                       num_draft_tokens=7, stop_token_ids=(reference["stop"],), record_rounds=True)
        spec.extend(out.sequences)
    assert [s.token_ids for s in spec] == [p.token_ids for p in reference["plain"][:48]]
    clamped = 0
    for seq, budget in zip(spec, budgets):
        produced = 1
        for r in seq.rounds:
            assert r.verified <= min(7, budget - produced - 1)  # the extra drafts were never verified
            clamped += r.drafted > r.verified
            produced += r.emitted
    assert clamped > 0
