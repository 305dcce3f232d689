"""Speculative sampling must reproduce the target's distribution *exactly* (SPEC §1).

Exact-distribution tests: with a tiny vocabulary (V = 8) the target's joint distribution over the first
n = 3 generated tokens, P(t1, t2, t3 | prompt) = Π logits_to_probs(target logits)(t_i | prompt, t_<i), is
enumerated exactly (V^(n-1) = 64 prefixes, one ragged forward). N samples of the speculative sampler
(many copies of the prompt in one batch) are compared with it by a chi-square goodness-of-fit test
(cells with expected count < 5 pooled), α = 0.001.

Power. For a shift of δ = 0.02 in one cell probability p_i, the least detectable way to compensate it is
proportionally over the other cells; the noncentrality of the chi-square statistic is then
λ = N δ² / (p_i (1 − p_i)) ≥ N δ² / max_i p_i(1 − p_i). `_power` returns, for the actual pooled cells,
P(ncx2(df, λ_min) > chi2.ppf(1 − α, df)), the probability that the test rejects under the worst such
shift, and `choose_n_samples` takes the smallest N (a multiple of 4000) with power ≥ 0.85; every
positive test asserts power ≥ 0.8. For the model and prompt below (largest cell 0.08–0.13):

    setting        N       df    λ_min   critical value   power
    T = 1.0        16 000  119   84.5    172.4            0.91   (12 000 would give 0.69)
    T = 0.7        20 000   70   72.8    112.3            0.94   (16 000 would give 0.81)
    top-k 3        12 000   25   48.7     52.6            0.92
    top-p 0.8      12 000   20   43.4     45.3            0.90

(For comparison, a single-cell z-test of δ = 0.02 at p = 0.1 with N = 12 000 has z = 0.02 / sqrt(0.09 /
12 000) ≈ 7.3; the omnibus test pays for its many degrees of freedom.)

Negative controls (drafters whose reported q is not the distribution they sampled from, and a
verification rule that skips the residual) go through the very same procedure and must be rejected.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.decoding.sampling import SamplingParams, logits_to_probs
from dspark.decoding.verification import verify
from dspark.engine.generation import generate
from dspark.errors import RequestError
from dspark.models.drafters.ngram import NgramDrafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import BiasedQDrafter, RandomDrafter

V = 8  # vocabulary
N_TOKENS = 3  # joint over the first 3 generated tokens: round 1 verifies up to 2 drafts
CHUNK = 4_000  # copies of the prompt per generate() call; N is a multiple of it
MAX_SAMPLES = 24_000
ALPHA = 1e-3
DELTA = 0.02  # the shift the test must detect ...
TARGET_POWER = 0.85  # ... with at least this power (asserted ≥ 0.8)
PROMPT = [7, 3, 7, 3, 7]  # repeats, so the n-gram drafter finds matches


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: one intra-op thread is much faster than two fighting over a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = build_random_model(
        tmp_path_factory.mktemp("dist") / "tiny", "tiny-qwen3", seed=2, init_std=0.6, with_tokenizer=False,
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
    )
    return TargetRunner.from_pretrained(folder, dtype="float64")


# --------------------------------------------------------------------------------------------------
# Exact distribution, sampling, chi-square
# --------------------------------------------------------------------------------------------------

def exact_joint(runner: TargetRunner, prompt: list[int], sampling: SamplingParams, n: int = N_TOKENS) -> np.ndarray:
    """P(t_1..t_n | prompt) as a flat array over V^n cells (row-major in (t_1, ..., t_n))."""
    vocab = runner.config.vocab_size
    prefixes = [list(t) for t in itertools.product(range(vocab), repeat=n - 1)]
    seq_ids = [runner.new_sequence() for _ in prefixes]
    try:
        out = runner.forward(seq_ids, [prompt + p for p in prefixes], all_logits=True)
    finally:
        for s in seq_ids:
            runner.free_sequence(s)
    length = len(prompt) + n - 1
    logits = out.logits.reshape(len(prefixes), length, vocab)[:, len(prompt) - 1:]  # [P, n, V]
    cond = logits_to_probs(logits, sampling).double().numpy()  # cond[i, j] = P(t_{j+1} | prompt, prefix_i[:j])
    joint = np.zeros((vocab,) * n)
    for i, prefix in enumerate(prefixes):
        weight = 1.0
        for j, tok in enumerate(prefix):
            weight *= cond[i, j, tok]
        joint[tuple(prefix)] = weight * cond[i, n - 1]
    joint = joint.reshape(-1)
    return joint / joint.sum()


def sample_joint(runner, prompt, sampling, drafter, num_draft_tokens, n_samples, seed=0):
    """Counts over V^n cells of the first n tokens generated by `generate`, plus pooled draft statistics.

    A round only proposes drafts that fit the budget with one target token after them, so the sequences
    are generated k − 1 tokens longer than n: round 1 then verifies k drafts, which decide tokens 2..n
    (the joint of the first n tokens of a longer generation is the same distribution)."""
    vocab = runner.config.vocab_size
    k = 0 if drafter is None else (drafter.max_draft_tokens if num_draft_tokens is None else num_draft_tokens)
    max_new = N_TOKENS + max(k - 1, 0)
    counts = np.zeros(vocab ** N_TOKENS, dtype=np.int64)
    accepted = verified = longest_round1 = 0
    for chunk in range(n_samples // CHUNK):
        out = generate(
            runner, [prompt] * CHUNK, sampling=sampling, max_new_tokens=max_new, drafter=drafter,
            num_draft_tokens=num_draft_tokens, seed=seed * 1000 + chunk, record_rounds=True,
        )
        for seq in out.sequences:
            assert len(seq.token_ids) == max_new and seq.finish_reason == "length"
        cells = Counter(int(np.ravel_multi_index(s.token_ids[:N_TOKENS], (vocab,) * N_TOKENS)) for s in out.sequences)
        if k:
            longest_round1 = max([longest_round1] + [s.rounds[0].verified for s in out.sequences])
        for cell, c in cells.items():
            counts[cell] += c
        accepted += out.stats.accepted_tokens
        verified += out.stats.verified_tokens
    return counts, dict(accepted=accepted, verified=verified, longest_round1=longest_round1)


def pooled_cells(expected_p: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cells with expected count ≥ 5 stay; the rest are pooled into one cell (itself merged into the
    smallest kept cell if its expected count is still < 5). Returns (probabilities, index groups)."""
    order = np.argsort(-expected_p)
    keep = [np.array([i]) for i in order if expected_p[i] * n >= 5]
    rest = np.array([i for i in order if expected_p[i] * n < 5], dtype=np.int64)
    if rest.size:
        if expected_p[rest].sum() * n >= 5 or not keep:
            keep.append(rest)
        else:
            keep[-1] = np.concatenate([keep[-1], rest])
    probs = np.array([expected_p[g].sum() for g in keep])
    return probs, keep


def chi_square(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    n = int(counts.sum())
    probs, groups = pooled_cells(expected_p, n)
    observed = np.array([counts[g].sum() for g in groups], dtype=np.float64)
    result = stats.chisquare(observed, probs / probs.sum() * observed.sum())
    return float(result.pvalue), len(groups) - 1


def _power(expected_p: np.ndarray, n: int, delta: float = DELTA, alpha: float = ALPHA) -> float:
    """Power of `chi_square` against the least detectable shift of `delta` in one (kept) cell."""
    probs, groups = pooled_cells(expected_p, n)
    df = len(groups) - 1
    if df == 0:
        return 0.0  # a single cell: nothing to test
    lam = n * delta**2 / float(np.max(probs * (1 - probs)))
    return float(stats.ncx2.sf(stats.chi2.ppf(1 - alpha, df), df, lam))


def choose_n_samples(expected_p: np.ndarray) -> int:
    """Smallest multiple of CHUNK (≤ MAX_SAMPLES) whose power against a DELTA shift is ≥ TARGET_POWER."""
    for n in range(CHUNK, MAX_SAMPLES + 1, CHUNK):
        if _power(expected_p, n) >= TARGET_POWER:
            return n
    return MAX_SAMPLES


def run_gof(runner, sampling, drafter=None, num_draft_tokens=None, prompt=PROMPT, seed=0):
    """The test procedure: exact joint, N samples (N from the power requirement), chi-square.
    Returns (p-value, details)."""
    exact = exact_joint(runner, prompt, sampling)
    n_samples = choose_n_samples(exact)
    counts, draft_stats = sample_joint(
        runner, prompt, sampling, drafter, num_draft_tokens, n_samples=n_samples, seed=seed
    )
    pvalue, df = chi_square(counts, exact)
    impossible = int(counts[exact == 0].sum())
    worst = np.argsort(-np.abs(counts / counts.sum() - exact))[:5]
    info = dict(
        n=n_samples, df=df, power=_power(exact, int(counts.sum())), impossible=impossible, **draft_stats,
        worst_cells={int(c): (round(float(counts[c] / counts.sum()), 4), round(float(exact[c]), 4)) for c in worst},
    )
    return pvalue, info


# --------------------------------------------------------------------------------------------------
# Positive tests: the real sampler (plain and speculative) matches the exact distribution
# --------------------------------------------------------------------------------------------------

SETTINGS = {
    "T1.0": SamplingParams(temperature=1.0),
    "T0.7": SamplingParams(temperature=0.7),
    "top_k3": SamplingParams(temperature=1.0, top_k=3),
    "top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
}


def _assert_matches(pvalue, info):
    assert info["power"] >= 0.8, f"test design too weak to detect a {DELTA} shift: {info}"
    assert info["impossible"] == 0, f"tokens outside the target's support were emitted: {info}"
    assert pvalue > ALPHA, f"empirical joint differs from the exact target distribution: p={pvalue:.3g} {info}"


def test_filters_are_not_vacuous(runner):
    """The top-k / top-p settings really remove mass from the target's distribution here."""
    base = exact_joint(runner, PROMPT, SETTINGS["T1.0"])
    for name in ("top_k3", "top_p0.8"):
        filtered = exact_joint(runner, PROMPT, SETTINGS[name])
        assert (filtered == 0).sum() > (base == 0).sum(), name
        assert (filtered > 0).sum() > 1, name  # not degenerate (greedy-like)
    assert np.abs(exact_joint(runner, PROMPT, SETTINGS["T0.7"]) - base).max() > 0.05


@pytest.mark.slow
def test_plain_sampler_matches_exact_distribution(runner):
    pvalue, info = run_gof(runner, SETTINGS["T1.0"], drafter=None, seed=1)
    _assert_matches(pvalue, info)


# A drafter with a strong preference for token 3 (which the target ranks third): q differs a lot from p,
# and the top-k truncation of q removes much of its mass — used both correctly and in control (b).
LIKES_3 = dict(scale=0.5, base_logits=[0, 0, 0, 2.0, 0, 0, 0, 0])


@pytest.mark.slow
@pytest.mark.parametrize("setting,num_draft,drafter_kwargs", [
    ("T1.0", 3, {}), ("T0.7", 2, {}), ("top_k3", 3, LIKES_3), ("top_p0.8", 2, {}),
])
def test_random_drafter_matches_exact_distribution(runner, setting, num_draft, drafter_kwargs):
    drafter = RandomDrafter(V, max_draft_tokens=3, **drafter_kwargs)
    pvalue, info = run_gof(runner, SETTINGS[setting], drafter=drafter, num_draft_tokens=num_draft, seed=2)
    assert info["verified"] > 0 and info["accepted"] > 0, info  # drafts were really verified and accepted
    assert info["longest_round1"] == num_draft, info  # round 1 verified all k drafts
    _assert_matches(pvalue, info)


@pytest.mark.slow
def test_ngram_drafter_matches_exact_distribution(runner):
    drafter = NgramDrafter(num_draft_tokens=3)
    pvalue, info = run_gof(runner, SETTINGS["T1.0"], drafter=drafter, num_draft_tokens=3, seed=3)
    assert info["verified"] > 0 and info["accepted"] > 0, info
    assert info["longest_round1"] >= 2, info  # multi-token drafts were verified
    _assert_matches(pvalue, info)


# --------------------------------------------------------------------------------------------------
# Negative controls: the same procedure must reject broken drafters
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_control_misreported_q_is_rejected(runner):
    """(a) drafts sampled from softmax(3z) but q reported as softmax(z)."""
    drafter = BiasedQDrafter(V, mode="sharpened", max_draft_tokens=3)
    pvalue, info = run_gof(runner, SETTINGS["T1.0"], drafter=drafter, num_draft_tokens=3, seed=2)
    assert pvalue < ALPHA, f"a drafter misreporting q went undetected: p={pvalue:.3g} {info}"


@pytest.mark.slow
def test_control_topk_not_applied_to_reported_q_is_rejected(runner):
    """(b) drafts sampled with the request's top-k, q reported without it (transformers#47932)."""
    drafter = BiasedQDrafter(V, mode="topk_unreported", max_draft_tokens=3, **LIKES_3)
    pvalue, info = run_gof(runner, SETTINGS["top_k3"], drafter=drafter, num_draft_tokens=3, seed=2)
    assert pvalue < ALPHA, f"top-k missing from the reported q went undetected: p={pvalue:.3g} {info}"


# --------------------------------------------------------------------------------------------------
# verify(): single-step output distribution, real rule vs. a rule that skips the residual
# --------------------------------------------------------------------------------------------------

B_VERIFY = 20_000


def verify_without_residual(target_probs, draft_tokens, verify_lens, draft_probs, generator):
    """WRONG rule (control): accept with min(1, p/q), but on rejection sample from p, not norm(max(0, p−q))."""
    p_d = target_probs[:, 0].gather(-1, draft_tokens[:, :1]).squeeze(-1)
    q_d = draft_probs[:, 0].gather(-1, draft_tokens[:, :1]).squeeze(-1)
    accepted = torch.rand(p_d.shape, generator=generator) * q_d < p_d
    correction = torch.multinomial(target_probs[:, 0], 1, generator=generator).squeeze(-1)
    return accepted.long(), correction


def _single_step_setup(seed=0, deterministic_draft=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    target = torch.stack([p, torch.full((V,), 1.0 / V)]).expand(B_VERIFY, 2, V).contiguous()
    if deterministic_draft:
        drafts = torch.full((B_VERIFY, 1), int(torch.argmax(q)), dtype=torch.long)
        draft_probs = None
    else:
        drafts = torch.multinomial(q.expand(B_VERIFY, V), 1, replacement=True, generator=g)
        draft_probs = q.expand(B_VERIFY, 1, V).contiguous()
    return p, q, target, drafts, draft_probs, g


def _first_token_counts(num_accepted, drafts, next_tokens):
    first = torch.where(num_accepted > 0, drafts[:, 0], next_tokens)
    return np.bincount(first.numpy(), minlength=V)


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_verify_first_token_distribution_is_p(deterministic_draft):
    p, q, target, drafts, draft_probs, g = _single_step_setup(seed=5, deterministic_draft=deterministic_draft)
    result = verify(target, drafts, torch.ones(B_VERIFY, dtype=torch.long), draft_probs, g)
    assert 0 < int(result.num_accepted.sum()) < B_VERIFY  # both branches exercised
    counts = _first_token_counts(result.num_accepted, drafts, result.next_tokens)
    pvalue, _ = chi_square(counts, p.double().numpy())
    assert pvalue > ALPHA
    assert _power(p.double().numpy(), B_VERIFY) >= 0.8


def test_control_verify_without_residual_is_rejected():
    p, q, target, drafts, draft_probs, g = _single_step_setup(seed=5)
    accepted, correction = verify_without_residual(target, drafts, None, draft_probs, g)
    assert 0 < int(accepted.sum()) < B_VERIFY
    counts = _first_token_counts(accepted, drafts, correction)
    pvalue, _ = chi_square(counts, p.double().numpy())
    assert pvalue < ALPHA


# --------------------------------------------------------------------------------------------------
# logits_to_probs
# --------------------------------------------------------------------------------------------------

def _reference_probs(logits: np.ndarray, t: float, k: int, top_p: float) -> np.ndarray:
    """float64 reference: temperature → top-k → top-p (smallest prefix with mass ≥ top_p) → renormalise."""
    z = logits / t
    if 0 < k < z.size:
        z = np.where(z >= np.sort(z)[-k], z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        m = int(np.searchsorted(cum, top_p) + 1)  # first index whose cumulative mass ≥ top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:m]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def test_greedy_is_one_hot_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 13, generator=g, dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0, top_k=5, top_p=0.5))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 13).float())


@pytest.mark.parametrize("t", [0.25, 0.7, 1.0, 2.5])
def test_temperature_scaling(t):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 11, generator=g) * 3
    probs = logits_to_probs(logits, SamplingParams(temperature=t))
    torch.testing.assert_close(probs, torch.softmax(logits.double() / t, -1).float(), rtol=1e-5, atol=1e-6)
    if t != 1.0:
        assert not torch.allclose(probs, torch.softmax(logits, -1), atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_top_k_keeps_exactly_k(k):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(30, 11, generator=g) * 2  # continuous → no ties
    probs = logits_to_probs(logits, SamplingParams(temperature=0.8, top_k=k))
    assert ((probs > 0).sum(-1) == k).all()
    top = torch.topk(logits, k, dim=-1).indices
    assert torch.equal(torch.sort(top, -1).values, torch.sort(torch.nonzero(probs > 0)[:, 1].reshape(30, k), -1).values)
    expected = torch.softmax(torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top)) / 0.8, -1)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    # k ≥ V is "off"
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(1.0, top_k=11)), torch.softmax(logits, -1))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_smallest_prefix_reaching_mass(top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 9, generator=g) * 1.5
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    full = torch.softmax(logits.double(), -1).numpy()
    checked = 0
    for row in range(logits.shape[0]):
        cum = np.cumsum(np.sort(full[row])[::-1])
        if np.abs(cum - top_p).min() < 1e-4:
            continue  # too close to call in float32
        checked += 1
        m = int(np.searchsorted(cum, top_p) + 1)
        kept = probs[row].numpy() > 0
        assert kept.sum() == m
        assert set(np.flatnonzero(kept)) == set(np.argsort(-full[row])[:m])
        assert cum[m - 1] >= top_p and (m == 1 or cum[m - 2] < top_p)  # smallest prefix reaching top_p
        np.testing.assert_allclose(probs[row].numpy(), _reference_probs(logits[row].double().numpy(), 1.0, 0, top_p), rtol=1e-5, atol=1e-6)
    assert checked > 150


def test_combined_filters_and_per_row_settings():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 10, generator=g) * 2
    settings = [SamplingParams(0.5, 3, 0.9), SamplingParams(1.3, 0, 0.6), SamplingParams(0.0),
                SamplingParams(1.0, 4, 1.0), SamplingParams(0.5, 3, 0.9), SamplingParams(2.0, 7, 0.75)]
    probs = logits_to_probs(logits, settings)
    for row, s in enumerate(settings):
        torch.testing.assert_close(probs[row], logits_to_probs(logits[row], s))
        if not s.greedy:
            ref = _reference_probs(logits[row].double().numpy(), s.temperature, s.top_k, s.top_p)
            np.testing.assert_allclose(probs[row].numpy(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs[row].sum(), torch.tensor(1.0))
    with pytest.raises(ValueError):
        logits_to_probs(logits, settings[:3])


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="1"),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=2.5), dict(top_k=True),
])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_valid_sampling_params_edges():
    SamplingParams(temperature=0)
    SamplingParams(temperature=1e-3, top_k=0, top_p=1.0)
    SamplingParams(top_p=1e-9)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


# --------------------------------------------------------------------------------------------------
# verify(): batching
# --------------------------------------------------------------------------------------------------

def test_verify_ragged_lengths_including_zero():
    """lens [0, 1, 3, 2, 0] in one batch, p == q on the verified slots: everything verified is accepted and
    the bonus comes from slot ℓ_b (made one-hot on a marker token); padding slots are ignored."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([0, 1, 3, 2, 0])
    batch, width = len(lens), 3
    dist = torch.softmax(torch.randn(batch, width + 1, V, generator=g), -1)
    drafts = torch.multinomial(dist[:, :width].reshape(-1, V), 1, generator=g).reshape(batch, width)
    target = dist.clone()
    markers = torch.tensor([7, 6, 5, 4, 3])
    for b in range(batch):
        target[b, lens[b]] = torch.nn.functional.one_hot(markers[b], V).float()
        for slot in range(lens[b] + 1, width + 1):  # garbage beyond ℓ_b: rejects any draft if it were read
            target[b, slot] = torch.nn.functional.one_hot((drafts[b, min(slot, width - 1)] + 1) % V, V).float()
    for seed in range(20):
        result = verify(target, drafts, lens, dist[:, :width].contiguous(), torch.Generator().manual_seed(seed))
        assert torch.equal(result.num_accepted, lens)
        assert torch.equal(result.next_tokens, markers)
        emitted = result.emitted(drafts)
        assert [len(e) for e in emitted] == (lens + 1).tolist()
        assert emitted[2] == drafts[2].tolist() + [5]


def test_verify_identical_p_and_q_accepts_everything():
    g = torch.Generator().manual_seed(1)
    batch, width = 4096, 4
    dist = torch.softmax(torch.randn(batch, width + 1, V, generator=g) * 2, -1)
    drafts = torch.multinomial(dist[:, :width].reshape(-1, V), 1, generator=g).reshape(batch, width)
    lens = torch.randint(0, width + 1, (batch,), generator=g)
    result = verify(dist, drafts, lens, dist[:, :width].contiguous(), g)
    assert torch.equal(result.num_accepted, lens)


def test_verify_disjoint_supports_accepts_nothing_and_corrects_from_p():
    g = torch.Generator().manual_seed(2)
    batch, width = B_VERIFY, 3
    p = torch.zeros(V)
    p[:4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.zeros(V)
    q[4:] = 0.25
    target = p.expand(batch, width + 1, V).contiguous()
    draft_probs = q.expand(batch, width, V).contiguous()
    drafts = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=g).reshape(batch, width)
    lens = torch.randint(1, width + 1, (batch,), generator=g)
    result = verify(target, drafts, lens, draft_probs, g)
    assert int(result.num_accepted.max()) == 0
    counts = np.bincount(result.next_tokens.numpy(), minlength=V)
    assert counts[4:].sum() == 0
    pvalue, _ = chi_square(counts, p.double().numpy())
    assert pvalue > ALPHA
    # deterministic drafts (q = None, one-hot) outside p's support: same
    result = verify(target, drafts, lens, None, g)
    assert int(result.num_accepted.max()) == 0 and int(result.next_tokens.max()) < 4


def test_verify_greedy_is_argmax_matching():
    g = torch.Generator().manual_seed(3)
    batch, width = 512, 5
    logits = torch.randn(batch, width + 1, V, generator=g)
    target = logits_to_probs(logits, SamplingParams(temperature=0.0))
    argmax = logits.argmax(-1)
    # drafts equal the argmax up to a random position, then wrong
    cut = torch.randint(0, width + 1, (batch,), generator=g)
    drafts = argmax[:, :width].clone()
    for b in range(batch):
        if cut[b] < width:
            drafts[b, cut[b]] = (drafts[b, cut[b]] + 1) % V
    lens = torch.full((batch,), width)
    for probs in (None, torch.nn.functional.one_hot(drafts, V).float()):
        result = verify(target, drafts, lens, probs, g)
        assert torch.equal(result.num_accepted, cut)
        assert torch.equal(result.next_tokens, argmax.gather(1, cut.unsqueeze(1)).squeeze(1))


def test_verify_without_drafts_is_plain_sampling():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    result = verify(p.expand(B_VERIFY, 1, V).contiguous(), torch.zeros(B_VERIFY, 0, dtype=torch.long),
                    torch.zeros(B_VERIFY, dtype=torch.long), None, g)
    assert int(result.num_accepted.max()) == 0
    pvalue, _ = chi_square(np.bincount(result.next_tokens.numpy(), minlength=V), p.double().numpy())
    assert pvalue > ALPHA
