"""Scheduling keeps speculative decoding lossless (docs/design.md §5.3): the verification length may depend on the
confidences of the slots it admits, never on the tokens they were computed after.

1. The paper's Appendix A counterexample, draft → schedule → `verify` simulated many times: a
   retrospective scheduler (Algorithm 1 without the early stop; it exists only here) outputs A with
   probability 0.85 instead of the target's 0.7; CausalGreedy and AsyncTopK stay at 0.7.
   1b checks non-anticipation directly, by perturbing a request's later confidences.
2. generate() with every policy and a drafter whose confidence c_k depends on the previously drafted token:
   the joint of the first 3 sampled tokens matches the exact target distribution (chi-square, the
   procedure and power requirement of test_sampling_distribution.py), and whether round 1 verifies x_1 is
   independent of x_1; (2a) on one server of 4000 requests, (2b) on ~2250 small servers of 1–8 requests
   each, where a retrospective search's per-request bias does not average out (negative controls: a policy
   that peeks at c_2, the retrospective search). (2c) Greedy output equals plain greedy output token for
   token.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.decoding.sampling import SamplingParams
from dspark.decoding.verification import verify
from dspark.engine.generation import generate
from dspark.errors import RequestError
from dspark.models.drafters.base import DraftProposal
from dspark.scheduling import (
    AsyncTopK,
    CausalGreedy,
    ConfidenceThreshold,
    FixedLength,
    SPSProfile,
    SurvivalThreshold,
    VerifyAll,
    sorted_candidates,
    throughput_path,
)
from dspark.scheduling.controller import SpeculationController
from dspark.scheduling.policies import VerificationPolicy

from drafters_for_tests import OracleDrafter, RandomDrafter
from test_sampling_distribution import ALPHA, DELTA, chi_square, choose_n_samples, exact_joint, _power

V = 8  # the dist_runner fixture's vocabulary


# -------------------------------------------------------------------------------------------------
# Test-only policy: Algorithm 1 WITHOUT the early stop (the retrospective search of Appendix A)
# -------------------------------------------------------------------------------------------------

class RetrospectiveGreedy(CausalGreedy):
    """WRONG on purpose: admits the prefix that maximises Θ over the whole admission path. Whether slot k
    is verified then depends on c_{k+1}, i.e. on the token x_k itself."""

    name = "retrospective (test only)"

    def _lengths(self, c, full, bad, ids, width):
        count = full.size
        values, order = sorted_candidates(np.cumprod(c, axis=1))
        values = values[values > 0]  # Algorithm 1 line 4: candidates with a > 0
        theta = throughput_path(values, self.sps_table(count, width), self._base(full, bad), float(count))
        return np.bincount(order[: int(theta.argmax())] // width, minlength=count)


# -------------------------------------------------------------------------------------------------
# 1. Appendix A
# -------------------------------------------------------------------------------------------------

APPENDIX_SPS = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 1000.0, "2": 2000.0, "3": 1000.0 / 0.45}})
P_TARGET, Q_DRAFT = (0.7, 0.3), (0.5, 0.5)  # over {A, B} = {0, 1}
N_APPENDIX = 1_000


def simulate_appendix_a(scheduler: VerificationPolicy, n: int, seed: int) -> tuple[int, Counter]:
    """n rounds of one request (id 0, so AsyncTopK sees its own history): x_1 ~ q; c_1 = 0.8, c_2 = 0.9 if
    x_1 = A else 0; ℓ = scheduler(c); verify with p_1 = (0.7, 0.3). Returns (#first output tokens = A,
    Counter of ℓ)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.tensor(Q_DRAFT, dtype=torch.float32)
    drafts = torch.multinomial(q.expand(n, 2), 2, replacement=True, generator=g)  # x_1, x_2 ~ q
    c = torch.stack([torch.full((n,), 0.8), torch.where(drafts[:, 0] == 0, 0.9, 0.0)], 1)
    lens = torch.tensor([int(scheduler(c[i: i + 1], [2], [2], [0])[0]) for i in range(n)])
    p = torch.tensor([P_TARGET, (0.5, 0.5), (0.5, 0.5)], dtype=torch.float32)  # p_2, p_3 do not matter
    result = verify(p.expand(n, 3, 2), drafts, lens, q.expand(n, 2, 2), g)
    first = torch.where(result.num_accepted > 0, drafts[:, 0], result.next_tokens)
    return int((first == 0).sum()), Counter(lens.tolist())


def binom_power(n: int, p0: float, p1: float, alpha: float = ALPHA) -> float:
    """P(the exact two-sided binomial test of p0 rejects at level alpha | k ~ Bin(n, p1))."""
    k = np.arange(n + 1)
    pmf0 = stats.binom.pmf(k, n, p0)
    order = np.sort(pmf0)
    cum = np.cumsum(order)
    pvalues = cum[np.searchsorted(order, pmf0 * (1 + 1e-7), side="right") - 1]
    return float(stats.binom.pmf(k[pvalues < alpha], n, p1).sum())


def test_appendix_a_design_has_power():
    """N = 1000 rounds: the exact binomial test at α = 0.001 tells 0.7 from 0.85 with power ≈ 1 both ways
    (N ≈ 150 would already give 0.8)."""
    assert binom_power(N_APPENDIX, 0.7, 0.85) > 0.999
    assert binom_power(N_APPENDIX, 0.85, 0.7) > 0.999
    assert binom_power(150, 0.7, 0.85) > 0.8


def test_appendix_a_retrospective_scheduler_is_biased():
    """Negative control: without the early stop x_1 = A gets ℓ = 2 (Θ_2 = 1.134) and B gets ℓ = 0, so
    P(A) = 0.5 + 0.5 · 0.7 = 0.85. N = 1000, power ≈ 1 (test_appendix_a_design_has_power)."""
    count, lens = simulate_appendix_a(RetrospectiveGreedy(APPENDIX_SPS), N_APPENDIX, seed=1)
    assert set(lens) == {0, 2}
    assert stats.binomtest(count, N_APPENDIX, 0.7).pvalue < ALPHA, count
    assert stats.binomtest(count, N_APPENDIX, 0.85).pvalue > ALPHA, count


def test_appendix_a_causal_greedy_is_exact():
    """Algorithm 1 as published: the early stop ends at Θ_1 = 0.9 < Θ_0 = 1.0 before looking at c_2: ℓ = 0, P(A) = 0.7.
    N = 1000, power ≈ 1 against 0.85."""
    count, lens = simulate_appendix_a(CausalGreedy(APPENDIX_SPS, lookahead=False), N_APPENDIX, seed=2)
    assert lens == Counter({0: N_APPENDIX})
    assert stats.binomtest(count, N_APPENDIX, 0.7).pvalue > ALPHA, count
    assert stats.binomtest(count, N_APPENDIX, 0.85).pvalue < ALPHA, count


@pytest.mark.parametrize("lag", [1, 2])
def test_appendix_a_async_topk_is_exact(lag):
    """K comes from the request's round `lag` ago (K = 2 after an A, 0 after a B: the global search over
    those stale values has no early stop), the current x_1 only fills the slots: ℓ ∈ {0, 1, 2} all occur,
    yet P(A) = 0.7. N = 1000, power ≈ 1 against 0.85."""
    count, lens = simulate_appendix_a(AsyncTopK(APPENDIX_SPS, lag=lag), N_APPENDIX, seed=3 + lag)
    assert all(lens[v] > 100 for v in (0, 1, 2)), lens
    assert stats.binomtest(count, N_APPENDIX, 0.7).pvalue > ALPHA, count
    assert stats.binomtest(count, N_APPENDIX, 0.85).pvalue < ALPHA, count


def test_appendix_a_causal_greedy_lookahead_is_exact():
    """With the staircase lookahead the forecast is the previous round: after an A it promises Θ_2 = 1.134,
    so x_1 is admitted (ℓ = 2 if x_1 = A, 1 if B, since a_2 = 0 is never admitted); after a B it does not.
    Whether x_1 is verified never depends on x_1 itself: P(A) = 0.7. N = 1000, power ≈ 1 against 0.85."""
    count, lens = simulate_appendix_a(CausalGreedy(APPENDIX_SPS), N_APPENDIX, seed=9)
    assert all(lens[v] > 100 for v in (0, 1, 2)), lens
    assert stats.binomtest(count, N_APPENDIX, 0.7).pvalue > ALPHA, count
    assert stats.binomtest(count, N_APPENDIX, 0.85).pvalue < ALPHA, count


# -------------------------------------------------------------------------------------------------
# 1b. Non-anticipation, checked directly: whether slot j of request r is verified must not change when
# c_{r, j+1..} (which depend on x_{r, j}) change. A staircase profile makes the lookahead act.
# -------------------------------------------------------------------------------------------------

STAIRS = SPSProfile.from_dict({"verify_ms_by_tokens": {
    "1": 10.0, "8": 10.5, "9": 16.0, "24": 16.5, "25": 23.0, "48": 24.0, "49": 33.0, "400": 60.0}})
LINEAR_SPS = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 11.0, "1001": 1011.0}})  # 10 ms + 1 ms per token


def anticipation_found(make, cases: int, seed: int) -> int:
    """Count of random cases where perturbing a request's later confidences changes whether an earlier
    slot of that request is verified; every scheduler first sees one random call (its history)."""
    rng = np.random.default_rng(seed)
    found = 0
    for _ in range(cases):
        rows, width = int(rng.integers(1, 9)), int(rng.integers(2, 6))
        scheduler = make()
        full = torch.full((rows,), width)
        scheduler(torch.as_tensor(rng.uniform(0.3, 1.0, (rows, width))), full)
        c = rng.uniform(0.2, 1.0, (rows, width))
        c[rng.random((rows, width)) < 0.05] = 1.0
        r, j = int(rng.integers(rows)), int(rng.integers(width - 1))  # slot j + 1 (1-based) of request r
        decisions = set()
        for later in (0.0, 1.0, rng.uniform(0.0, 1.0, width - j - 1)):  # the extremes and a random draw
            changed = c.copy()
            changed[r, j + 1:] = later
            decisions.add(int(copy.deepcopy(scheduler)(torch.as_tensor(changed), full)[r]) >= j + 1)
        found += len(decisions) > 1
    return found


@pytest.mark.parametrize("make", [
    lambda: CausalGreedy(STAIRS, lookahead=False), lambda: CausalGreedy(STAIRS),
    lambda: AsyncTopK(STAIRS, lag=1), lambda: CausalGreedy(LINEAR_SPS),
    lambda: ConfidenceThreshold(0.6), lambda: SurvivalThreshold(0.45), lambda: FixedLength(2), lambda: VerifyAll()],
    ids=["algorithm-1", "causal-greedy", "async-topk", "causal-greedy-linear", "confidence-threshold",
         "survival-threshold", "fixed-2", "verify-all"])
def test_schedulers_never_anticipate(make):
    assert anticipation_found(make, cases=400, seed=4) == 0


def test_anticipation_check_catches_the_retrospective_scheduler():
    """Negative control for the check above: the search without early stop is caught."""
    assert anticipation_found(lambda: RetrospectiveGreedy(STAIRS), cases=400, seed=4) > 5


# -------------------------------------------------------------------------------------------------
# Drafters whose confidence depends on the previously drafted token
# -------------------------------------------------------------------------------------------------

CONF_LOGITS = [2.0, -1.0, 1.5, 0.5, -2.0, 1.0, 0.0, 2.5]  # per previous token (x_0 = the anchor)


def markov_confidence_logits(tokens: torch.Tensor, anchors: list[int], generator, noise: float = 1.0,
                             first=CONF_LOGITS, after=CONF_LOGITS) -> torch.Tensor:
    """Raw confidence logits (c_k = σ(logit)): first[x_0] + ε_1, then after[x_{k−1}] + ε_k for k ≥ 2 (x_0 = the
    anchor), ε ~ N(0, noise²) independent of the tokens; [B, K] like tokens."""
    prev = torch.cat([torch.tensor(anchors, dtype=torch.long).unsqueeze(1), tokens], 1)[:, : tokens.shape[1]]
    logits = torch.tensor(after, dtype=torch.float32)[prev]
    if prev.shape[1]:
        logits[:, 0] = torch.tensor(first, dtype=torch.float32)[prev[:, 0]]
    eps = torch.randn(prev.shape, generator=generator, dtype=torch.float32) * noise
    return logits + eps


class MarkovConfidenceDrafter(RandomDrafter):
    """RandomDrafter (drafts sampled from exactly the reported q) plus Markov confidences."""

    name = "random+markov-confidence"
    provides_confidence = True
    noise = 1.0
    first_logits = after_logits = CONF_LOGITS

    def propose(self, batch, generator=None):
        proposal = super().propose(batch, generator)
        anchors = [int(item.token_ids[-1]) for item in batch]
        proposal.confidence_logits = markov_confidence_logits(proposal.tokens, anchors, generator, self.noise,
                                                              self.first_logits, self.after_logits)
        return proposal


class NoisyOracleDrafter(OracleDrafter):
    """Greedy tests: the reference continuation with each draft replaced by a random token with
    probability 0.3 (deterministic q = None), plus Markov confidences."""

    name = "noisy-oracle"
    provides_confidence = True

    def propose(self, batch, generator=None):
        proposal = super().propose(batch, generator)
        tokens = proposal.tokens
        wrong = torch.rand(tokens.shape, generator=generator) < 0.3
        tokens = torch.where(wrong, torch.randint(0, V, tokens.shape, generator=generator), tokens)
        anchors = [int(item.token_ids[-1]) for item in batch]
        return DraftProposal(tokens=tokens, lengths=proposal.lengths,
                             confidence_logits=markov_confidence_logits(tokens, anchors, generator))


# The sampling tests' drafter (every policy and both controls, noise 1). The first token t_1 is sampled from
# the prefill; round 1 drafts x_1, x_2 after the anchor t_1 and decides t_2, t_3. After t_1 = 7 (p = 0.54) the
# target's t_2 is 1, 3 or 7 with p = (0.30, 0.24, 0.46). The drafter proposes x_1 = 7 43 % of the time (base
# logit +1 on 7 over N(0, 0.5²) logits, top-3 truncated: q_7 ≈ 0.43 ≈ p_7, so a verified 7 is nearly always
# accepted), and is confident in the next slot only after a 7: c_2 = σ(4 + ε) ≈ 0.98 after a 7,
# σ(−3 or −4 + ε) ≲ 0.1 after any other token; c_1 = σ(0.7 + ε) whatever the anchor. A policy that verifies
# x_1 with probability v_7 when x_1 = 7 and v_o otherwise emits t_2 = 7 after t_1 = 7 with probability
# ≈ p_7 + (v_7 − v_o) q_7 (1 − p_7): the mixture is the target's only if v_7 = v_o, and each unit of v_7 − v_o
# moves ≈ 0.23 of P(t_2 = 7 | t_1 = 7). (The drafter of test_draft_gate likes token 3 with q_3 ≈ 0.8 > p_3:
# the same dependence on x_1 = 3 moves P(t_2 = 3 | t_1 = 7) by at most p_3 (1 − q_3) ≈ 0.05, which is why the
# control of the previous design was caught at noise 1 only by a factor 7 below α.)
LIKES_7 = [0, 0, 0, 0, 0, 0, 0, 1.0]
FIRST_LOGITS = [0.7] * V  # c_1, by the anchor
AFTER_LOGITS = [-3.0, -4.0, -3.0, -4.0, -3.0, -4.0, -3.0, 4.0]  # c_k for k ≥ 2, by the previous draft x_{k−1}


class PipelineDrafter(MarkovConfidenceDrafter):
    """MarkovConfidenceDrafter with the tables above (the sampling tests' drafter)."""

    name = "random+confident-after-7"
    first_logits, after_logits = FIRST_LOGITS, AFTER_LOGITS


# Step time 10 ms + 4 ms per extra token each, for any number of requests (R = 1 .. 4096, L = 1 .. 3;
# beyond L = 3 linear): verifying costs enough that CausalGreedy cuts at a ≈ 0.3–0.6.
PIPELINE_SPS = SPSProfile.from_dict({"verify_ms": {
    f"{r}x{length}": 10.0 + 4.0 * (length - 1) for r in (1, 4096) for length in (1, 2, 3)}})

# One request's step: 10 ms for its token, 16 ms once it verifies 1–3 drafts (a stair): Algorithm 1 stops at
# the first draft when a_1 < 0.6, and the lookahead commits past it when the previous round's survivals pay.
STAIR_SPS = SPSProfile.from_dict({"verify_ms": {
    f"{r}x{length}": ms for r in (1, 4096) for length, ms in ((1, 10.0), (2, 16.0), (4, 16.0), (5, 22.0))}})

# The small servers' stair (section 2b): 10 ms for a request's token, 18 ms once it verifies 1–3 drafts. On a
# server of one request Θ_0 = 1/10, Θ_1 = (1 + a_1)/18, Θ_2 = (1 + a_1 + a_1 c_2)/18 per ms: Algorithm 1 verifies
# x_1 iff c_1 > 0.8 (P = 0.25 with c_1 = σ(0.7 + ε)), and x_2 then for free; a search without the early stop
# iff c_1 (1 + c_2) > 0.8: c_1 > 0.40 after x_1 = 7 (P = 0.86), c_1 ≳ 0.76 after any other x_1 (P ≈ 0.33). On
# R requests the grid is read at L = B / R: the first R admissions cost 8/R ms each and the next 2R nothing, so
# the global argmax is nearly all-or-nothing on the server's Σ a, where a request's own c_2 weighs ~1/R.
SERVER_STAIR_SPS = SPSProfile.from_dict({"verify_ms": {
    f"{r}x{length}": ms for r in (1, 4096) for length, ms in ((1, 10.0), (2, 18.0), (4, 18.0), (5, 24.0))}})

POLICIES = {
    "verify_all": lambda: VerifyAll(),
    "fixed_1": lambda: FixedLength(1),
    "confidence_threshold": lambda: ConfidenceThreshold(0.6),
    "survival_threshold": lambda: SurvivalThreshold(0.45),
    "causal_greedy": lambda: CausalGreedy(PIPELINE_SPS),
    "causal_greedy_stairs": lambda: CausalGreedy(STAIR_SPS),
    "async_topk": lambda: AsyncTopK(PIPELINE_SPS, prior=[0.6, 0.3, 0.15, 0.07]),
}


# -------------------------------------------------------------------------------------------------
# 2a. Sampling: exact joint of the first 3 tokens under every policy
# -------------------------------------------------------------------------------------------------

PROMPT = [7, 3, 7, 3, 7]
TOP_K3 = SamplingParams(temperature=1.0, top_k=3)
CHUNK = 4_000
K_DRAFT = 2  # round 1 verifies ℓ ∈ {0, 1, 2} drafts, which decide tokens 2 and 3


def run_pipeline_gof(runner, scheduler, seed, noise=1.0):
    """Exact joint vs N samples of generate(controller=SpeculationController(policy=...)) with PipelineDrafter, N from the power requirement
    (top-k 3 with this prompt: N = 12 000, df 25, power 0.92 against a 0.02 shift; see
    test_sampling_distribution). Also returns `independence`: the p-value of a chi-square test of
    independence (2 × 2) between "round 1 verified x_1" and "c_2 > 0.5" (i.e. x_1 = 7, up to the noise). A
    lossless policy decides slot 1 before x_1 exists, from c_1, other requests and past rounds, all
    independent of (x_1, ε_2), so this holds exactly; an anticipating one fails it directly."""
    exact = exact_joint(runner, PROMPT, TOP_K3)
    n_samples = choose_n_samples(exact)
    drafter = PipelineDrafter(V, block_size=K_DRAFT, scale=0.5, base_logits=LIKES_7)
    drafter.noise = noise
    counts = np.zeros(V**3, dtype=np.int64)
    round1 = Counter()
    table = np.zeros((2, 2), dtype=np.int64)  # [x_1 = 7 (c_2 > 0.5), x_1 verified]
    accepted = 0
    for chunk in range(n_samples // CHUNK):
        out = generate(runner, [PROMPT] * CHUNK, sampling=TOP_K3, max_new_tokens=3 + K_DRAFT - 1, drafter=drafter,
                       num_draft_tokens=K_DRAFT, seed=seed * 1000 + chunk, record_rounds=True, controller=SpeculationController(policy=scheduler))
        for seq in out.sequences:
            counts[np.ravel_multi_index(seq.token_ids[:3], (V,) * 3)] += 1
            first = seq.rounds[0]
            round1[first.verified] += 1
            assert first.drafted == K_DRAFT and len(first.confidences) == K_DRAFT
            table[int(first.confidences[1] > 0.5), int(first.verified > 0)] += 1
        accepted += out.stats.accepted_tokens
    pvalue, df = chi_square(counts, exact)
    independence = 1.0  # (a policy that always or never verifies x_1 is trivially independent)
    if table.sum(0).all() and table.sum(1).all():
        independence = float(stats.chi2_contingency(table, correction=False).pvalue)
    verify_rate = (table[:, 1] / table.sum(1)).round(3).tolist()
    info = dict(n=n_samples, df=df, power=_power(exact, n_samples), round1_verified=dict(round1),
                accepted=accepted, impossible=int(counts[exact == 0].sum()), independence=independence,
                x1_verified_after_other_and_7=verify_rate)
    return pvalue, info


def assert_exact(info, pvalue, policy, check_lengths=True):
    assert info["power"] >= 0.8, f"design too weak to detect a {DELTA} shift: {info}"
    assert info["accepted"] > 0 and info["impossible"] == 0, info
    if check_lengths:  # the policy really chose different lengths for different requests
        used = [v for v, n in info["round1_verified"].items() if n >= 0.05 * info["n"]]
        assert len(used) >= 2, info
    assert pvalue > ALPHA, f"output distribution differs from the target under {policy}: p={pvalue:.3g} {info}"
    assert info["independence"] > ALPHA, f"{policy} verifies x_1 depending on x_1: {info}"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["verify_all", "confidence_threshold", "survival_threshold", "causal_greedy", "causal_greedy_stairs",
                                    "async_topk"])
def test_sampling_distribution_is_exact_under_policy(dist_runner, policy):
    """One server of 4000 requests per round (see 2b for small servers)."""
    pvalue, info = run_pipeline_gof(dist_runner, POLICIES[policy](), seed=11)
    assert_exact(info, pvalue, policy, check_lengths=policy != "verify_all")


class PeekingThreshold(VerificationPolicy):
    """WRONG on purpose (test only): verifies both drafts iff c_2 ≥ 0.7, i.e. admits x_1 on the strength
    of a confidence computed from x_1."""

    name = "peeking (test only)"

    def _lengths(self, c, full, bad, ids, width):
        return np.where(c[:, 1] >= 0.7, full, 0) if width >= 2 else np.zeros_like(full)


@pytest.mark.slow
def test_control_anticipating_policy_is_rejected(dist_runner):
    """Negative control for the procedure above (same drafter, noise 1, same N and power): a policy whose
    admission of x_1 depends on x_1 (through c_2 ≥ 0.7: after a 7 with probability Φ(3.15) = 0.999, after
    another token Φ(−3.85) ≈ 10⁻⁴) moves P(t_2 = 7 | t_1 = 7) by ≈ 0.23 (PipelineDrafter), a noncentrality
    of about a thousand at N = 12 000: p must be far below α (< α / 1000 = 1e-6; measured p ≈ 1e-200)."""
    pvalue, info = run_pipeline_gof(dist_runner, PeekingThreshold(), seed=11)
    assert pvalue < ALPHA / 1000, f"an anticipating policy went undetected: p={pvalue:.3g} {info}"
    assert info["independence"] < ALPHA / 1000, info


# -------------------------------------------------------------------------------------------------
# 2b. Sampling on many small servers. One generate() call of 4000 requests is cut into ~2250 independent
# "servers" of 1–8 requests (SmallServers), each with its own scheduler instance, so one run emulates
# thousands of small-batch rounds at the cost of one. In a batch of thousands a retrospective search's choice
# is set by the population and its per-request bias averages out (RetrospectiveGreedy passes 2a); on a server
# of a few requests a request's own c_2 moves the global argmax, and the bias shows.
# -------------------------------------------------------------------------------------------------

class SmallServers(VerificationPolicy):
    """Test-only wrapper: the requests of each round are partitioned into independent servers of 1–8
    requests, each served by its own `make()` instance called on that server's rows only.

    A request gets a position, its arrival index in generate()'s order mod `positions`, and a fixed random
    map position → server decides its server. Servers of s requests hold a share ∝ 1/s of the positions
    (s = 1: 37 %, 2: 18 %, ..., 8: 4.6 %, at least 184 positions each): the smaller the server, the more a
    request's own confidences weigh in its scheduler's search. A server keeps its instance across generate()
    calls and serves the same positions in every chunk (its history, the lookahead's forecast or AsyncTopK's
    stale budget, carries over), and every instance first serves one warm-up round of random confidences (so
    even the first chunk's round 1 has a history). `release` goes to the request's server."""

    name = "small servers (test only)"

    def __init__(self, make, positions: int = CHUNK, largest: int = 8, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        weight = sum(1 / size for size in range(1, largest + 1))
        sizes = [size for size in range(1, largest + 1) for _ in range(int(positions / weight / size / size))]
        while positions > sum(sizes):  # the rounding remainder
            sizes.append(min(largest, positions - sum(sizes)))
        self.sizes = np.array(sizes)
        self.server_of = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # position → server
        self.servers = [make() for _ in sizes]
        self.needs_confidences = self.servers[0].needs_confidences
        for scheduler, size in zip(self.servers, sizes):
            warm_ids = -1 - np.arange(size)
            scheduler(torch.as_tensor(rng.uniform(0.2, 1.0, (size, K_DRAFT))), [K_DRAFT] * size, None, warm_ids)
            for request_id in warm_ids:
                scheduler.release(int(request_id))
        self._position: dict[int, int] = {}
        self._arrivals = 0

    def server(self, request_id: int) -> int:
        position = self._position.get(request_id)
        if position is None:
            position = self._position[request_id] = self._arrivals % self.server_of.size
            self._arrivals += 1
        return int(self.server_of[position])

    def __call__(self, confidences, lengths, limits=None, request_ids=None):
        ids = [int(i) for i in request_ids]
        servers = np.array([self.server(i) for i in ids])
        lengths, ids_t = torch.as_tensor(lengths), torch.tensor(ids)
        limits = lengths if limits is None else torch.as_tensor(limits)
        out = torch.zeros(len(ids), dtype=torch.long)
        order = np.argsort(servers, kind="stable")
        for rows in np.split(order, np.flatnonzero(np.diff(servers[order])) + 1):
            index = torch.from_numpy(rows)
            c = None if confidences is None else confidences[index]
            out[index] = self.servers[servers[rows[0]]](c, lengths[index], limits[index], ids_t[index])
        return out

    def _lengths(self, c, full, bad, ids, width):
        raise NotImplementedError  # __call__ dispatches to the servers

    def release(self, request_id: int) -> None:
        position = self._position.pop(int(request_id), None)
        if position is not None:
            self.servers[self.server_of[position]].release(int(request_id))


def test_small_servers_partition_the_batch():
    """Each server sees only its own requests (1–8 of them, the same ones every round), servers of s requests
    hold ≈ 4000 / (2.718 s) positions (1471 for s = 1 ... 200 for s = 8), and the lengths come back to the
    right rows."""

    class Recorder(VerifyAll):
        def __init__(self):
            super().__init__()
            self.calls = []

        def _lengths(self, c, full, bad, ids, width):
            self.calls.append(ids.tolist())
            return np.maximum(full - 1, 0)

    wrapper = SmallServers(Recorder, seed=3)
    assert sorted(set(wrapper.sizes.tolist())) == list(range(1, 9)) and wrapper.sizes.sum() == CHUNK
    weight = sum(1 / size for size in range(1, 9))
    for size in range(1, 9):
        assert abs(int(wrapper.sizes[wrapper.sizes == size].sum()) - CHUNK / weight / size) <= 3 * 8, size
    ids = np.arange(1000, 1000 + CHUNK)
    lengths = torch.as_tensor(np.arange(CHUNK) % 3)
    assert wrapper(None, lengths, torch.full((CHUNK,), 2), ids).tolist() == np.maximum(lengths.numpy() - 1, 0).tolist()
    keep = ids[np.random.default_rng(0).random(CHUNK) < 0.5]  # a later round: half the requests left
    for request_id in set(ids) - set(keep):
        wrapper.release(int(request_id))
    wrapper(None, torch.full((keep.size,), 2), None, keep)
    for scheduler, size in zip(wrapper.servers, wrapper.sizes):
        first, *later = scheduler.calls[1:]  # (calls[0] is the warm-up round)
        assert len(first) == size and all(set(call) <= set(first) for call in later)
    assert sum(len(s.calls[1]) for s in wrapper.servers) == CHUNK


SERVER_POLICIES = {
    "causal_greedy": lambda: CausalGreedy(SERVER_STAIR_SPS),
    "algorithm1": lambda: CausalGreedy(SERVER_STAIR_SPS, lookahead=False),
    "async_topk": lambda: AsyncTopK(SERVER_STAIR_SPS),
}


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(SERVER_POLICIES))
def test_sampling_distribution_is_exact_on_small_servers(dist_runner, policy):
    pvalue, info = run_pipeline_gof(dist_runner, SmallServers(SERVER_POLICIES[policy]), seed=12)
    assert_exact(info, pvalue, f"{policy} on small servers")


@pytest.mark.slow
def test_control_retrospective_search_on_small_servers_is_rejected(dist_runner):
    """Negative control for 2b: RetrospectiveGreedy (Algorithm 1 without the early stop) on the same servers.
    It verifies x_1 with probability 0.85 after x_1 = 7 and 0.51 otherwise (v_7 − v_o = 0.54 on one-request
    servers, falling to 0.09 on eight; SERVER_STAIR_SPS explains why), which moves P(t_2 = 7 | t_1 = 7) by
    ≈ 0.06. Power, from the noncentrality of the chi-square statistic estimated once from 120 000 samples of
    this scheduler (λ = 106 ± 7 at N = 12 000, df 25): P(p < α) ≈ 1 − 4·10⁻⁶, P(p < α/100) ≈ 0.9997. The
    independence test sees z ≈ 40. (On one server of 4000 requests, 2a, the same scheduler verifies every
    draft and is not caught.)"""
    pvalue, info = run_pipeline_gof(dist_runner, SmallServers(lambda: RetrospectiveGreedy(SERVER_STAIR_SPS)), seed=12)
    assert pvalue < ALPHA / 100, f"the retrospective search went undetected: p={pvalue:.3g} {info}"
    assert info["independence"] < ALPHA / 100, info


# -------------------------------------------------------------------------------------------------
# 2c. Greedy: token for token equal to plain greedy decoding under every policy
# -------------------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def greedy_workload(dist_runner):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, V, int(rng.integers(1, 9))).tolist() for _ in range(48)]
    budgets = [int(b) for b in rng.integers(2, 20, 48)]
    plain = generate(dist_runner, prompts, sampling=GREEDY, max_new_tokens=budgets).sequences
    longest = generate(dist_runner, prompts, sampling=GREEDY, max_new_tokens=20).sequences  # for the oracle
    return prompts, budgets, [s.token_ids for s in plain], {tuple(p): s.token_ids for p, s in zip(prompts, longest)}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_equals_plain_under_policy(dist_runner, greedy_workload, policy):
    prompts, budgets, plain, references = greedy_workload
    drafter = NoisyOracleDrafter(references, block_size=4)
    scheduler = POLICIES[policy]()
    rounds = []
    for start in range(0, len(prompts), 16):
        sl = slice(start, start + 16)
        out = generate(dist_runner, prompts[sl], sampling=GREEDY, max_new_tokens=budgets[sl], drafter=drafter,
                       num_draft_tokens=4, seed=start, record_rounds=True, controller=SpeculationController(policy=scheduler))
        for i, seq in enumerate(out.sequences):
            assert seq.token_ids == plain[start + i], f"prompt {start + i} under {policy}"
            rounds.extend(seq.rounds)
    assert sum(r.accepted for r in rounds) > 50  # long correct prefixes were verified and accepted
    assert all(len(r.confidences) == r.drafted for r in rounds if r.drafted)
    cut = sum(r.verified < r.drafted for r in rounds)
    if policy == "verify_all":
        assert cut == 0
    else:
        assert cut > 0 and sum(r.verified > 0 for r in rounds) > 0, policy


# -------------------------------------------------------------------------------------------------
# generate() contract
# -------------------------------------------------------------------------------------------------

def test_policy_needing_confidences_refuses_a_drafter_without_them(dist_runner):
    drafter = RandomDrafter(V, block_size=2)
    for scheduler in (CausalGreedy(PIPELINE_SPS), ConfidenceThreshold(0.5), AsyncTopK(PIPELINE_SPS)):
        with pytest.raises(RequestError, match="provides none"):
            generate(dist_runner, [[1, 2]], max_new_tokens=4, drafter=drafter, controller=SpeculationController(policy=scheduler))
    for scheduler in (VerifyAll(), FixedLength(1)):  # these need no confidences
        out = generate(dist_runner, [[1, 2]], max_new_tokens=4, drafter=drafter, controller=SpeculationController(policy=scheduler))
        assert len(out.sequences[0].token_ids) == 4


class _SilentDrafter(RandomDrafter):
    """Declares a confidence head but returns no confidences (a drafter bug the loop must survive)."""

    provides_confidence = True


def test_verify_all_and_missing_confidences_reproduce_the_unscheduled_run(dist_runner, caplog):
    """Same seed, same random stream: VerifyAll, and a confidence policy whose drafter sends no
    confidences (warning, verify-all fallback), give exactly the tokens and stats of scheduler=None."""
    kwargs = dict(sampling=SamplingParams(temperature=1.0), max_new_tokens=[6, 9, 3, 12], seed=4, record_rounds=True)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 7, 7]]
    base = generate(dist_runner, prompts, drafter=_SilentDrafter(V, 3), **kwargs)
    runs = [generate(dist_runner, prompts, drafter=_SilentDrafter(V, 3), controller=SpeculationController(policy=VerifyAll()), **kwargs),
            generate(dist_runner, prompts, drafter=_SilentDrafter(V, 3),
                     controller=SpeculationController(policy=CausalGreedy(PIPELINE_SPS)), **kwargs)]
    for out in runs:
        assert [s.token_ids for s in out.sequences] == [s.token_ids for s in base.sequences]
        assert out.stats.to_dict() == base.stats.to_dict()
    assert any("no confidences" in r.getMessage() for r in caplog.records)
    assert all(r.confidences is None for s in base.sequences for r in s.rounds)


def test_recorded_confidences_do_not_change_stats(dist_runner):
    kwargs = dict(sampling=SamplingParams(temperature=1.0), max_new_tokens=10, seed=7,
                  controller=SpeculationController(policy=CausalGreedy(PIPELINE_SPS)))
    prompts = [[1, 2, 3], [4, 5]]
    recorded = generate(dist_runner, prompts, drafter=MarkovConfidenceDrafter(V, 3), record_rounds=True, **kwargs)
    kwargs["controller"] = SpeculationController(policy=CausalGreedy(PIPELINE_SPS))
    plain = generate(dist_runner, prompts, drafter=MarkovConfidenceDrafter(V, 3), **kwargs)
    assert recorded.stats.to_dict() == plain.stats.to_dict()
    assert [s.token_ids for s in recorded.sequences] == [s.token_ids for s in plain.sequences]
    for seq in recorded.sequences:
        for r in seq.rounds:  # (a round in which the drafter was not called has none)
            assert r.drafted == 0 or (len(r.confidences) == r.drafted and all(0 < c < 1 for c in r.confidences))
        assert any(r.confidences for r in seq.rounds)
    assert all(s.rounds == [] for s in plain.sequences)
