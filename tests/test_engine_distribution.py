"""The exact-distribution test (test_sampling_distribution.py's procedure) run through the serving engine
under continuous batching: copies of the test prompt arrive in waves among other requests (greedy, other
temperatures, top-k / top-p, without speculation, seeded), with Algorithm 1 choosing ℓ from the live
batch and a KV budget small enough to preempt. The joint of the first N_TOKENS tokens of the copies must
be the target's (chi-square, α = 0.001, power ≥ 0.8 against a 0.02 shift), and the same procedure must
reject a drafter that misreports its q (negative control).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig
from dspark.models.drafters import load_drafter
from dspark.scheduling.controller import SpeculationController
from dspark.scheduling.policies import CausalGreedy
from dspark.scheduling.sps import SPSProfile

from drafters_for_tests import BiasedQDrafter
from test_sampling_distribution import ALPHA, N_TOKENS, PROMPT, V, _assert_matches, _power, chi_square, choose_n_samples, exact_joint

WAVE = 500  # copies of the prompt arriving per step
DISTRACTORS = [SamplingParams(0.0), SamplingParams(0.7), SamplingParams(1.0, top_k=3), SamplingParams(1.0, top_p=0.8)]
COSTLY_TOKENS = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 12.0, "4000": 8010.0}})


def engine_joint(runner, drafter, controller, sampling: SamplingParams, n: int, seed: int):
    """Counts over V^N_TOKENS cells of the first tokens of n copies of PROMPT served by the engine amid other
    traffic, plus draft statistics of the copies and the engine's preemption count."""
    k = drafter.block_size
    # Pages of 2 tokens: a copy grows from 5 pages (prompt + a step) to 7, so the budget of 2,500 pages that
    # admitted ~500 of them must preempt some as they grow.
    config = EngineConfig(kv_cache_tokens=5000, page_size=2, max_num_seqs=1200, max_num_batched_tokens=6000, seed=seed)
    engine = Engine(runner, drafter, controller, config=config)
    rng = random.Random(seed)
    copies, counts, accepted, verified, added = {}, np.zeros(V ** N_TOKENS, dtype=np.int64), 0, 0, 0
    while added < n or engine.has_unfinished():
        for _ in range(min(WAVE, n - added)):
            # Every tenth copy is seeded: its stream is its own, the distribution the same.
            copies[added] = engine.add_request(added, PROMPT, sampling=sampling, max_new_tokens=N_TOKENS + k - 1,
                                               seed=added if added % 10 == 0 else None)
            added += 1
            if added % 10 == 0:
                engine.add_request(f"d{added}", [rng.randrange(V) for _ in range(rng.randint(1, 9))],
                                   sampling=rng.choice(DISTRACTORS), max_new_tokens=rng.randint(1, 12),
                                   speculate=rng.random() < 0.7)
        for out in engine.step():
            if out.finished and out.request_id in copies:
                request = copies.pop(out.request_id)
                assert request.finish_reason == "length"
                counts[int(np.ravel_multi_index(request.output_ids[:N_TOKENS], (V,) * N_TOKENS))] += 1
                accepted += request.stats.accepted_tokens
                verified += request.stats.verified_tokens
    assert engine.blocks.check_no_leak() == []
    engine.close()
    return counts, dict(accepted=accepted, verified=verified, preemptions=engine.scheduler.num_preemptions)


def gof(runner, drafter, controller, sampling, seed=0):
    exact = exact_joint(runner, PROMPT, sampling)
    n = choose_n_samples(exact)
    counts, info = engine_joint(runner, drafter, controller, sampling, n, seed)
    pvalue, df = chi_square(counts, exact)
    return pvalue, dict(info, n=n, df=df, power=_power(exact, int(counts.sum())), impossible=int(counts[exact == 0].sum()))


@pytest.mark.parametrize("sampling", [SamplingParams(1.0), SamplingParams(1.0, top_p=0.8)], ids=["T1", "T1-top_p0.8"])
def test_engine_output_has_the_target_distribution(dist_runner, distilled, sampling):
    drafter = load_drafter(str(distilled("dspark")), dtype="float64", device="cpu")
    controller = SpeculationController(policy=CausalGreedy(COSTLY_TOKENS))
    pvalue, info = gof(dist_runner, drafter, controller, sampling, seed=3)
    assert info["accepted"] >= 0.15 * info["verified"] > 0, info
    assert info["preemptions"] > 0, info  # requests were preempted and recomputed mid-generation
    _assert_matches(pvalue, info)


def test_control_engine_rejects_a_drafter_that_misreports_q(dist_runner):
    drafter = BiasedQDrafter(V, "sharpened", block_size=3, base_logits=[0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.5])
    pvalue, info = gof(dist_runner, drafter, SpeculationController(), SamplingParams(1.0), seed=4)
    assert pvalue < ALPHA, info
