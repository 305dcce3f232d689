"""The draft gate (dspark.scheduling.gate): it decides from past rounds whether drafting pays at the current
load, corrects a biased head with verification outcomes, probes while closed, and in the simulator keeps
Algorithm 1 from falling below plain decoding when the drafter's cost is not recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dspark.evaluation.simulator import simulate
from dspark.evaluation.traces import drafter_rounds
from dspark.scheduling.named import parse_policies
from dspark.scheduling import DraftGate, SPSProfile
from dspark.scheduling.controller import SpeculationController

GAMMA = 5
# Step time grows with the batch's tokens (ms); the drafter costs 2 ms + 0.05 ms per request.
COSTLY = {"verify_ms_by_tokens": {"1": 10.05, "4096": 215.0}, "draft_ms": {"1": 2.05, "1024": 53.2},
          "draft_layers": 1}


def feed(gate, c, rounds, accept=None, seed=0, per_step=32):
    """`rounds` rounds in steps of `per_step` with every conditional confidence = c, all slots verified; each
    slot survives with probability `accept` (default c) given the previous one."""
    rng = np.random.default_rng(seed)
    accept = c if accept is None else accept
    for start in range(0, rounds, per_step):
        n = min(per_step, rounds - start)
        accepted = np.cumprod(rng.random((n, GAMMA)) < accept, axis=1).sum(1)
        gate.observe(np.full((n, GAMMA), c), np.full(n, GAMMA), np.full(n, GAMMA), accepted)


def test_gate_drafts_while_it_pays_and_stops_under_load_when_it_does_not():
    profile = SPSProfile.from_dict(COSTLY)
    good, weak = DraftGate(profile, probe_every=0), DraftGate(profile, probe_every=0)
    assert good.should_draft(64) and weak.should_draft(64)  # nothing observed yet: draft
    feed(good, 0.9, 512)
    feed(weak, 0.2, 512)
    assert good.should_draft(1) and good.should_draft(256)
    assert weak.gain(256) < 1.0 and not weak.should_draft(256)
    # The same weak drafter pays at low load: one request's step is nearly flat in tokens.
    flat = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 10.0, "64": 10.3}, "draft_ms": {"1": 1.0}})
    cheap = DraftGate(flat, probe_every=0)
    feed(cheap, 0.6, 512)
    assert cheap.should_draft(1)


def test_outcomes_correct_a_biased_head():
    """A head that predicts 0.9 per slot while only 10 % survive: without outcomes the gate keeps drafting,
    with them it stops (the correction ρ ≈ 0.1/0.9 at slot 1)."""
    profile = SPSProfile.from_dict(COSTLY)
    blind, informed = DraftGate(profile, probe_every=0), DraftGate(profile, probe_every=0)
    for _ in range(16):
        blind.observe(np.full((32, GAMMA), 0.9), np.full(32, GAMMA))  # no verification outcome given
    feed(informed, 0.9, 512, accept=0.1)
    assert blind.should_draft(256)
    assert informed.correction()[0] == pytest.approx(0.1 / 0.9, rel=0.25)
    assert not informed.should_draft(256)


def test_closed_gate_probes_and_skips_bad_rows():
    gate = DraftGate(SPSProfile.from_dict(COSTLY), probe_every=4, min_rounds=8, probe_budget=1.0)
    feed(gate, 0.05, 64)
    decisions = [gate.should_draft(128) for _ in range(12)]
    assert decisions == [False, False, False, True] * 3
    before = gate.rounds
    bad = np.full((3, GAMMA), 0.5)
    bad[0, 1], bad[1, 0] = np.nan, 1.5
    gate.observe(bad, np.full(3, GAMMA))
    assert gate.rounds == before + 1  # only the clean row counts
    with pytest.raises(ValueError, match="window"):
        DraftGate(SPSProfile.from_dict(COSTLY), window=0)


def test_probes_are_budgeted_by_their_measured_cost():
    """A probe measured at 5 undrafted steps (the drafter's catch-up) where the profile says 1.5 is spaced
    further apart, as the budget requires; a time recorded without a pending decision is ignored."""
    def probes(probe_s):
        gate = DraftGate(SPSProfile.from_dict(COSTLY), probe_every=4, min_rounds=8)
        feed(gate, 0.05, 64)
        gain, lasts = gate._estimate(128)
        decisions = []
        for _ in range(2000):
            decisions.append(gate.should_draft(128))
            gate.record_step(probe_s if decisions[-1] else 0.01)
            gate.record_step(5.0)  # no decision pending: not counted
        return np.diff(np.flatnonzero(decisions)), gain, lasts

    by_profile, gain, lasts = probes(0.01)
    measured, _, _ = probes(0.05)
    assert set(by_profile) == {1 + math.ceil(lasts * (1 - gain) / 0.01 - lasts)}
    assert set(measured) == {1 + math.ceil((5 - gain * lasts) / 0.01 - 5)}  # after the first probe


def test_measured_step_overhead_enters_both_sides():
    """Time outside the model calls is paid by drafted and plain steps alike: with 5 ms of it per step a
    drafter that loses on the bare profile pays (the per-step cost weighs less against more tokens)."""
    profile = SPSProfile.from_dict(COSTLY)
    bare, loaded = DraftGate(profile, probe_every=0), DraftGate(profile, probe_every=0)
    for gate in (bare, loaded):
        feed(gate, 0.25, 512)
    for _ in range(50):
        loaded.should_draft(16)
        loaded.record_step(0.025, 0.020)
        loaded.record_step(0.025, 0.030)  # more model time than step time: ignored
    assert bare.gain(16) < 1.0 < loaded.gain(16)
    assert not bare.should_draft(16) and loaded.should_draft(16)


def weak_traces(seed=0, rounds=600):
    """A weak, calibrated drafter: conditional c ~ Beta around 0.35; slot k survives with probability c_k."""
    rng = np.random.default_rng(seed)
    conf = rng.beta(1.4, 2.6, size=(rounds, GAMMA)).clip(0.02, 0.98)
    acc = np.cumprod(rng.random((rounds, GAMMA)) < conf, axis=1).sum(1)
    return {"dspark": {"drafter": "dspark", "block_size": GAMMA, "has_confidences": True, "datasets": {"s": {
        "domain": "math", "confidences": conf.tolist(), "drafted": [GAMMA] * rounds, "verified": [GAMMA] * rounds,
        "accepted": acc.tolist(), "emitted": (acc + 1).tolist(), "sample": (np.arange(rounds) // 20).tolist()}}}}


def test_gated_algorithm_1_never_falls_below_plain_decoding_where_ungated_does():
    rounds = drafter_rounds(weak_traces(), "dspark")
    profile = SPSProfile.from_dict(COSTLY)
    policies = parse_policies("plain,causal-greedy,causal-greedy-gated", GAMMA)
    res = simulate(rounds, profile, concurrency=[1, 64, 256], steps=300, min_rounds=0, policies=policies)
    by = {name: {p["concurrency"]: p for p in pts} for name, pts in res["policies"].items()}
    assert by["causal-greedy"][256]["throughput_tok_s"] < 0.97 * by["plain"][256]["throughput_tok_s"]
    for c in (64, 256):
        assert by["causal-greedy-gated"][c]["throughput_tok_s"] >= 0.98 * by["plain"][c]["throughput_tok_s"]
        assert by["causal-greedy-gated"][c]["drafted_fraction"] < 0.2
    # At one request the drafter pays: the gate stays open and the policy is Algorithm 1.
    assert by["causal-greedy"][1]["throughput_tok_s"] > by["plain"][1]["throughput_tok_s"]
    assert by["causal-greedy-gated"][1]["drafted_fraction"] == 1.0
    assert by["causal-greedy-gated"][1]["throughput_tok_s"] == pytest.approx(by["causal-greedy"][1]["throughput_tok_s"])


# -------------------------------------------------------------------------------------------------
# In the generation loop: skipped rounds are plain decoding steps; output stays exact
# -------------------------------------------------------------------------------------------------

from collections import Counter  # noqa: E402

from dspark.decoding.sampling import SamplingParams  # noqa: E402
from dspark.engine.generation import generate  # noqa: E402
from dspark.errors import RequestError  # noqa: E402

from drafters_for_tests import RandomDrafter  # noqa: E402
from test_sampling_distribution import ALPHA, chi_square, choose_n_samples, exact_joint, _power  # noqa: E402
from test_scheduler_lossless import (  # noqa: E402
    CHUNK, PROMPT, TOP_K3, V, MarkovConfidenceDrafter, NoisyOracleDrafter,
)

# Drafting never pays here (a drafter as slow as 20 verification steps), so after `min_rounds` the gate stays
# closed except for its probes: with probe_every=2 it alternates between drafted and plain rounds.
NEVER_PAYS = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 10.0, "100000": 100010.0}, "draft_ms": {"1": 200.0}})


def alternating_gate():
    return DraftGate(NEVER_PAYS, probe_every=2, min_rounds=1)


def test_generation_with_gate_equals_plain_greedy(dist_runner):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, V, int(rng.integers(1, 9))).tolist() for _ in range(16)]
    greedy = SamplingParams(temperature=0.0)
    plain = generate(dist_runner, prompts, sampling=greedy, max_new_tokens=18).sequences
    longest = generate(dist_runner, prompts, sampling=greedy, max_new_tokens=20).sequences
    drafter = NoisyOracleDrafter({tuple(p): s.token_ids for p, s in zip(prompts, longest)}, block_size=4)
    gate = alternating_gate()
    out = generate(dist_runner, prompts, sampling=greedy, max_new_tokens=18, drafter=drafter, num_draft_tokens=4,
                   record_rounds=True, controller=SpeculationController(gate=gate))
    assert [s.token_ids for s in out.sequences] == [s.token_ids for s in plain]
    rounds = [r for s in out.sequences for r in s.rounds]
    assert sum(r.drafted == 0 for r in rounds) > 10 and sum(r.accepted for r in rounds) > 10
    report = gate.report()
    assert report["skipped_steps"] > 0 and report["drafted_steps"] > 0
    with pytest.raises(RequestError, match="gate needs confidences"):
        generate(dist_runner, prompts, drafter=RandomDrafter(V, block_size=2),
                 controller=SpeculationController(gate=alternating_gate()))


@pytest.mark.slow
def test_sampling_distribution_is_exact_with_gate(dist_runner):
    """The joint of the first 3 sampled tokens (exact target distribution vs N samples, chi-square at
    α = ALPHA with the power requirement of test_sampling_distribution) when the gate alternates drafted
    and plain rounds; the drafter's confidences depend on its drafted tokens."""
    exact = exact_joint(dist_runner, PROMPT, TOP_K3)
    n_samples = choose_n_samples(exact)
    drafter = MarkovConfidenceDrafter(V, block_size=2, scale=0.5, base_logits=[0, 0, 0, 2.0, 0, 0, 0, 0])
    counts = np.zeros(V**3, dtype=np.int64)
    first_round = Counter()
    for chunk in range(n_samples // CHUNK):
        gate = alternating_gate()
        if chunk % 2:  # a gate that has seen a round is closed: this chunk starts with a plain round
            gate.observe(np.full((1, 2), 0.5), [2], [2], [1])
        out = generate(dist_runner, [PROMPT] * CHUNK, sampling=TOP_K3, max_new_tokens=4, drafter=drafter,
                       num_draft_tokens=2, seed=70 + chunk, record_rounds=True, controller=SpeculationController(gate=gate))
        for seq in out.sequences:
            counts[np.ravel_multi_index(seq.token_ids[:3], (V,) * 3)] += 1
            first_round[seq.rounds[0].drafted] += 1
    assert first_round[0] > 0 and first_round[2] > 0  # some chunks start with a plain round, some drafted
    assert _power(exact, n_samples) >= 0.8
    pvalue, _ = chi_square(counts, exact)
    assert pvalue > ALPHA, f"output distribution differs from the target with the gate: p={pvalue:.3g}"


# -------------------------------------------------------------------------------------------------
# The window's histogram and the hysteresis
# -------------------------------------------------------------------------------------------------

def exact_gain(gate, requests):
    """Θ_spec / Θ_plain from the window's rounds by one exact sort (what the histogram approximates)."""
    rows = gate._buffer[: gate.rounds]
    width = rows.shape[2]
    values = np.sort(np.clip(rows[:, 0] * gate.correction()[None, :], 0, 1).reshape(-1))[::-1]
    weight = requests / rows.shape[0]
    sps = gate.profile.sps_table(requests, requests * (1 + width), include_draft=True)
    tokens = requests + weight * np.arange(values.size + 1)
    tau = requests + weight * np.concatenate(([0.0], np.cumsum(values)))
    spec = (tau * np.interp(tokens, np.arange(sps.size), sps)).max()
    return spec / (requests * float(gate.profile.sps(requests, requests)[()]))


def test_window_histogram_tracks_the_ring_buffer_and_the_exact_gain():
    rng = np.random.default_rng(3)
    gate = DraftGate(SPSProfile.from_dict(COSTLY), window=300, bins=512, min_verified=1)
    for step in range(40):  # 40 steps of 1..40 rounds: the ring wraps several times
        n = int(rng.integers(1, 41))
        conf = rng.beta(2, 2, size=(n, GAMMA))
        full = rng.integers(0, GAMMA + 1, n)
        ell = np.minimum(rng.integers(0, GAMMA + 1, n), full)
        acc = np.minimum(np.cumprod(rng.random((n, GAMMA)) < conf, axis=1).sum(1), ell)
        gate.observe(conf, full, ell, acc)
    assert gate.rounds == 300
    ring = gate._buffer
    cells = np.minimum((ring[:, 0] * 512).astype(int), 511)
    for k in range(GAMMA):
        assert (gate._counts[k] == np.bincount(cells[:, k], minlength=512)).all()
        assert np.allclose(gate._sums[k], np.bincount(cells[:, k], weights=ring[:, 0, k], minlength=512))
    assert np.allclose(gate._totals, ring.sum(axis=0))
    for requests in (1, 16, 128, 512):
        assert gate.gain(requests) == pytest.approx(exact_gain(gate, requests), rel=2e-3)


def test_hysteresis_keeps_an_open_gate_open_near_break_even():
    """A drafter whose estimated gain sits just below 1: an open gate stays open within the hysteresis, a
    closed one stays closed until the gain exceeds 1 + margin."""
    profile = SPSProfile.from_dict(COSTLY)
    probe = DraftGate(profile, probe_every=0)
    feed(probe, 0.5, 2048)
    load = next(r for r in range(1, 1024) if probe.gain(r) < 1.0)  # the first load where drafting stops paying
    gain = probe.gain(load)
    assert 0.99 < gain < 1.0
    open_gate, strict = DraftGate(profile, probe_every=0), DraftGate(profile, probe_every=0, hysteresis=0.0)
    for gate in (open_gate, strict):
        feed(gate, 0.5, 2048)
    assert open_gate.should_draft(load) and not strict.should_draft(load)
    assert not open_gate.should_draft(4 * load)  # far below break-even: closes
    assert not open_gate.should_draft(load)  # closed: needs a gain above 1 again
    assert open_gate.should_draft(1)
    with pytest.raises(ValueError, match="hysteresis"):
        DraftGate(profile, hysteresis=-0.1)


def test_a_step_contributes_at_most_sample_rounds_rotating_over_its_rows():
    """Once warmed up (min_rounds), a step of 8 rounds gives 4, evenly spaced, the next step the other 4;
    while warming up every round counts."""
    warming = DraftGate(SPSProfile.from_dict(COSTLY), sample=4, min_rounds=100)
    warming.observe(np.full((8, GAMMA), 0.5), np.full(8, GAMMA))
    assert warming.rounds == 8
    gate = DraftGate(SPSProfile.from_dict(COSTLY), sample=4, window=64, bins=8, min_rounds=0)
    conf = np.tile(np.arange(1, 9)[:, None] / 8.0, (1, GAMMA))  # row i has c = (i + 1) / 8 at every slot
    seen = []
    for _ in range(2):
        gate.observe(conf, np.full(8, GAMMA))
        rounds = gate.rounds  # moves the pending rounds into the window
        seen.append(gate._buffer[rounds - 4: rounds, 0, 0] * 8)
    assert gate.rounds == 8
    assert seen[0].tolist() == [1, 3, 5, 7] and seen[1].tolist() == [2, 4, 6, 8]


def test_probes_of_a_hopeless_drafter_are_rare_enough_to_cost_under_the_budget():
    """Drafting at 256 requests here runs at g ≈ 0.6 of plain throughput in steps r ≈ 1.6 times as long:
    probing every 16th step would cost about 4 % of the time; the budget stretches the interval to
    n − 1 ≥ r · ((1 − g) / 0.01 − 1) ≈ 64."""
    gate = DraftGate(SPSProfile.from_dict(COSTLY), probe_every=16, min_rounds=8)
    feed(gate, 0.05, 64)
    gain, ratio = gate._estimate(256)
    interval = gate._probe_interval(256)
    assert gain < 0.7 and ratio > 1
    assert interval == 1 + int(np.ceil(ratio * ((1 - gain) / 0.01 - 1))) > 3 * 16
    decisions = [gate.should_draft(256) for _ in range(2 * interval)]
    assert [i for i, d in enumerate(decisions) if d] == [interval - 1, 2 * interval - 1]
    cost = (1 - gain) * ratio / (interval - 1 + ratio)  # share of time lost to one probe per interval
    assert cost <= 0.01
    with pytest.raises(ValueError, match="probe_budget"):
        DraftGate(SPSProfile.from_dict(COSTLY), probe_budget=0)
