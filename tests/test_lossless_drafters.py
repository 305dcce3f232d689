"""Every drafter kind keeps speculative decoding lossless, tested with drafters that are actually accepted.

The drafters (DSpark vanilla / gated / RNN, DFlash, EAGLE-3, MTP-1) are distilled toward the V = 8 target of
the exact-distribution tests (tests/distilled.py), which brings their acceptance to 40–70 %: a random-weight
drafter is almost never accepted and would leave the accept path, multi-token acceptance and the drafter's
cache rollback untested. For each kind:

* greedy: speculative output equals plain greedy output token for token over ragged batches with stop
  tokens, with τ and acceptance floors asserted (so multi-token acceptance and rollback happen);
* sampled: the joint of the first 3 tokens matches the target's exactly (chi-square, α = 0.001, the
  procedure of test_sampling_distribution.py) at temperature 0.7, and at temperature 1 with top-k and with
  top-p, with an acceptance floor of 15 %;
* power: for each of those settings, the power of that very test against the known wrong rules — no
  residual correction, the target's p computed without top-k / top-p in verification, the drafter's q
  reported without top-k / top-p — computed exactly from the target's and the drafter's distributions
  (`rule_power`) and asserted ≥ 0.8, next to the generic 0.02-shift power;
* drafter only: over many samples, the drafted tokens follow the q the drafter reports, for every sampling
  setting (chi-square over the first two drafts), with negative controls that misreport q.

The reported q's exact values (float32 `logits_to_probs` of the drafter's own logits, so the right sampling
parameters and precision) are checked by the kinds' own files (test_dspark_drafter.py, test_eagle3_mtp.py).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from dspark.decoding.sampling import SamplingParams, logits_to_probs
from dspark.engine.generation import generate
from dspark.models.drafters import load_drafter
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.flex_paged import FlexPagedAttention
from dspark.models.static_step import StaticStep
from dspark.models.target_runner import TargetRunner

from distilled import KINDS
from test_sampling_distribution import (
    ALPHA,
    CHUNK,
    PROMPT,
    V,
    _assert_matches,
    _power,
    chi_square,
    choose_n_samples,
    exact_joint,
    first_draft_outcome,
    rule_power,
    run_gof,
    target_conditionals,
)

GOF_SETTINGS = {
    "T0.7": SamplingParams(temperature=0.7),
    "T1-top_k3": SamplingParams(temperature=1.0, top_k=3),
    "T1-top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
}
ACCEPTANCE_FLOOR = 0.15  # accepted / verified drafts in every exact-distribution test
RULE_POWER_FLOOR = 0.8


@pytest.fixture(scope="module")
def load(distilled):
    """load(kind) → a fresh float64 instance of the distilled drafter of that kind."""
    return lambda kind: load_drafter(str(distilled(kind)), dtype="float64", device="cpu")


# ------------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculative_equals_plain(dist_runner, load, kind):
    """48 random prompts (1–12 tokens), budgets 1–20, stop token 5, drafts per round cycled over the batches;
    equal to plain greedy decoding, with long accepted prefixes and rejected tails both frequent."""
    rng = random.Random(7)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 12))] for _ in range(48)]
    budgets = [rng.randint(1, 20) for _ in prompts]
    drafter = load(kind)
    per_round = [3, 2, 1] if drafter.block_size == 3 else [1, 1, 1]
    verified = accepted = rejected = partial = full = rounds = emitted = 0
    for start in range(0, len(prompts), 16):
        sl = slice(start, start + 16)
        plain = generate(dist_runner, prompts[sl], max_new_tokens=budgets[sl], stop_token_ids=(5,), seed=start)
        spec = generate(dist_runner, prompts[sl], max_new_tokens=budgets[sl], stop_token_ids=(5,), seed=start,
                        drafter=drafter, num_draft_tokens=per_round[start // 16], record_rounds=True)
        assert [s.token_ids for s in spec.sequences] == [s.token_ids for s in plain.sequences], (kind, start)
        verified += spec.stats.verified_tokens
        accepted += spec.stats.accepted_tokens
        for seq in spec.sequences:
            for r in seq.rounds:
                rounds += 1
                emitted += r.accepted + 1  # τ counts the correction / bonus token (stop cuts aside)
                rejected += r.accepted < r.verified
                partial += 0 < r.accepted < r.verified
                full += r.verified > 0 and r.accepted == r.verified
    assert accepted / verified >= 0.25 and emitted / rounds >= 1.4, (accepted, verified, emitted / rounds)
    assert rejected >= 20 and full >= 20, (rejected, full)  # rollbacks after a rejection, and whole blocks
    if drafter.block_size > 1:
        assert partial >= 10, partial  # accepted drafts followed by a rejected one in the same round
    assert drafter.cache.num_free_pages == drafter.cache.num_pages and not drafter._handles  # all released


# ------------------------------------------------------------------------------------------------
# Exact sampling distribution, and the power of that test against the known wrong rules
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("setting", list(GOF_SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_sampled_output_has_the_target_distribution(dist_runner, load, kind, setting):
    drafter = load(kind)
    k = drafter.block_size
    pvalue, info = run_gof(dist_runner, GOF_SETTINGS[setting], drafter=drafter, num_draft_tokens=k, seed=5)
    assert info["longest_round1"] == k, info  # round 1 verified the whole block
    assert info["accepted"] >= ACCEPTANCE_FLOOR * info["verified"], info
    _assert_matches(pvalue, info)


@pytest.mark.slow
@pytest.mark.parametrize("kind,attention", [("dspark", "sdpa"), ("eagle3", "sdpa"), ("dspark", "flex")])
def test_sampled_output_on_the_static_path_has_the_target_distribution(dist_target, distilled, kind, attention):
    """The same test with the target's steps and the drafter's rounds padded to capture buckets and replayed
    from their captured graphs (dspark.models.static_step; `HostGraph`s on the CPU): the per-row sampling of
    the captured rounds (`logits_to_probs_by_row`, the requests' uniforms) keeps the output exact — with the
    attention gathering the keys (SDPA, float64) or reading the pages in place (the compiled FlexAttention
    kernel, dspark.models.flex_paged; float32, the CPU kernel's widest type)."""
    dtype = "float32" if attention == "flex" else "float64"
    kernel = FlexPagedAttention() if attention == "flex" else None
    big = dict(graphs=True, max_batch=CHUNK, max_rows=16 * CHUNK, kernel=kernel)  # buckets for a batch's CHUNK sequences
    runner = TargetRunner.from_pretrained(dist_target, dtype=dtype)
    runner.static = StaticStep(runner.model, runner.cache, **big)
    drafter = load_drafter(str(distilled(kind)), dtype=dtype, device="cpu")
    drafter.use_graphs(True)
    drafter.static = type(drafter.static)(drafter, **big)
    pvalue, info = run_gof(runner, GOF_SETTINGS["T1-top_k3"], drafter=drafter, num_draft_tokens=drafter.block_size,
                           seed=5)
    assert runner.static.replays > 0 and drafter.static.replays > 0  # both static paths ran
    assert runner.static.kernel is kernel and drafter.static.kernel is kernel  # the kernel did not fall back
    assert info["accepted"] >= ACCEPTANCE_FLOOR * info["verified"], info
    _assert_matches(pvalue, info)


def drafter_first_q(runner, drafter, prompt: list[int], sampling: SamplingParams) -> np.ndarray:
    """[V, V]: row t is the q of the drafter's first draft after prompt + [t] (the anchor t), as `propose`
    reports it — the distribution round 1 of the exact-distribution test drafts from."""
    seq = runner.new_sequence()
    try:
        out = runner.forward([seq], [prompt], all_logits=False, feature_layer_ids=drafter.feature_layer_ids)
    finally:
        runner.free_sequence(seq)
    handles = range(10_000, 10_000 + V)
    batch = [DraftInput(h, prompt + [t], out.features, 1, sampling) for t, h in enumerate(handles)]
    proposal = drafter.propose(batch, torch.Generator().manual_seed(0))
    for h in handles:
        drafter.release(h)
    return proposal.probs[:, 0].double().numpy()


def wrong_rules(runner, drafter, sampling: SamplingParams) -> dict[str, tuple]:
    """name → (p used by verification [V, V], q sampled [V, V], q reported [V, V], residual?) per anchor."""
    _, p = target_conditionals(runner, PROMPT, sampling)
    q = drafter_first_q(runner, drafter, PROMPT, sampling)
    rules = {"correct": (p, q, q, True), "no residual correction": (p, q, q, False)}
    for field, off in (("top_k", 0), ("top_p", 1.0)):
        if getattr(sampling, field) != off:
            unfiltered = dataclasses.replace(sampling, **{field: off})
            rules[f"target p without {field}"] = (target_conditionals(runner, PROMPT, unfiltered)[1], q, q, True)
            rules[f"draft q reported without {field}"] = (p, q, drafter_first_q(runner, drafter, PROMPT, unfiltered), True)
    return rules


@pytest.mark.parametrize("setting", list(GOF_SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_the_distribution_test_has_power_against_known_wrong_rules(dist_runner, load, kind, setting):
    """For the N of test_sampled_output_has_the_target_distribution, the power against each wrong rule's
    exact output distribution of the first two tokens (a lower bound, `rule_power`) is ≥ 0.8; the correct
    rule's is α (a check of the computation)."""
    sampling = GOF_SETTINGS[setting]
    exact = exact_joint(dist_runner, PROMPT, sampling)
    n = choose_n_samples(exact)
    p1, _ = target_conditionals(dist_runner, PROMPT, sampling)
    powers = {}
    for name, (p_verify, q_sampled, q_reported, residual) in wrong_rules(dist_runner, load(kind), sampling).items():
        outcome = np.stack([first_draft_outcome(p_verify[t], q_sampled[t], q_reported[t], residual) for t in range(V)])
        powers[name] = rule_power(exact, (p1[:, None] * outcome).reshape(-1), n)
    assert powers.pop("correct") == pytest.approx(ALPHA, rel=0.05)
    expected = {"no residual correction"} | {f"{a} without {f}" for f in ("top_k", "top_p")
                                             if getattr(sampling, f) not in (0, 1.0)
                                             for a in ("target p", "draft q reported")}
    assert set(powers) == expected
    assert all(power >= RULE_POWER_FLOOR for power in powers.values()), powers
    assert _power(exact, n) >= RULE_POWER_FLOOR  # and the generic design: a 0.02 shift in one cell


@pytest.mark.slow
def test_control_dspark_q_reported_without_its_markov_bias_is_rejected(dist_runner, load):
    """Negative control with a real (distilled) drafter: report softmax(U_k) without the Markov bias the
    draft was sampled with — the exact-distribution test rejects it."""
    drafter = load("dspark")
    sample_block = drafter.sample_block

    def wrong_q(hidden, anchors, samplings, generator, uniforms=None):
        tokens, probs, conf = sample_block(hidden, anchors, samplings, generator, uniforms)
        return tokens, torch.softmax(drafter.model.lm_head(hidden).float(), -1), conf

    drafter.sample_block = wrong_q
    pvalue, info = run_gof(dist_runner, SamplingParams(temperature=1.0), drafter=drafter, num_draft_tokens=3, seed=5)
    assert pvalue < ALPHA, info


# ------------------------------------------------------------------------------------------------
# Drafter only: the drafts follow the q the drafter reports
# ------------------------------------------------------------------------------------------------

Q_SETTINGS = {
    "T0.7": SamplingParams(temperature=0.7),
    "top_k3": SamplingParams(temperature=1.0, top_k=3),
    "top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "T1.3-top_k4-top_p0.9": SamplingParams(temperature=1.3, top_k=4, top_p=0.9),
}
Q_SAMPLES = (8_000, 16_000, 24_000, 32_000)  # the first with power ≥ 0.85 against a 0.02 shift is used


def draft_many(runner, drafter, sampling: SamplingParams, count: int, seed: int = 0):
    """`count` proposals of two drafts (one for MTP) after PROMPT + [3], from identical inputs in one call:
    (tokens [count, w], reported q [count, w, V])."""
    width = min(2, drafter.block_size)
    seq = runner.new_sequence()
    try:
        out = runner.forward([seq], [PROMPT], all_logits=False, feature_layer_ids=drafter.feature_layer_ids)
    finally:
        runner.free_sequence(seq)
    batch = [DraftInput(h, PROMPT + [3], out.features, width, sampling) for h in range(count)]
    proposal = drafter.propose(batch, torch.Generator().manual_seed(seed))
    for h in range(count):
        drafter.release(h)
    return proposal.tokens[:, :width], proposal.probs[:, :width].double()


def reported_joint(tokens: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """The joint of the drafts implied by the reported q: q_1(d_1) · q_2(d_2 | d_1) over V^w cells (q_2 read
    from the rows that drafted d_1: all must report the same one). A first draft never sampled keeps its
    whole mass q_1(d_1) on one cell of its prefix."""
    q1 = q[0, 0]
    assert torch.allclose(q[:, 0], q1.expand_as(q[:, 0]), rtol=0, atol=1e-12)  # same inputs, same q_1
    if tokens.shape[1] == 1:
        return q1.numpy()
    joint = np.zeros((V, V))
    for d1 in range(V):
        rows = (tokens[:, 0] == d1).nonzero().flatten()
        if rows.numel() == 0:
            joint[d1, 0] = float(q1[d1])
            continue
        q2 = q[rows[0], 1]
        assert torch.allclose(q[rows, 1], q2.expand(rows.numel(), V), rtol=0, atol=1e-12)  # q_2 is a function of d_1
        joint[d1] = float(q1[d1]) * q2.numpy()
    return joint.reshape(-1)


def draft_counts(tokens: torch.Tensor) -> np.ndarray:
    flat = tokens[:, 0] * (V if tokens.shape[1] > 1 else 1) + (tokens[:, 1] if tokens.shape[1] > 1 else 0)
    return np.bincount(flat.numpy(), minlength=V ** tokens.shape[1])


def drafts_follow_reported_q(runner, drafter, sampling: SamplingParams, seed: int = 0) -> tuple[float, dict]:
    """(p-value of the drafts' joint against the reported q's, details). Every drafted token must have
    reported probability > 0 and every reported row must be a float32 distribution. The sample count is the
    first of Q_SAMPLES whose power against a 0.02 shift of one cell is ≥ 0.85 (judged on a first batch)."""
    tokens, q = draft_many(runner, drafter, sampling, Q_SAMPLES[0], seed)
    n = next((m for m in Q_SAMPLES if _power(reported_joint(tokens, q), m) >= 0.85), Q_SAMPLES[-1])
    if n > Q_SAMPLES[0]:
        more_tokens, more_q = draft_many(runner, drafter, sampling, n - Q_SAMPLES[0], seed + 1)
        tokens, q = torch.cat([tokens, more_tokens]), torch.cat([q, more_q])
    sums = q.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5) and bool((q >= 0).all())
    picked = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    impossible = int((picked <= 0).sum())
    expected = reported_joint(tokens, q)
    counts = draft_counts(tokens)
    pvalue, df = chi_square(counts, expected)
    return pvalue, dict(n=n, df=df, impossible=impossible, power=_power(expected, n))


@pytest.mark.parametrize("setting", list(Q_SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_drafts_follow_the_q_the_drafter_reports(dist_runner, load, kind, setting):
    pvalue, info = drafts_follow_reported_q(dist_runner, load(kind), Q_SETTINGS[setting])
    assert info["impossible"] == 0, info
    assert info["df"] >= 1 and info["power"] >= 0.8, info  # at least two cells, and enough samples to see a shift
    assert pvalue > ALPHA, (pvalue, info)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_drafts_are_the_argmax_of_a_one_hot_q(dist_runner, load, kind):
    tokens, q = draft_many(dist_runner, load(kind), SamplingParams(temperature=0.0), 64)
    assert torch.equal(q.argmax(-1), tokens)
    assert torch.equal(q, torch.nn.functional.one_hot(tokens, V).double())


class MisreportingDrafter(Drafter):
    """Control: fixed logits (as a real drafter has for one context); drafts sampled with the request's
    filters, q reported without `field` (top_k or top_p) — the bug class of transformers#47932."""

    name = "misreporting (test only)"
    block_size = 2

    def __init__(self, field: str):
        self.off = {"top_k": 0, "top_p": 1.0}[field]
        self.field = field
        self.logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 1.5

    def propose(self, batch, generator=None):
        sampling = batch[0].sampling
        sampled = logits_to_probs(self.logits, sampling)
        reported = logits_to_probs(self.logits, dataclasses.replace(sampling, **{self.field: self.off}))
        count, width = len(batch), self.block_size
        tokens = torch.multinomial(sampled.expand(count * width, V), 1, replacement=True,
                                   generator=generator).reshape(count, width)
        return DraftProposal(tokens=tokens, lengths=torch.full((count,), width),
                             probs=reported.expand(count, width, V).contiguous())


@pytest.mark.parametrize("field, sampling", [("top_k", Q_SETTINGS["top_k3"]), ("top_p", Q_SETTINGS["top_p0.8"])])
def test_control_q_reported_without_the_filter_is_rejected(dist_runner, field, sampling):
    """The drafter-only test rejects a drafter that samples with top-k (top-p) but reports q without it."""
    pvalue, info = drafts_follow_reported_q(dist_runner, MisreportingDrafter(field), sampling)
    assert pvalue < ALPHA, (pvalue, info)
