"""Scheduling (docs/design.md §5): SPS profiles (loading, validation, monotone interpolation, extrapolation) and the
verification-length policies on hand-made inputs, against a plain-Python transcription of Algorithm 1 and
one of CausalGreedy's staircase lookahead (random staircase profiles, repeated calls on one instance).

Profiles are built from dicts inside the tests (shapes of the shared H100 table: verify_ms["RxL"],
draft_ms["R"], in ms); no test reads a file outside the repository.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dspark.errors import ConfigError
from dspark.scheduling import (
    AsyncTopK,
    CausalGreedy,
    ConfidenceThreshold,
    FixedLength,
    ProfileError,
    SPSProfile,
    SurvivalThreshold,
    VerifyAll,
)

# A slice of the measured H100 / Qwen3-4B-shape table (README of shared/data/profiles).
H100_SLICE = {
    "device": "NVIDIA H100 80GB HBM3",
    "shape": "Qwen3-4B (H 2560, 36 layers, 32/8 heads, V 151936)",
    "verify_ms": {"1x1": 4.5086, "1x2": 4.791, "1x4": 4.8351, "1x8": 4.8698,
                  "128x1": 13.0081, "128x2": 14.4502, "128x4": 18.0011, "128x8": 26.0816,
                  "256x1": 22.8171, "256x2": 26.8106, "256x4": 34.8228, "256x8": 50.5233},
    "draft_ms": {"1": 1.2796, "128": 5.1651, "256": 9.5411},
}


def by_tokens(sps: dict[int, float]) -> SPSProfile:
    """A flat profile from SPS values (steps/s) per total token count."""
    return SPSProfile.from_dict({"verify_ms_by_tokens": {str(b): 1000.0 / v for b, v in sps.items()}})


def appendix_a_profile() -> SPSProfile:
    return by_tokens({1: 1.0, 2: 0.5, 3: 0.45})


FLAT = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 10.0, "100000": 10.0}})
LINEAR = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 11.0, "1001": 1011.0}})  # T(B) = 10 + B ms


# -------------------------------------------------------------------------------------------------
# SPS profiles
# -------------------------------------------------------------------------------------------------

def test_grid_profile_reads_measured_points_and_interpolates():
    p = SPSProfile.from_dict(H100_SLICE, expect={"device": "NVIDIA H100 80GB HBM3"})
    assert p.is_grid and p.has_draft_cost and p.metadata["device"].startswith("NVIDIA H100")
    np.testing.assert_allclose(p.verify_ms([1, 2, 4, 8], requests=1), [4.5086, 4.791, 4.8351, 4.8698])
    np.testing.assert_allclose(p.verify_ms([128, 256, 512, 1024], requests=128), [13.0081, 14.4502, 18.0011, 26.0816])
    # the README's reading: 8 tokens cost +8 % over 1 at R = 1, 2x at R = 128
    assert p.verify_ms(8, 1) / p.verify_ms(1, 1) == pytest.approx(1.08, abs=0.005)
    assert p.verify_ms(1024, 128) / p.verify_ms(128, 128) == pytest.approx(2.0, abs=0.01)
    # between measured L (3 tokens each at R = 1: halfway between L = 2 and L = 4)
    assert p.verify_ms(3, 1) == pytest.approx((4.791 + 4.8351) / 2)
    # between measured R, at the same L (R = 192 halfway between 128 and 256)
    assert p.verify_ms(192 * 2, 192) == pytest.approx((14.4502 + 26.8106) / 2)
    # the drafter's cost interpolates over R and is added on request
    assert p.draft_ms(192) == pytest.approx((5.1651 + 9.5411) / 2)
    assert p.step_ms(384, 192, include_draft=True) == pytest.approx(p.verify_ms(384, 192) + p.draft_ms(192))
    assert p.sps(384, 192) == pytest.approx(1000.0 / p.verify_ms(384, 192))


def test_extrapolation_is_linear_beyond_and_constant_below():
    p = SPSProfile.from_dict(H100_SLICE)
    slope_l = (50.5233 - 34.8228) / 4  # per unit of L at R = 256, from L = 4 → 8
    assert p.verify_ms(256 * 12, 256) == pytest.approx(50.5233 + 4 * slope_l)
    slope_r = (26.8106 - 14.4502) / 128  # per request at L = 2, from R = 128 → 256
    assert p.verify_ms(512 * 2, 512) == pytest.approx(26.8106 + 256 * slope_r)
    assert p.draft_ms(512) == pytest.approx(9.5411 + 256 * (9.5411 - 5.1651) / 128)
    flat = SPSProfile.from_dict({"verify_ms_by_tokens": {"4": 2.0, "8": 3.0}})
    np.testing.assert_allclose(flat.verify_ms([1, 4, 6, 8, 16]), [2.0, 2.0, 2.5, 3.0, 5.0])


def test_non_monotone_measurements_are_forced_monotone():
    # 8x8 measured faster than 8x6 (noise in the real table): read as the running maximum
    data = {"verify_ms": {"8x1": 5.0, "8x6": 5.52, "8x8": 5.35, "16x1": 4.9, "16x8": 6.3}}
    p = SPSProfile.from_dict(data)
    assert p.verify_ms(64, 8) == pytest.approx(5.52)
    assert p.verify_ms(16, 16) >= p.verify_ms(8, 8)  # 16x1 (4.9) lifted to 8x1's 5.0
    assert p.verify_ms(16, 16) == pytest.approx(5.0)
    for requests in (1, 8, 12, 16, 40):
        table = p.sps_table(requests, requests * 12)
        assert np.all(np.diff(table) <= 0), requests  # SPS non-increasing in B
        assert table[0] == table[1]
    flat = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 3.0, "2": 2.0, "5": 4.0}})
    np.testing.assert_allclose(flat.verify_ms([1, 2, 3, 5]), [3.0, 3.0, 3 + 1 / 3, 4.0])


def test_sps_table_matches_pointwise_lookup():
    p = SPSProfile.from_dict(H100_SLICE)
    for requests in (1, 7, 128, 200, 300):
        table = p.sps_table(requests, requests * 8, include_draft=True)
        assert table.dtype == np.float64 and table.shape == (requests * 8 + 1,)
        b = np.arange(1, requests * 8 + 1)
        np.testing.assert_allclose(table[1:], p.sps(b, requests, include_draft=True))
    flat = by_tokens({1: 1.0, 2: 0.5, 3: 0.45})
    np.testing.assert_allclose(flat.sps_table(1, 3), [1.0, 1.0, 0.5, 0.45])


def test_load_from_file_and_identity_check(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(H100_SLICE))
    p = SPSProfile.load(path, expect={"device": "NVIDIA H100 80GB HBM3", "shape": H100_SLICE["shape"]})
    assert p.verify_ms(1, 1) == pytest.approx(4.5086)
    with pytest.raises(ProfileError, match="device='NVIDIA H100 80GB HBM3', expected device='NVIDIA A100'"):
        SPSProfile.load(path, expect={"device": "NVIDIA A100"})
    with pytest.raises(ProfileError, match="has no 'model' field"):
        SPSProfile.load(path, expect={"model": "Qwen/Qwen3-4B"})
    with pytest.raises(ProfileError, match="does not exist"):
        SPSProfile.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not readable JSON"):
        SPSProfile.load(tmp_path / "broken.json")
    assert issubclass(ProfileError, ConfigError)


@pytest.mark.parametrize("data,message", [
    ({"draft_ms": {"1": 1.0}}, "missing 'verify_ms'"),
    ({"verify_ms": {}}, "non-empty mapping"),
    ({"verify_ms": [1.0, 2.0]}, "non-empty mapping"),
    ({"verify_ms": {"4by2": 1.0}}, "is not \"RxL\""),
    ({"verify_ms": {"0x2": 1.0}}, "R ≥ 1 and L ≥ 1"),
    ({"verify_ms": {"1x1": 0.0}}, r"verify_ms\['1x1'\] = 0.0: times must be finite and > 0"),
    ({"verify_ms": {"1x1": -3}}, "must be finite and > 0"),
    ({"verify_ms": {"1x1": float("nan")}}, "= nan"),
    ({"verify_ms": {"1x1": float("inf")}}, "= inf"),
    ({"verify_ms": {"1x1": "4.5"}}, "must be numbers"),
    ({"verify_ms": {"1x1": True}}, "must be numbers"),
    ({"verify_ms_by_tokens": {"two": 1.0}}, "not a positive integer"),
    ({"verify_ms_by_tokens": {"0": 1.0}}, "must be ≥ 1"),
    ({"verify_ms_by_tokens": {"1": 1.0}, "draft_ms": {"1": float("nan")}}, r"draft_ms\['1'\]"),
    ([1, 2], "expected a JSON object"),
])
def test_invalid_profiles_are_rejected_with_a_clear_message(data, message):
    with pytest.raises(ProfileError, match=message):
        SPSProfile.from_dict(data)


def test_flat_table_names_and_grid_precedence():
    """`verify_ms_total_tokens` (what dspark.scheduling.profiler writes) is read like verify_ms_by_tokens;
    a file with a grid and a flat table is read as the grid (the flat one stays as metadata)."""
    flat = SPSProfile.from_dict({"verify_ms_total_tokens": {"1": 2.0, "3": 4.0}})
    assert not flat.is_grid and flat.verify_ms(2) == pytest.approx(3.0)
    both = SPSProfile.from_dict({"verify_ms": {"1x1": 5.0, "1x2": 6.0}, "verify_ms_total_tokens": {"1": 2.0}})
    assert both.is_grid and both.verify_ms(2, 1) == pytest.approx(6.0)
    assert both.metadata["verify_ms_total_tokens"] == {"1": 2.0}
    with pytest.raises(ProfileError, match=r"verify_ms_total_tokens\['2'\]"):
        SPSProfile.from_dict({"verify_ms_total_tokens": {"2": -1.0}})


def test_grid_lookup_needs_the_number_of_requests():
    p = SPSProfile.from_dict(H100_SLICE)
    with pytest.raises(ValueError, match="number of requests"):
        p.verify_ms(8)


# -------------------------------------------------------------------------------------------------
# Reference: Algorithm 1 in plain Python (one candidate at a time)
# -------------------------------------------------------------------------------------------------

def algorithm1(c: np.ndarray, full: np.ndarray, sps, early_stop: bool = True) -> list[int]:
    """Paper Algorithm 1 line by line; sps(B) a function. Without early_stop: the retrospective variant
    (argmax over the whole admission path)."""
    rows, width = c.shape
    cands = []
    for r in range(rows):
        a = 1.0
        for j in range(int(full[r])):
            a *= c[r, j]
            if a > 0:
                cands.append((-a, r * width + j, r, j + 1))
    cands.sort()  # by a descending, then flat index (prefix order within a request)
    lengths, best_lengths = [0] * rows, [0] * rows
    batch, tau = rows, float(rows)
    best = tau * sps(batch)
    for neg_a, _, r, j in cands:
        lengths[r] = j
        batch += 1
        tau += -neg_a
        theta = tau * sps(batch)
        if theta > best:
            best, best_lengths = theta, list(lengths)
        elif early_stop:
            break
    return best_lengths


def _sps_fn(profile: SPSProfile, requests: int):
    return lambda b: float(profile.sps(b, requests))


def call(scheduler, c, full, limits=None, ids=None):
    out = scheduler(torch.as_tensor(c, dtype=torch.float32), torch.as_tensor(full), limits, ids)
    assert out.dtype == torch.long and out.shape == (len(full),)
    return out.tolist()


# -------------------------------------------------------------------------------------------------
# Static policies
# -------------------------------------------------------------------------------------------------

C3 = [[0.9, 0.4, 0.9], [0.6, 0.6, 0.6], [0.95, 0.95, 0.2]]


def test_verify_all_and_fixed_length():
    assert call(VerifyAll(), C3, [3, 3, 2], limits=[3, 1, 3]) == [3, 1, 2]
    assert VerifyAll()(None, torch.tensor([3, 0]), torch.tensor([2, 5])).tolist() == [2, 0]
    assert call(FixedLength(2), C3, [3, 1, 3]) == [2, 1, 2]
    assert FixedLength(0)(None, [3, 3]).tolist() == [0, 0]
    with pytest.raises(ValueError):
        FixedLength(-1)


def test_confidence_threshold_is_longest_prefix_with_every_c_above():
    assert call(ConfidenceThreshold(0.5), C3, [3, 3, 3]) == [1, 3, 2]
    assert call(ConfidenceThreshold(0.5), C3, [3, 2, 3], limits=[3, 3, 1]) == [1, 2, 1]
    assert call(ConfidenceThreshold(0.0), C3, [3, 2, 1]) == [3, 2, 1]
    assert call(ConfidenceThreshold(0.96), C3, [3, 3, 3]) == [0, 0, 0]
    with pytest.raises(ValueError):
        ConfidenceThreshold(1.5)


def test_survival_threshold_uses_cumulative_products():
    # a = [0.9, 0.36, 0.324], [0.6, 0.36, 0.216], [0.95, 0.9025, 0.1805]
    assert call(SurvivalThreshold(0.35), C3, [3, 3, 3]) == [2, 2, 2]
    assert call(SurvivalThreshold(0.5), C3, [3, 3, 3]) == [1, 1, 2]
    assert call(SurvivalThreshold(0.2), C3, [3, 3, 3]) == [3, 3, 2]
    assert call(SurvivalThreshold(0.0), [[0.5, 0.0, 1.0]], [3]) == [1]  # a = 0 is never verified


# -------------------------------------------------------------------------------------------------
# CausalGreedy (Algorithm 1)
# -------------------------------------------------------------------------------------------------

def test_causal_greedy_flat_sps_verifies_long_prefixes():
    """Light load: a flat SPS makes every candidate with a > 0 worth verifying."""
    c = [[0.9, 0.9, 0.9, 0.9], [0.3, 0.3, 0.3, 0.3], [0.5, 0.0, 0.9, 0.9]]
    assert call(CausalGreedy(FLAT), c, [4, 4, 4]) == [4, 4, 1]


def test_causal_greedy_steep_sps_verifies_only_confident_tokens():
    """Heavy load: T(B) = 10 + B ms. With R = 3, Θ_0 = 3/13; admitting a raises Θ while a > τ/T(B)·1."""
    c = [[0.98, 0.97, 0.9, 0.5], [0.3, 0.3, 0.3, 0.3], [0.6, 0.5, 0.5, 0.5]]
    got = call(CausalGreedy(LINEAR), c, [4, 4, 4])
    assert got == algorithm1(np.array(c, dtype=np.float32).astype(np.float64), np.array([4, 4, 4]),
                             _sps_fn(LINEAR, 3))
    assert got[1] == 0 and got[0] >= 2 and got[0] > got[2]
    flat = call(CausalGreedy(FLAT), c, [4, 4, 4])
    assert sum(flat) > sum(got)


def test_causal_greedy_stops_at_first_non_improving_candidate():
    """Appendix A: Θ_0 = 1.0, Θ_1 = 0.9, Θ_2 = 1.134 — causal stops at Θ_1 (ℓ = 0), although Θ_2 is the
    global maximum."""
    profile = appendix_a_profile()
    assert call(CausalGreedy(profile), [[0.8, 0.9]], [2]) == [0]
    assert call(CausalGreedy(profile), [[0.8, 0.0]], [2]) == [0]
    assert algorithm1(np.array([[0.8, 0.9]]), np.array([2]), _sps_fn(profile, 1), early_stop=False) == [2]
    # with a cheaper second token the first is admitted (Θ_1 = 1.8 · 0.6 = 1.08 > 1.0), and the stop
    # comes at the second (Θ_2 = 2.52 · 0.4 = 1.008)
    assert call(CausalGreedy(by_tokens({1: 1.0, 2: 0.6, 3: 0.4})), [[0.8, 0.9]], [2]) == [1]


@pytest.mark.parametrize("seed", range(12))
def test_causal_greedy_matches_reference_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    rows, width = int(rng.integers(1, 40)), int(rng.integers(1, 9))
    c = rng.uniform(0.05, 1.0, (rows, width))
    c[rng.random((rows, width)) < 0.1] = 1.0  # ties inside a request
    c[rng.random((rows, width)) < 0.05] = 0.0
    c = c.astype(np.float32)
    lengths = rng.integers(0, width + 1, rows)
    limits = rng.integers(0, width + 1, rows)
    profile = [FLAT, LINEAR, SPSProfile.from_dict(H100_SLICE)][seed % 3]
    scheduler = CausalGreedy(profile)
    got = call(scheduler, c, lengths, limits=limits)
    full = np.minimum(lengths, limits)
    sps = lambda b: float(profile.sps(b, rows, include_draft=scheduler.include_draft))  # noqa: E731
    assert got == algorithm1(c.astype(np.float64), full, sps)


# Two requests; step time 10 ms up to 4 tokens, 13 ms from 5 to 8 (one stair).
STAIR = by_tokens({1: 100.0, 4: 100.0, 5: 1000.0 / 13, 8: 1000.0 / 13})
STAIR_C = [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]]  # a = 0.9, 0.81, 0.729 for both


def test_lookahead_passes_a_stair_that_stops_algorithm_1():
    """Algorithm 1 admits both first slots (B = 4, Θ = 3.8 / 10 ms), then stops: the 5th token starts the
    13 ms stair (Θ = 4.61 / 13 < 0.38) although filling the stair gives 6.88 / 13 = 0.53. The lookahead's
    forecast (the previous call's survivals) sees past the stair from the second call on."""
    strict, ahead = CausalGreedy(STAIR, lookahead=False), CausalGreedy(STAIR)
    assert call(ahead, STAIR_C, [3, 3]) == [1, 1]  # first call: no forecast, Algorithm 1 exactly
    assert call(ahead, STAIR_C, [3, 3]) == [3, 3]
    assert call(strict, STAIR_C, [3, 3]) == call(strict, STAIR_C, [3, 3]) == [1, 1]
    assert algorithm1(np.array(STAIR_C), np.array([3, 3]), _sps_fn(STAIR, 2)) == [1, 1]
    # A forecast that says the stair does not pay (weak previous rounds) keeps the early stop.
    weak = CausalGreedy(STAIR)
    call(weak, [[0.9, 0.1, 0.1], [0.9, 0.1, 0.1]], [3, 3])
    assert call(weak, STAIR_C, [3, 3]) == [1, 1]
    # Current candidates with a = 0 are never admitted, whatever the forecast promised.
    assert call(ahead, [[0.9, 0.9, 0.0], [0.9, 0.0, 0.9]], [3, 3]) == [2, 1]
    ahead.reset()
    assert call(ahead, STAIR_C, [3, 3]) == [1, 1]


# -------------------------------------------------------------------------------------------------
# Staircase profiles: Algorithm 1's first stop is not the global maximum of Θ, and the lookahead acts.
# Reference of the lookahead written from CausalGreedy's docstring, one candidate at a time.
# -------------------------------------------------------------------------------------------------

def staircase(rng: np.random.Generator) -> SPSProfile:
    """T(B) = base + jump · ⌈B / tile⌉ + slope · B ms for random tile (2–16 tokens), height and slope: SPS
    falls in stairs (real profiles do, docs/design.md §5.4), so the candidate that starts a step lowers Θ although the
    step's flat part may pay it back."""
    tile = int(rng.choice([2, 4, 8, 16]))
    base, jump, slope = rng.uniform(5.0, 20.0), rng.uniform(1.0, 8.0), rng.uniform(0.0, 0.05)
    points = {}
    for k in range(400 // tile + 1):  # B up to 400 > 40 requests × (1 + 8)
        for b in (k * tile + 1, (k + 1) * tile):
            points[str(b)] = base + jump * (k + 1) + slope * b
    return SPSProfile.from_dict({"verify_ms_by_tokens": points})


def random_call(rng: np.random.Generator, rows: int | None = None):
    """Confidences [R, W] (float32; ties c = 1 and zeros c = 0 included), lengths and limits for R requests
    (default: 1–40 at random) and W = 1–8 slots."""
    rows, width = rows or int(rng.integers(1, 41)), int(rng.integers(1, 9))
    c = rng.uniform(0.05, 1.0, (rows, width))
    c[rng.random((rows, width)) < 0.1] = 1.0
    c[rng.random((rows, width)) < 0.05] = 0.0
    return c.astype(np.float32), rng.integers(0, width + 1, rows), rng.integers(0, width + 1, rows)


def candidates(c: np.ndarray, full: np.ndarray) -> list[tuple[float, int, int]]:
    """(a, request, slot count j + 1) of every candidate with a > 0, by a descending, ties in flat-index order."""
    rows, width = c.shape
    out = []
    for r in range(rows):
        a = 1.0
        for j in range(int(full[r])):
            a *= float(c[r, j])
            if a > 0:
                out.append((-a, r * width + j, r, j + 1))
    out.sort()
    return [(-neg_a, r, j) for neg_a, _, r, j in out]


def lookahead_reference(c: np.ndarray, full: np.ndarray, sps, forecast, max_lookaheads: int = 8):
    """CausalGreedy (lookahead=True) from its docstring, in plain Python. sps(B) a function; forecast: the
    previous call's (positive survivals sorted descending, its number of requests), or None. Returns
    (lengths, this call's forecast).

    Algorithm 1 admits candidates by descending a until the first candidate m that does not raise
    Θ(k) = (R + Σ_{i<k} a_(i)) · SPS(R + k). There the forecast path, for k = m+1 … N,
        Θ̂(k) = (τ_{m+1} + Σ_{m<i<k} min(f_i, a_(m))) · SPS(R + k),   τ_{m+1} = R + Σ_{i≤m} a_(i),
    with f_i = previous[⌊i · R_prev / R⌋] (the previous survivals read at this batch's ranks), decides: if no
    Θ̂(k) exceeds Θ(m) the search stops; else the first k* with the largest Θ̂ is admitted (at most the
    candidates there are) and the early-stopping search resumes from k*; at most `max_lookaheads` times.
    N: the forecast's last rank, and at most R · W (W = max(full)), the largest batch the call's SPS table
    covers. A call with no candidate leaves the forecast as it was."""
    rows, width = c.shape
    cands = candidates(c, full)
    count = len(cands)

    def theta(k):  # Θ after admitting the first k candidates
        return (rows + sum(a for a, _, _ in cands[:k])) * sps(rows + k)

    def resume(k):  # Algorithm 1's early-stopping search from k admissions on
        while k < count and theta(k + 1) > theta(k):
            k += 1
        return k

    admitted = resume(0)
    if forecast is not None:
        previous, previous_rows = forecast
        f = []
        while (len(f) * previous_rows) // rows < len(previous):
            f.append(previous[(len(f) * previous_rows) // rows])
        horizon = min(len(f), rows * int(full.max(initial=0)))
        for _ in range(max_lookaheads):
            m = admitted
            if m >= count:
                break
            a_m = cands[m][0]
            tau = rows + sum(a for a, _, _ in cands[: m + 1])
            best, best_k = -np.inf, None
            for k in range(m + 1, horizon + 1):
                if k > m + 1:
                    tau += min(f[k - 1], a_m)
                if tau * sps(rows + k) > best:
                    best, best_k = tau * sps(rows + k), k
            if not best > theta(m):
                break
            admitted = resume(min(best_k, count))
    lengths = [0] * rows
    for _, r, j in cands[:admitted]:
        lengths[r] = max(lengths[r], j)
    new_forecast = ([a for a, _, _ in cands], rows) if count else forecast
    return lengths, new_forecast


def test_staircases_separate_the_first_stop_from_the_global_maximum():
    """CausalGreedy without lookahead, and on its first call with it, is Algorithm 1 on staircase profiles,
    where its first stop differs from the global argmax of Θ in a good share of the cases (56 % here, so a
    "global argmax" search cannot pass)."""
    rng = np.random.default_rng(7)
    cases = differ = 0
    for _ in range(300):
        profile = staircase(rng)
        c, lengths, limits = random_call(rng)
        full = np.minimum(lengths, limits)
        rows = c.shape[0]
        sps = lambda b: float(profile.sps(b, rows))  # noqa: E731
        expected = algorithm1(c.astype(np.float64), full, sps)
        assert call(CausalGreedy(profile, lookahead=False), c, lengths, limits=limits) == expected
        assert call(CausalGreedy(profile), c, lengths, limits=limits) == expected  # no previous call yet
        cases += 1
        differ += expected != algorithm1(c.astype(np.float64), full, sps, early_stop=False)
    assert differ >= cases / 3, (differ, cases)


def test_causal_greedy_lookahead_matches_reference_over_repeated_calls():
    """Sequences of 8 calls on one CausalGreedy instance against `lookahead_reference`: confidences, widths
    and lengths change every call; in half of the sequences the number of requests too (the forecast is then
    mapped by rank), in the other half it stays (a steady batch). The lookahead must change Algorithm 1's
    answer in a good share of the calls that have a forecast (about half of them here), and a second
    lookahead within one call must matter in some (8 calls here)."""
    rng = np.random.default_rng(8)
    calls = changed = repeated = 0
    for sequence in range(60):
        profile = staircase(rng)
        scheduler, plain = CausalGreedy(profile), CausalGreedy(profile, lookahead=False)
        forecast = None
        steady = int(rng.integers(1, 41)) if sequence % 2 else None
        for step in range(8):
            c, lengths, limits = random_call(rng, steady)
            c64, full = c.astype(np.float64), np.minimum(lengths, limits)
            rows = c.shape[0]
            sps = lambda b: float(profile.sps(b, rows))  # noqa: E731
            once, _ = lookahead_reference(c64, full, sps, forecast, max_lookaheads=1)
            calls += forecast is not None
            expected, forecast = lookahead_reference(c64, full, sps, forecast, CausalGreedy.MAX_LOOKAHEADS)
            assert call(scheduler, c, lengths, limits=limits) == expected, step
            strict = call(plain, c, lengths, limits=limits)
            assert strict == algorithm1(c64, full, sps)
            changed += strict != expected
            repeated += once != expected
    assert changed >= calls / 3, (changed, calls)
    assert repeated > 0


def test_causal_greedy_ties_keep_prefix_order():
    """c = 1 makes a_{r,j} = a_{r,j+1}: the admitted slots must still form a prefix of each request."""
    c = [[0.7, 1.0, 1.0, 0.5], [0.7, 1.0, 0.2, 0.2]]
    for profile in (FLAT, LINEAR, appendix_a_profile()):
        got = call(CausalGreedy(profile), c, [4, 4])
        assert got == algorithm1(np.array(c), np.array([4, 4]), _sps_fn(profile, 2))


def test_include_draft_cost_changes_the_trade_off():
    """With a large fixed drafter cost per step, extra verified tokens are relatively cheaper."""
    data = {"verify_ms_by_tokens": {"1": 11.0, "1001": 1011.0}, "draft_ms": {"1": 200.0, "64": 200.0}}
    profile = SPSProfile.from_dict(data)
    c = [[0.6, 0.5, 0.4, 0.3]] * 4
    without = call(CausalGreedy(profile, include_draft=False), c, [4] * 4)
    with_draft = call(CausalGreedy(profile), c, [4] * 4)
    assert CausalGreedy(profile).include_draft and sum(with_draft) > sum(without)


# -------------------------------------------------------------------------------------------------
# AsyncTopK
# -------------------------------------------------------------------------------------------------

def test_async_cold_start_verifies_everything_and_prior_sets_a_budget():
    scheduler = AsyncTopK(LINEAR)
    assert call(scheduler, C3, [3, 3, 2]) == [3, 3, 2] and scheduler.last_budget is None
    prior = AsyncTopK(appendix_a_profile(), prior=[0.8, 0.72])
    assert call(prior, [[0.8, 0.0]], [2]) == [1]  # K = 2 from the prior, one positive current candidate
    assert prior.last_budget == 2


def test_async_budget_comes_from_stale_confidences():
    """Appendix A numbers: stale a = (0.8, 0.72) gives K = 2 (global argmax Θ_2 = 1.134, no early stop);
    stale a = (0.8, 0) gives K = 0. The current values only pick which slots fill K."""
    profile = appendix_a_profile()
    scheduler = AsyncTopK(profile, lag=2)
    high, low, anything = [[0.8, 0.9]], [[0.8, 0.0]], [[0.5, 0.5]]
    call(scheduler, high, [2], ids=[7])  # call 1 (cold start)
    call(scheduler, low, [2], ids=[7])  # call 2 (sized from call 1)
    assert call(scheduler, low, [2], ids=[7]) == [1]  # call 3: K from call 1 = 2; only one current a > 0
    assert scheduler.last_budget == 2
    assert call(scheduler, high, [2], ids=[7]) == [0]  # call 4: K from call 2 = 0, although now a_2 = 0.72
    assert scheduler.last_budget == 0
    assert call(CausalGreedy(profile), high, [2]) == [0]
    lag1 = AsyncTopK(profile, lag=1)
    call(lag1, high, [2], ids=[1])
    assert call(lag1, anything, [2], ids=[1]) == [2] and lag1.last_budget == 2
    with pytest.raises(ValueError, match="lag"):
        AsyncTopK(profile, lag=0)


def test_async_fills_budget_with_highest_current_survivals():
    scheduler = AsyncTopK(FLAT, lag=1)  # flat SPS: K = all stale candidates with a > 0
    call(scheduler, [[0.9, 0.9, 0.9], [0.9, 0.0, 0.0]], [3, 3], ids=[0, 1])  # K = 4 next call
    # current a: r0 = (0.5, 0.25, 0.125), r1 = (0.99, 0.98, 0.97) → top 4 = r1's three + r0's first
    assert call(scheduler, [[0.5, 0.5, 0.5], [0.99, 0.99, 0.99]], [3, 3], ids=[0, 1]) == [1, 3]
    assert scheduler.last_budget == 4


def test_async_requests_joining_and_leaving():
    profile = FLAT
    scheduler = AsyncTopK(profile, lag=2)
    call(scheduler, [[0.9, 0.9], [0.9, 0.9]], [2, 2], ids=[10, 11])  # a = (0.9, 0.81) each
    call(scheduler, [[0.9, 0.0], [0.9, 0.0]], [2, 2], ids=[10, 11])  # a = (0.9, 0) each
    # 11 left, 12 joined: 10's stale = its call-1 vector (2 candidates), 12's = the call-1 batch mean (2)
    call(scheduler, [[0.9, 0.9], [0.9, 0.9]], [2, 2], ids=[10, 12])
    assert scheduler.last_budget == 4
    # 10 and 12 again: 10's stale = call 2 (1 candidate); 12 only has call 3 (its oldest): 2 candidates
    call(scheduler, [[0.9, 0.9], [0.9, 0.9]], [2, 2], ids=[12, 10])
    assert scheduler.last_budget == 3
    # a released request starts over: it gets the batch mean of the oldest remembered call (call 3)
    scheduler.release(10)
    call(scheduler, [[0.9, 0.9], [0.9, 0.9]], [2, 2], ids=[12, 10])
    assert scheduler.last_budget == 4


def test_async_steady_fast_path_equals_general_path():
    """In a steady batch AsyncTopK reuses the sorted survivals of the call `lag` ago; the general path
    (forced here by releasing an unknown id every call) must give the same budgets and lengths."""
    profile = SPSProfile.from_dict(H100_SLICE)
    fast, general = AsyncTopK(profile), AsyncTopK(profile)
    rng = np.random.default_rng(0)
    ids = list(range(100, 164))
    for _ in range(8):
        c = rng.uniform(0.2, 1.0, (64, 7)).astype(np.float32)
        lengths = rng.integers(5, 8, 64)
        general.release(-1)
        assert call(fast, c, lengths, ids=ids) == call(general, c, lengths, ids=ids)
        assert fast.last_budget == general.last_budget
    assert fast._run >= fast.lag and general._run == 0


# -------------------------------------------------------------------------------------------------
# Bad input, shapes
# -------------------------------------------------------------------------------------------------

ALL = [
    lambda: VerifyAll(), lambda: FixedLength(2), lambda: ConfidenceThreshold(0.5), lambda: SurvivalThreshold(0.3),
    lambda: CausalGreedy(LINEAR), lambda: AsyncTopK(LINEAR, prior=[0.9, 0.8, 0.7]),
]


@pytest.mark.parametrize("make", ALL)
def test_bad_confidences_fall_back_to_verify_all_for_that_request(make, caplog):
    scheduler = make()
    c = [[0.9, 0.9, 0.9], [float("nan"), 0.9, 0.9], [0.9, 1.5, 0.9], [0.9, 0.9, -0.1], [0.9, 0.9, float("nan")]]
    full = [3, 3, 3, 3, 2]  # the last request's NaN is beyond its candidates: ignored
    with caplog.at_level(logging.WARNING, logger="dspark.scheduling"):
        first = call(scheduler, c, full)
        call(scheduler, c, full)
    clean = make()(torch.tensor([c[0], c[4]]), torch.tensor([3, 2])).tolist()
    if scheduler.needs_confidences:
        assert first[1:4] == [3, 3, 3]
        warnings = [r for r in caplog.records if "NaN or outside [0, 1]" in r.getMessage()]
        assert len(warnings) == 1  # once per scheduler
    if not isinstance(scheduler, (CausalGreedy, AsyncTopK)):  # these see the bad rows' tokens in B
        assert [first[0], first[4]] == clean


@pytest.mark.parametrize("make", ALL)
def test_missing_confidences_and_degenerate_shapes(make, caplog):
    scheduler = make()
    with caplog.at_level(logging.WARNING, logger="dspark.scheduling"):
        assert scheduler(None, torch.tensor([3, 1]), torch.tensor([2, 2])).tolist() == [2, 1]
        assert scheduler(torch.zeros(3, 2), torch.tensor([2, 2])).tolist() == [2, 2]  # 3 rows for 2 requests
    if scheduler.needs_confidences:
        assert any("no confidences" in r.getMessage() for r in caplog.records)
    assert scheduler(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).tolist() == []
    assert scheduler(torch.zeros(2, 0), torch.tensor([0, 0])).tolist() == [0, 0]
    # fewer confidence columns than proposed drafts: the request without them is verified in full
    out = scheduler(torch.full((2, 1), 0.99), torch.tensor([1, 3])).tolist()
    assert out[0] <= 1 and (out[1] == 3 or not scheduler.needs_confidences)


@pytest.mark.parametrize("make", ALL)
def test_random_inputs_stay_within_limits(make):
    rng = np.random.default_rng(1)
    scheduler = make()
    for step in range(20):
        rows, width = int(rng.integers(1, 30)), 3
        c = rng.uniform(0, 1, (rows, width)).astype(np.float32)
        lengths, limits = rng.integers(0, 4, rows), rng.integers(0, 4, rows)
        got = np.array(call(scheduler, c, lengths, limits=limits, ids=rng.permutation(rows) + 1000 * (step % 3)))
        assert (got >= 0).all() and (got <= np.minimum(lengths, limits)).all()


def test_other_input_types_are_accepted():
    """float16 / float64 confidences, Python lists for lengths, limits and ids."""
    for dtype in (torch.float16, torch.float64):
        c = torch.tensor([[0.9, 0.8], [0.2, 0.9]], dtype=dtype)
        assert CausalGreedy(FLAT)(c, [2, 2], [2, 1], [5, 6]).tolist() == [2, 1]
