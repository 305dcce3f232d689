"""Draft gate: whether the next step should run the drafter at all (docs/design.md §5.5: "verifying 0 draft tokens
must really cost nothing extra"; docs/design.md §5.5: a drafter that runs while nothing is verified
makes speculative serving slower than plain decoding under load).

Algorithm 1 (docs/design.md §5.2) chooses how many drafts to verify once the drafter has run, so its cost draft(R)
is already paid when it picks ℓ = 0 everywhere: under heavy load, with a weak drafter, every step is then
slower than a plain decoding step. The gate decides *before* drafting, from past rounds only:

    v    = the predicted prefix survivals a_{w,k} = Π_{i≤k} c_i of the last W = `window` observed rounds
           (slots a round could not verify count as 0), each times ρ_k = (slots k that survived) / (their
           predicted survival) summed over the window's verified slots k (1 until `min_verified` of them):
           the outcomes correct a biased confidence head (one that predicts 0.43 where 0.35 survive would
           otherwise keep the drafter running where it does not pay);
    Θ_spec(R) = max over m of (R + (R/W)·Σ_{i<m} v_(i)) · SPS(R + (R/W)·m), SPS including draft(R), with v
           sorted descending: Algorithm 1's admission path for R requests drawn from the window's rounds
           (each candidate stands for R/W slots; SPS interpolated between whole token counts);
    Θ_plain(R) = R · SPS(R) without the drafter;
    each step's time in both also carries the engine's measured time outside the model calls (`record_step`;
    0 where nobody reports it, as in the simulator).

Cost per step (the serving loop calls it every step): once `min_rounds` rounds are in, at most `sample`
rounds of a step enter the window (evenly spaced rows, the offset rotating from step to step); they wait in a
pending list, and the window and the estimate are updated once `refresh` of them have come. Estimates are
cached per load R (above 64 requests R is rounded down to 32 steps per doubling, within 3 %). The window's
survivals are kept as a histogram per slot (`bins` equal-width bins of a, each with its count and the sum of
its values, updated as rounds enter and leave the window), so an estimate sorts K·bins bin means instead of
W·K values; the path is read at bin boundaries.

It drafts while it has seen fewer than `min_rounds` rounds; after that, an open gate stays open while
Θ_spec(R) > (1 + margin − hysteresis) · Θ_plain(R) and a closed gate opens when Θ_spec(R) > (1 + margin) ·
Θ_plain(R); a closed gate drafts on every n-th step (a probe, so the estimate follows drift), n = the
larger of `probe_every` and the interval that keeps the probes' expected cost under `probe_budget` of the
time: a probe step delivers g · r plain steps' tokens, r = t_spec / t_plain at the estimate's best path point
and g = Θ_spec / Θ_plain, and lasts s = r plain steps, or the measured ratio of probe to undrafted step
times when the engine reports them through `record_step` and it is larger (a probe's drafter first catches
up on every position it skipped); it loses s − g · r, so n − 1 ≥ (s − g · r) / budget − s. On a CPU,
where a drafted step at 256 requests is 17 times slower than a plain one, probing every 64th step cost 23 %
of the simulated throughput; the budget bounds it by 1 %. `probe_every = 0` never probes. Between probes a closed gate sees no new rounds, so its decision changes with the load R only, and
a gate closed on noise stays closed for a long time. Hence the large window and the hysteresis: replaying
the built-in drafter's traces against the H100 profile at 128 requests, where drafting gains 1.4 %, a
512-round window's estimate fell below 1 in a quarter of the steps and the gate spent 92 % of them closed
(−0.7 % against the best fixed length); with 4096 rounds and a 2 % hysteresis it stays open, and at 256
requests (drafting loses 4.8 %) it still closes after its first `min_rounds`.

The maximum runs over the whole admission path without an early stop: it contains every fixed length's
expected throughput (ℓ = n for all R requests), so when any fixed length beats plain decoding on average,
the gate drafts. Because the decision uses only outcomes of earlier rounds, it never depends on tokens of the
current round and cannot bias the output (it is lossless the way the asynchronous budget of docs/design.md §5.4 is).
"""

from __future__ import annotations

import math

import numpy as np

from dspark.scheduling.sps import SPSProfile


class DraftGate:
    """profile: the SPS table (with the drafter's cost; without one, drafting is free and the gate always
    drafts); window: rounds kept; margin: required relative gain over plain decoding; hysteresis: how far below
    that an open gate may go before it closes; min_rounds: rounds to observe before the gate may close;
    min_verified: verified slots per position before the outcome correction applies; probe_every: a closed
    gate drafts at most every n-th step (0: never); probe_budget: expected share of time its probes may cost;
    bins: histogram bins of the survivals; sample: rounds of one step that enter the window at most; refresh:
    new rounds after which the window and the estimate are updated."""

    def __init__(self, profile: SPSProfile, *, window: int = 4096, margin: float = 0.0, hysteresis: float = 0.02,
                 min_rounds: int = 256, min_verified: int = 64, probe_every: int = 64, probe_budget: float = 0.01,
                 bins: int = 256, sample: int = 64, refresh: int = 256):
        if not isinstance(profile, SPSProfile):
            raise TypeError(f"expected an SPSProfile, got {type(profile).__name__}")
        for name, value in (("window", window), ("bins", bins), ("sample", sample), ("refresh", refresh)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be ≥ 0, got {margin!r}")
        if not 0 < probe_budget <= 1:
            raise ValueError(f"probe_budget must lie in (0, 1], got {probe_budget!r}")
        if not 0 <= hysteresis <= 1:
            raise ValueError(f"hysteresis must lie in [0, 1], got {hysteresis!r}")
        self.profile = profile
        self.margin = float(margin)
        self.hysteresis = float(hysteresis)
        self.min_rounds = int(min_rounds)
        self.min_verified = int(min_verified)
        self.probe_every = int(probe_every)
        self.probe_budget = float(probe_budget)
        self.bins = bins
        self.window = window
        self.sample = sample
        self.refresh = refresh
        self._offset = 0
        # load R → (gain, step ratio, the overhead it used); cleared on new rounds, redone when the overhead moves 5 %
        self._gains: dict[int, tuple[float, float, float]] = {}
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_rows = 0
        self._tables: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
        self._open = True
        self._closed_steps = 0
        self._step_kind: str | None = None  # "probe" / "closed" for the step decided last, until its time comes
        self._closed_s: float | None = None  # moving averages of measured step times (record_step)
        self._probe_s: float | None = None
        self._overhead_s = 0.0  # moving average of a step's time outside the model calls (record_step)
        self.drafted_steps = 0
        self.skipped_steps = 0
        # Ring buffer [window, 4, K] of the last rounds: a_k, a_k where verified, survived, verified; its column
        # totals [4, K]; per slot k a histogram of a_k: counts [K, bins] and sums of a_k [K, bins].
        self._buffer: np.ndarray | None = None
        self._filled = 0
        self._next = 0

    def _reset_window(self, width: int) -> None:
        self._buffer = np.zeros((self.window, 4, width))
        self._totals = np.zeros((4, width))
        self._counts = np.zeros((width, self.bins), dtype=np.int64)
        self._sums = np.zeros((width, self.bins))
        self._filled = self._next = 0

    def _histogram(self, rows: np.ndarray, sign: int) -> None:
        """Add (sign = 1) or remove (−1) rows [n, 4, K] from the totals and histograms."""
        if not rows.shape[0]:
            return
        width = rows.shape[2]
        a = rows[:, 0, :]
        cells = np.minimum((a * self.bins).astype(np.int64), self.bins - 1) + np.arange(width)[None, :] * self.bins
        size = width * self.bins
        self._counts += sign * np.bincount(cells.reshape(-1), minlength=size).reshape(width, self.bins)
        self._sums += sign * np.bincount(cells.reshape(-1), weights=a.reshape(-1), minlength=size).reshape(width, self.bins)
        self._totals += sign * rows.sum(axis=0)

    def observe(self, confidences, full, verified=None, accepted=None) -> None:
        """One step's rounds: confidences [R, K] (conditional c_k, calibrated), full [R] (slots each round could
        verify), and, once verification ran, verified [R] (ℓ) and accepted [R] (drafts accepted). Rows with
        NaN or out-of-range values are skipped, as the schedulers fall back on them. The rounds wait in a
        pending list until `refresh` of them have come (during the first `min_rounds`, every step)."""
        c = np.asarray(confidences, dtype=np.float64)
        full = np.asarray(full, dtype=np.int64).reshape(-1)
        if c.ndim != 2 or c.shape[0] != full.size:
            return
        count, width = c.shape
        ell = np.zeros(count, np.int64) if verified is None else np.asarray(verified, np.int64).reshape(-1)
        acc = np.zeros(count, np.int64) if accepted is None else np.asarray(accepted, np.int64).reshape(-1)
        rows = np.arange(count)
        if count > self.sample and self._filled >= self.min_rounds:  # all rows while warming up
            rows = (self._offset + np.arange(self.sample) * count // self.sample) % count
            self._offset += 1
        if self._pending and self._pending[0][0].shape[1] != width:
            self._flush()
        self._pending.append((c[rows], full[rows], ell[rows], acc[rows]))  # copies: the caller may reuse its buffers
        self._pending_rows += rows.size
        if self._filled < self.min_rounds or self._pending_rows >= self.refresh:
            self._flush()

    def _flush(self) -> None:
        """Move the pending rounds into the window (and drop the cached estimates)."""
        if not self._pending:
            return
        c, full, ell, acc = (np.concatenate(parts) for parts in zip(*self._pending))
        self._pending, self._pending_rows = [], 0
        self._gains.clear()
        width = c.shape[1]
        slots = np.arange(width)[None, :]
        mask = slots < full[:, None]
        ok = ~(mask & ~((c >= 0) & (c <= 1))).any(axis=1)
        a = np.where(mask, np.cumprod(np.where(mask, c, 1.0), axis=1), 0.0)
        checked = slots < np.minimum(ell, full)[:, None]
        survived = checked & (slots < acc[:, None])
        if self._buffer is None or self._buffer.shape[2] != width:
            self._reset_window(width)
        rows = np.stack([a, np.where(checked, a, 0.0), survived, checked], axis=1)[ok][-self.window:]
        slots_in_ring = (self._next + np.arange(len(rows))) % self.window
        if self._filled == self.window or self._filled + len(rows) > self.window:
            evicted = slots_in_ring[slots_in_ring < self._filled] if self._filled < self.window else slots_in_ring
            self._histogram(self._buffer[evicted], -1)
        self._buffer[slots_in_ring] = rows
        self._histogram(rows, 1)
        self._next = (self._next + len(rows)) % self.window
        self._filled = min(self.window, self._filled + len(rows))

    @property
    def rounds(self) -> int:
        """Rounds in the window (pending ones moved in first)."""
        self._flush()
        return self._filled

    def correction(self) -> np.ndarray | None:
        """ρ [K]: observed / predicted survival on the window's verified slots (1 where too few)."""
        return self._correction() if self.rounds else None

    def _correction(self) -> np.ndarray:
        _, predicted_checked, survived, checked = self._totals
        return np.where((checked >= self.min_verified) & (predicted_checked > 0),
                        survived / np.maximum(predicted_checked, 1e-12), 1.0)

    def gain(self, requests: int) -> float:
        """Θ_spec(R) / Θ_plain(R) with the current estimate (1.0 before any round)."""
        return self._estimate(requests)[0]

    def _estimate(self, requests: int) -> tuple[float, float]:
        """(gain, r = step time of drafting / of plain decoding at the best path point), cached per load."""
        if not self._filled:
            return 1.0, 1.0
        if not self.profile.has_draft_cost:
            return float("inf"), 1.0
        load = _load_bucket(requests)
        cached = self._gains.get(load)
        if cached is None or abs(self._overhead_s - cached[2]) > 0.05 * cached[2]:
            cached = self._gains[load] = (*self._compute(load), self._overhead_s)
        return cached[0], cached[1]

    def _compute(self, requests: int) -> tuple[float, float]:
        width = self._counts.shape[0]
        counts = self._counts.reshape(-1)
        means = np.maximum(self._sums, 0.0) / np.maximum(self._counts, 1)
        values = np.clip(means * self._correction()[:, None], 0.0, 1.0).reshape(-1)
        order = np.argsort(-values, kind="stable")
        weight = requests / self._filled
        tokens = requests + weight * np.concatenate(([0], np.cumsum(counts[order])))
        tau = requests + weight * np.concatenate(([0.0], np.cumsum(values[order] * counts[order])))
        sps, plain = self._table(requests, width)
        rate = np.interp(tokens, np.arange(sps.size), sps)  # steps/s with the drafter
        if self._overhead_s:  # the engine's measured time outside the model calls, paid by every step
            rate = 1.0 / (1.0 / rate + self._overhead_s)
            plain = requests / (requests / plain + self._overhead_s)
        best = int((tau * rate).argmax())
        return float(tau[best] * rate[best]) / plain, plain / requests / float(rate[best])

    def _probe_interval(self, requests: int) -> int:
        gain, ratio = self._estimate(requests)
        if not gain < 1.0:
            return self.probe_every
        lasts = ratio  # plain steps a probe lasts; it delivers gain · ratio plain steps' tokens
        if self._probe_s is not None and self._closed_s:
            lasts = max(ratio, self._probe_s / self._closed_s)
        lost = lasts - gain * ratio
        needed = 1 + math.ceil(max(lost / self.probe_budget - lasts, 0.0))
        return max(self.probe_every, needed)

    def _table(self, requests: int, width: int) -> tuple[np.ndarray, float]:
        """(SPS with the drafter's cost for B = 0..R(1+K), Θ_plain(R)), cached per (R, K)."""
        key = (requests, width)
        entry = self._tables.get(key)
        if entry is None:
            if len(self._tables) >= 64:
                self._tables.pop(next(iter(self._tables)))
            entry = self._tables[key] = (
                self.profile.sps_table(requests, requests * (1 + width), include_draft=True),
                requests * float(self.profile.sps(requests, requests)[()]))
        return entry

    def should_draft(self, requests: int) -> bool:
        """Decision for the next step of `requests` active requests (counted in drafted_steps /
        skipped_steps)."""
        decision = self._decide(requests)
        if decision:
            self.drafted_steps += 1
        else:
            self.skipped_steps += 1
        return decision

    def _decide(self, requests: int) -> bool:
        self._step_kind = None
        if requests < 1 or self._filled + self._pending_rows < self.min_rounds or not self.profile.has_draft_cost:
            return True
        threshold = 1.0 + self.margin - (self.hysteresis if self._open else 0.0)
        if self.gain(requests) > threshold:
            self._open, self._closed_steps = True, 0
            return True
        self._open = False
        self._closed_steps += 1
        if self.probe_every and self._closed_steps >= self._probe_interval(requests):
            self._closed_steps, self._step_kind = 0, "probe"
            return True
        self._step_kind = "closed"
        return False

    def record_step(self, seconds: float, model_seconds: float | None = None) -> None:
        """Wall time of the step the last decision was for, and the part of it spent in the target's and the
        drafter's forwards (the engine calls it once per step).

        A closed gate budgets its probes by their measured cost against the undrafted steps around it: a
        probe's drafter first catches up on every feature it skipped, which the profile's steady drafted
        step does not include (2-core CPU, built-in model, 8 requests at T = 1: a probe step took 2.9
        undrafted steps' time, the profile's estimate 2.5). The time outside the model calls (scheduling,
        sampling, bookkeeping) is added to every step of both sides of the comparison: a profile of bare
        forwards makes the drafter's share of a step look larger than it is (at 2 requests and T = 1 the
        gate closed where drafting gained 16 %)."""
        kind, self._step_kind = self._step_kind, None
        if model_seconds is not None and seconds > 0 and 0 <= model_seconds <= seconds:
            overhead = seconds - model_seconds
            self._overhead_s = overhead if not self._overhead_s else 0.9 * self._overhead_s + 0.1 * overhead
        if kind is None or not seconds > 0:
            return
        if kind == "closed":
            self._closed_s = seconds if self._closed_s is None else 0.9 * self._closed_s + 0.1 * seconds
        else:
            self._probe_s = seconds if self._probe_s is None else 0.5 * self._probe_s + 0.5 * seconds

    def report(self) -> dict:
        """Counters and the current estimate (for --json output and metrics)."""
        rho = self.correction()
        return {"drafted_steps": self.drafted_steps, "skipped_steps": self.skipped_steps,
                "rounds_observed": self.rounds, "correction": None if rho is None else rho.tolist()}

    def __repr__(self) -> str:
        return f"DraftGate(rounds={self.rounds}, margin={self.margin}, hysteresis={self.hysteresis})"


def _load_bucket(requests: int) -> int:
    """The load the estimate is computed at: R itself up to 64, above that R rounded down to 32 steps per
    doubling (within 3 %), so a load that drifts by a request or two reuses the cached estimate."""
    if requests <= 64:
        return requests
    step = 1 << (requests.bit_length() - 6)
    return requests - requests % step
