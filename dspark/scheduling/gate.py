"""Draft gate: whether the next step should run the drafter at all (SPEC §5.5: "verifying 0 draft tokens
must really cost nothing extra"; peers-notes §3 lesson 12: a drafter that runs while nothing is verified
makes speculative serving slower than plain decoding under load).

Algorithm 1 (SPEC §5.2) chooses how many drafts to verify once the drafter has run, so its cost draft(R)
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
    Θ_plain(R) = R · SPS(R) without the drafter.

It drafts iff Θ_spec(R) > (1 + margin) · Θ_plain(R), while it has seen fewer than `min_rounds` rounds, and
on every `probe_every`-th step it has kept closed (so the estimate follows drift; 0 = never probe).
The maximum runs over the whole admission path without an early stop: it contains every fixed length's
expected throughput (ℓ = n for all R requests), so when any fixed length beats plain decoding on average,
the gate drafts. Because the decision uses only outcomes of earlier rounds, it never depends on tokens of
the current round and cannot bias the output (it is lossless the way the asynchronous budget of SPEC §5.4
is). Between probes a closed gate sees no new rounds, so its decision changes with the load R only.
"""

from __future__ import annotations

import numpy as np

from dspark.scheduling.sps import SPSProfile


class DraftGate:
    """profile: the SPS table (with the drafter's cost; without one, drafting is free and the gate always
    drafts); window: rounds kept; margin: required relative gain over plain decoding; min_rounds: rounds to
    observe before the gate may close."""

    def __init__(self, profile: SPSProfile, *, window: int = 512, margin: float = 0.0, min_rounds: int = 256,
                 min_verified: int = 64, probe_every: int = 64):
        if not isinstance(profile, SPSProfile):
            raise TypeError(f"expected an SPSProfile, got {type(profile).__name__}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer ≥ 1, got {window!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be ≥ 0, got {margin!r}")
        self.profile = profile
        self.margin = float(margin)
        self.min_rounds = int(min_rounds)
        self.min_verified = int(min_verified)
        self.probe_every = int(probe_every)
        self._closed_steps = 0
        self.drafted_steps = 0
        self.skipped_steps = 0
        self.window = window
        # Ring buffer [window, 4, K] of the last rounds: a_k, a_k where verified, survived, verified.
        self._buffer: np.ndarray | None = None
        self._filled = 0
        self._next = 0

    def observe(self, confidences, full, verified=None, accepted=None) -> None:
        """One step's rounds: confidences [R, K] (conditional c_k, calibrated), full [R] (slots each round could
        verify), and, once verification ran, verified [R] (ℓ) and accepted [R] (drafts accepted). Rows with
        NaN or out-of-range values are skipped, as the schedulers fall back on them."""
        c = np.asarray(confidences, dtype=np.float64)
        full = np.asarray(full, dtype=np.int64).reshape(-1)
        if c.ndim != 2 or c.shape[0] != full.size:
            return
        count, width = c.shape
        ell = np.zeros(count, np.int64) if verified is None else np.asarray(verified, np.int64).reshape(-1)
        acc = np.zeros(count, np.int64) if accepted is None else np.asarray(accepted, np.int64).reshape(-1)
        slots = np.arange(width)[None, :]
        mask = slots < full[:, None]
        ok = ~(mask & ~((c >= 0) & (c <= 1))).any(axis=1)
        a = np.where(mask, np.cumprod(np.where(mask, c, 1.0), axis=1), 0.0)
        checked = slots < np.minimum(ell, full)[:, None]
        survived = checked & (slots < acc[:, None])
        if self._buffer is None or self._buffer.shape[2] != width:
            self._buffer = np.zeros((self.window, 4, width))
            self._filled = self._next = 0
        rows = np.stack([a, np.where(checked, a, 0.0), survived, checked], axis=1)[ok][-self.window:]
        slots_in_ring = (self._next + np.arange(len(rows))) % self.window
        self._buffer[slots_in_ring] = rows
        self._next = (self._next + len(rows)) % self.window
        self._filled = min(self.window, self._filled + len(rows))

    @property
    def rounds(self) -> int:
        return self._filled

    def _window(self) -> np.ndarray:
        return self._buffer[: self._filled] if self._filled < self.window else self._buffer

    def correction(self) -> np.ndarray | None:
        """ρ [K]: observed / predicted survival on the window's verified slots (1 where too few)."""
        if not self._filled:
            return None
        _, predicted_checked, survived, checked = self._window().sum(axis=0)
        return np.where((checked >= self.min_verified) & (predicted_checked > 0),
                        survived / np.maximum(predicted_checked, 1e-12), 1.0)

    def survivals(self) -> np.ndarray | None:
        """[W, K] corrected prefix survivals of the window's rounds, or None before any round."""
        if not self._filled:
            return None
        return np.clip(self._window()[:, 0] * self.correction()[None, :], 0.0, 1.0)

    def gain(self, requests: int) -> float:
        """Θ_spec(R) / Θ_plain(R) with the current estimate (1.0 before any round)."""
        a = self.survivals()
        if a is None or not self.profile.has_draft_cost:
            return 1.0 if a is None else float("inf")
        rows, width = a.shape
        weight = requests / rows
        values = np.sort(a.reshape(-1))[::-1]
        sps = self.profile.sps_table(requests, requests * (1 + width), include_draft=True)
        tokens = requests + weight * np.arange(values.size + 1)
        tau = requests + weight * np.concatenate(([0.0], np.cumsum(values)))
        spec = float((tau * np.interp(tokens, np.arange(sps.size), sps)).max())
        plain = requests * float(self.profile.sps(requests, requests)[()])
        return spec / plain

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
        if requests < 1 or self.rounds < self.min_rounds or not self.profile.has_draft_cost:
            return True
        if self.gain(requests) > 1.0 + self.margin:
            self._closed_steps = 0
            return True
        self._closed_steps += 1
        return bool(self.probe_every) and self._closed_steps % self.probe_every == 0

    def report(self) -> dict:
        """Counters and the current estimate (for --json output and metrics)."""
        rho = self.correction()
        return {"drafted_steps": self.drafted_steps, "skipped_steps": self.skipped_steps,
                "rounds_observed": self.rounds, "correction": None if rho is None else rho.tolist()}

    def __repr__(self) -> str:
        return f"DraftGate(rounds={self.rounds}, margin={self.margin})"
