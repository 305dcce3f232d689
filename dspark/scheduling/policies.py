"""Verification-length policies: how many of each request's drafts to verify this round (docs/design.md §5).

Every policy (a `VerificationPolicy`) is called once per round for all R active requests:

    policy(confidences [R, K] | None, lengths [R], limits [R], request_ids [R] | None) -> ℓ [R]

confidences (torch, any float dtype/device) are the drafter's per-position conditional survivals
c_k = P(slot k accepted | slots < k accepted) (docs/design.md §2.4); prefix survival a_k = Π_{i≤k} c_i. Slot k
of request r is a candidate only if k < full_r = min(lengths_r, limits_r); ℓ_r ∈ [0, full_r] (a CPU
LongTensor). The work is vectorised over requests (numpy on the CPU, one int64 sort per call).

Losslessness (docs/design.md §5.3): whether slot k is verified may depend on c_1..c_k (which the drafter computed
before sampling x_k) and on other requests, never on c_{k+1..} (which depend on x_k). Every policy here
respects that; CausalGreedy through its early stop, AsyncTopK because its budget K comes from past calls.

Bad input never raises (this runs inside the serving loop): a request whose confidences are NaN/inf or
outside [0, 1] on its candidate slots (c = 0 is legal: Algorithm 1 never admits a_k = 0; c = 1 is what a
saturated float32 sigmoid gives) is verified in full (ℓ_r = full_r), and `confidences=None` (or of the
wrong shape) makes a confidence policy verify everything; each case logs one warning per instance.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from typing import Sequence

import numpy as np
import torch

from dspark.scheduling.sps import SPSProfile

log = logging.getLogger("dspark.scheduling")


def _int_array(values, count: int | None = None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        out = values.cpu().numpy().reshape(-1)
    else:
        out = np.asarray(values).reshape(-1)
    out = out.astype(np.int64, copy=False)
    if count is not None and out.size != count:
        raise ValueError(f"expected {count} values, got {out.size}")
    return out


class VerificationPolicy(ABC):
    """Base class: input conversion, the bad-input fallback and the candidate mask; subclasses implement
    `_lengths`. Instances may keep per-request state (AsyncTopK); `release` forgets a finished request."""

    name = "policy"
    needs_confidences = True

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s scheduler: %s", self.name, message)

    def __call__(
        self,
        confidences: torch.Tensor | None,
        lengths: torch.Tensor | Sequence[int],
        limits: torch.Tensor | Sequence[int] | None = None,
        request_ids: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """confidences [R, K] or None; lengths, limits, request_ids [R] → ℓ [R] (torch.long, CPU)."""
        full = _int_array(lengths)
        count = full.size
        if limits is not None:
            full = np.minimum(full, _int_array(limits, count))
        full = np.maximum(full, 0)
        ids = None if request_ids is None else _int_array(request_ids, count)
        if not self.needs_confidences:
            return torch.from_numpy(self._lengths(None, full, None, ids, 0))
        width = int(full.max()) if count else 0
        if width == 0:
            return torch.zeros(count, dtype=torch.long)
        if confidences is None:
            self._warn_once("none", "the drafter gave no confidences; verifying every draft")
            return torch.from_numpy(full)
        if not isinstance(confidences, torch.Tensor) or confidences.dim() != 2 or confidences.shape[0] != count:
            shape = tuple(getattr(confidences, "shape", ()))
            self._warn_once("shape", f"confidences of shape {shape} for {count} requests; verifying every draft")
            return torch.from_numpy(full)
        c = confidences.detach().cpu().numpy()[:, :width].astype(np.float64)
        if c.shape[1] < width:  # slots without a confidence are bad input
            c = np.concatenate([c, np.full((count, width - c.shape[1]), np.nan)], 1)
        if int(full.min()) < width:  # zero the slots that are not candidates
            c = np.where(np.arange(width) < full[:, None], c, 0.0)
        bad = None
        if not (c.min() >= 0 and c.max() <= 1):  # NaN fails both comparisons
            bad = ~((c >= 0) & (c <= 1)).all(1)
            self._warn_once("bad", f"{int(bad.sum())} request(s) with confidences NaN or outside [0, 1]; "
                            "verifying all their drafts")
            c = np.where(bad[:, None], 0.0, c)
        lens = self._lengths(c, full, bad, ids, width)
        return torch.from_numpy(lens if bad is None else np.where(bad, full, lens))

    @abstractmethod
    def _lengths(self, c: np.ndarray | None, full: np.ndarray, bad: np.ndarray | None,
                 ids: np.ndarray | None, width: int) -> np.ndarray:
        """c [R, W] float64 in [0, 1], 0 outside candidate slots and on bad rows; full [R] int64; bad [R]
        bool or None (no bad row); ids [R] int64 or None → ℓ [R] int64, ≤ full."""

    def release(self, request_id: int) -> None:
        """Forget a finished request (no-op for stateless policies)."""

    def alone(self) -> "VerificationPolicy":
        """The policy that plans a request as if it were alone in the batch, from its own confidences only
        and without state (the engine's seeded sampled requests, whose tokens must not depend on the rest of
        the batch). Row-independent stateless policies are their own; hardware-aware ones give Algorithm 1
        at R = 1."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# -------------------------------------------------------------------------------------------------
# Static policies
# -------------------------------------------------------------------------------------------------

class VerifyAll(VerificationPolicy):
    """ℓ = min(proposed, limit): the behaviour without a scheduler."""

    name = "verify-all"
    needs_confidences = False

    def _lengths(self, c, full, bad, ids, width):
        return full.copy()


class FixedLength(VerificationPolicy):
    """ℓ = min(n, proposed, limit)."""

    name = "fixed"
    needs_confidences = False

    def __init__(self, n: int):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"FixedLength needs an integer n ≥ 0, got {n!r}")
        self.n = n

    def _lengths(self, c, full, bad, ids, width):
        return np.minimum(full, self.n)

    def __repr__(self) -> str:
        return f"FixedLength({self.n})"


def _check_threshold(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {t!r}")
    return float(t)


class ConfidenceThreshold(VerificationPolicy):
    """Longest prefix whose every conditional confidence c_k ≥ t (static threshold, paper §3.2.2)."""

    name = "confidence-threshold"

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = _check_threshold(threshold)

    def _lengths(self, c, full, bad, ids, width):
        return np.minimum(np.cumprod(c >= self.threshold, axis=1).sum(1), full)

    def __repr__(self) -> str:
        return f"ConfidenceThreshold({self.threshold})"


class SurvivalThreshold(VerificationPolicy):
    """Longest prefix whose prefix survival a_k = Π_{i≤k} c_i ≥ t (and > 0)."""

    name = "survival-threshold"

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = _check_threshold(threshold)

    def _lengths(self, c, full, bad, ids, width):
        a = np.cumprod(c, axis=1)
        return np.cumprod((a >= self.threshold) & (a > 0), axis=1).sum(1)

    def __repr__(self) -> str:
        return f"SurvivalThreshold({self.threshold})"


# -------------------------------------------------------------------------------------------------
# Hardware-aware policies (docs/design.md §5.1–5.4)
# -------------------------------------------------------------------------------------------------

_DESCENDING = np.int64(0x7FFF_FFFF_FFFF_FFFF)  # flips the order of non-negative float64 bit patterns
_POSITIONS: dict[int, np.ndarray] = {}


def sorted_candidates(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a [R, W] (≥ 0) → (values, flat indices r·W + j), by a descending; ties by flat index, so a request's
    slots keep their prefix order (a_{r,j} = a_{r,j+1} when c_{j+1} = 1).

    One int64 sort of packed keys: the bit pattern of a non-negative float64 is monotone in its value, so
    key = (bits XOR 2^63−1) with the low ⌈log2 RW⌉ bits replaced by the flat index. Values closer than
    2^−(52−⌈log2 RW⌉) relative (5·10^−13 at 256 × 7) count as ties. The order of two candidates depends
    only on their own values and positions, as a comparison sort's would.
    """
    flat = np.ascontiguousarray(a, dtype=np.float64).reshape(-1) + 0.0  # + 0.0 turns −0.0 into +0.0
    count = flat.size
    shift = max(1, (count - 1).bit_length())
    positions = _POSITIONS.get(count)
    if positions is None:
        positions = _POSITIONS[count] = np.arange(count, dtype=np.int64)
        if len(_POSITIONS) > 256:
            _POSITIONS.pop(next(iter(_POSITIONS)))
    low = np.int64((1 << shift) - 1)
    keys = ((flat.view(np.int64) ^ _DESCENDING) & ~low) | positions
    keys.sort()
    order = keys & low
    return flat[order], order


def throughput_path(values: np.ndarray, sps: np.ndarray, base_tokens: int, base_tau: float) -> np.ndarray:
    """Θ along a greedy admission path (Algorithm 1 lines 5–9).

    values [N]: survivals in admission order; sps: SPS table indexed by B (`SPSProfile.sps_table`).
    Returns theta [N' + 1] float64, theta[m] = (base_tau + Σ_{i<m} values_i) · SPS(base_tokens + m), for
    the first N' = min(N, len(sps) − 1 − base_tokens) values.
    """
    count = min(values.size, sps.size - 1 - base_tokens)
    tau = np.empty(count + 1)
    tau[0] = base_tau
    tau[1:] = values[:count]
    np.cumsum(tau, out=tau)  # τ accumulated one admission at a time, as in Algorithm 1
    return tau * sps[base_tokens: base_tokens + count + 1]


def _lengths_from_order(order: np.ndarray, admitted: int, width: int, count: int) -> np.ndarray:
    return np.bincount(order[:admitted] // width, minlength=count)


class _HardwareAware(VerificationPolicy):
    def __init__(self, profile: SPSProfile, include_draft: bool | None = None, cache_size: int = 64):
        super().__init__()
        if not isinstance(profile, SPSProfile):
            raise TypeError(f"expected an SPSProfile, got {type(profile).__name__}")
        self.profile = profile
        self.include_draft = profile.has_draft_cost if include_draft is None else bool(include_draft)
        self._tables: dict[tuple[int, int], np.ndarray] = {}
        self._cache_size = cache_size

    def sps_table(self, requests: int, width: int) -> np.ndarray:
        """SPS for B = 0..R·(1+W) (float64), cached per (R, W)."""
        key = (requests, width)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= self._cache_size:
                self._tables.pop(next(iter(self._tables)))
            table = self._tables[key] = self.profile.sps_table(requests, requests * (1 + width), self.include_draft)
        return table

    def alone(self) -> VerificationPolicy:
        solo = getattr(self, "_alone", None)
        if solo is None:
            solo = self._alone = CausalGreedy(self.profile, self.include_draft, lookahead=False)
        return solo

    @staticmethod
    def _base(full: np.ndarray, bad: np.ndarray | None) -> int:
        """Tokens in the batch before any admission: one per request plus the bad rows' full drafts."""
        return full.size + (0 if bad is None else int(full[bad].sum()))


class CausalGreedy(_HardwareAware):
    """Algorithm 1 (paper §3.2.2, docs/design.md §5.2): admit (r, j) by descending a_{r,j}; stop at the first
    candidate that does not raise Θ = τ_total · SPS(B). The early stop keeps it lossless (docs/design.md §5.3).

    Staircase lookahead (`lookahead=True`, the default; our extension, not in the paper). Real SPS curves
    are staircases (docs/design.md §5.4): a candidate that starts a new step costs the whole step and lowers Θ, though
    the step's flat part would pay it back, so the early stop can end the search below the best fixed length
    (measured with the H100 profile: −2.3 % at 64 requests). The paper's answer is the asynchronous variant
    (`AsyncTopK`); this keeps Algorithm 1's causal search and adds a forecast from the previous call only. At
    a non-improving candidate m (0-based rank), the forecast path
        Θ̂(k) = (τ_{m+1} + Σ_{m<i<k} min(f_i, a_(m))) · SPS(B_0 + k),   k = m+1 … N,
    with f_i the previous call's sorted survivals mapped to this batch by rank (i·R_prev / R), decides: if
    max_k Θ̂(k) ≤ Θ(m) the search stops as Algorithm 1 does; otherwise it commits to k* = argmax Θ̂ (candidates
    with a = 0 among them are left out) and resumes the early-stopping search from there (at most
    `MAX_LOOKAHEADS` times per call). Every decision depends on candidates ranked at or before the one it
    admits and on the previous call, never on a later slot of the same request, so the rule stays
    non-anticipating (docs/design.md §5.3) exactly as the asynchronous budget does (docs/design.md §5.4). Without a previous call
    (or with `lookahead=False`) it is Algorithm 1 as published.

    profile: the SPS table; include_draft: add the drafter's step cost draft(R) to every step
    (default: when the profile has one)."""

    name = "causal-greedy"
    MAX_LOOKAHEADS = 8

    def __init__(self, profile: SPSProfile, include_draft: bool | None = None, cache_size: int = 64,
                 lookahead: bool = True):
        super().__init__(profile, include_draft, cache_size)
        self.lookahead = bool(lookahead)
        self.reset()

    def reset(self) -> None:
        """Forget the previous call (the lookahead's forecast)."""
        self._forecast: tuple[np.ndarray, int] | None = None

    def _lengths(self, c, full, bad, ids, width):
        count = full.size
        values, order = sorted_candidates(np.cumprod(c, axis=1))
        table, base = self.sps_table(count, width), self._base(full, bad)
        usable = min(values.size, table.size - 1 - base)  # candidates the SPS table covers
        tau = np.empty(usable + 1)
        tau[0] = count
        tau[1:] = values[:usable]
        np.cumsum(tau, out=tau)
        theta = tau * table[base: base + usable + 1]  # throughput_path, keeping τ for the lookahead
        admitted = _first_stop(theta, 0)
        if self.lookahead:
            positive = int(np.count_nonzero(values[:usable]))
            if self._forecast is not None and admitted < positive:
                admitted = self._look_past_steps(values, tau, theta, table[base:], admitted, positive, count)
            if positive:
                self._forecast = (values[:positive].copy(), count)
        return _lengths_from_order(order, admitted, width, count)

    def _look_past_steps(self, values, tau, theta, table, admitted, positive, count) -> int:
        """table: SPS from B_0 on; returns the candidates admitted (module docstring of the class)."""
        previous, previous_count = self._forecast
        usable = theta.size - 1
        if previous_count == count:
            horizon = min(usable, previous.size)
            forecast = previous[:horizon]
        else:  # the previous batch's survival distribution, read at this batch's ranks
            horizon = min(usable, (previous.size * count - 1) // previous_count + 1)
            forecast = previous[(np.arange(horizon) * previous_count) // count]
        path = np.empty(horizon + 1)
        for _ in range(self.MAX_LOOKAHEADS):
            m = admitted
            if m >= positive or m >= horizon:  # candidate m has a = 0, or nothing is forecast past it
                break
            # The path ahead uses the forecast only: how many current candidates are positive depends on the
            # later slots of the requests, so it may cut the admissions (each by its own value), not decide them.
            # Past the forecast's last candidate τ̂ stays flat while SPS falls, so the path ends there.
            ahead = path[: horizon - m]
            ahead[0] = 0.0
            np.minimum(forecast[m + 1: horizon], values[m], out=ahead[1:])
            np.cumsum(ahead, out=ahead)
            ahead += tau[m + 1]
            ahead *= table[m + 1: horizon + 1]
            best = int(ahead.argmax())
            if not ahead[best] > theta[m]:
                break
            admitted = min(_first_stop(theta, m + 1 + best), positive)
        return admitted

    def __repr__(self) -> str:
        return f"CausalGreedy(include_draft={self.include_draft}, lookahead={self.lookahead})"


def _first_stop(theta: np.ndarray, start: int) -> int:
    """Candidates admitted when the early-stopping search resumes after `start` admissions: the index of the
    first m ≥ start with Θ(m + 1) ≤ Θ(m) (Algorithm 1's stop), else all. Candidates with a = 0 sort last and
    never raise Θ, so they are never admitted here."""
    stops = theta[start + 1:] <= theta[start:-1]
    if not stops.size:
        return theta.size - 1
    first = int(stops.argmax())
    return start + first if stops[first] else theta.size - 1


class _Call:
    """What AsyncTopK remembers of one call: request ids (row order), survivals a [R, W] (0 on bad rows and
    non-candidate slots), the same sorted descending, and the bad rows ([R] bool, or None)."""

    __slots__ = ("ids", "a", "values", "bad", "_sorted", "_mean")

    def __init__(self, ids, a, values, bad):
        self.ids, self.a, self.values, self.bad, self._sorted, self._mean = ids, a, values, bad, None, None

    def mean(self) -> np.ndarray:
        """Batch-mean survival vector [W] over the rows that were not bad."""
        if self._mean is None:
            good = self.a if self.bad is None else self.a[~self.bad]
            self._mean = good.mean(0) if good.shape[0] else np.zeros(self.a.shape[1])
        return self._mean

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """→ (row of each id in this call, found mask)."""
        if self._sorted is None:
            perm = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[perm], perm)
        keys, perm = self._sorted
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return perm[pos], keys[pos] == ids


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] >= width:
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])


class AsyncTopK(_HardwareAware):
    """Production variant (paper §5.2, docs/design.md §5.4). The budget K (draft tokens verified this round) comes
    from an unconstrained global search (argmax of Θ, no early stop) over survivals from `lag` calls ago;
    the K slots then go to the highest *current* survivals (stable sort: prefix order kept).

    Stale survivals of a request: its own vector from `lag` calls ago if it was in every call since, else
    from the oldest call of its unbroken run (a request missing from a call, or `release`d, starts over);
    a request with no past call uses the batch-mean vector of the oldest remembered call, else `prior`
    ([W] survivals a_k, optional). With no information at all (first call, no prior) every draft is
    verified. `lag` ≥ 1 calls, so K never sees the current round. Calls with nothing to verify (all
    lengths 0) are not remembered. request_ids identify requests across calls (default: row position).
    `last_budget` is the K of the last call (None when it fell back to verify-all)."""

    name = "async-topk"

    def __init__(self, profile: SPSProfile, lag: int = 2, prior: Sequence[float] | None = None,
                 include_draft: bool | None = None, cache_size: int = 64):
        super().__init__(profile, include_draft, cache_size)
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
            raise ValueError(f"AsyncTopK needs lag ≥ 1 (the current round must not size its own budget), got {lag!r}")
        self.lag = lag
        self.prior = None
        if prior is not None:
            self.prior = np.asarray(prior, dtype=np.float64).reshape(-1)
            if not ((self.prior >= 0) & (self.prior <= 1)).all():
                raise ValueError("AsyncTopK prior survivals must lie in [0, 1]")
        self.reset()

    def reset(self) -> None:
        """Forget every request and past call."""
        self._calls: deque[_Call] = deque(maxlen=self.lag)  # oldest first
        self._run = 0  # consecutive past calls with exactly the current ids, in the same rows
        self._released: set[int] = set()
        self.last_budget: int | None = None

    def release(self, request_id: int) -> None:
        self._released.add(int(request_id))

    def _stale(self, ids: np.ndarray, width: int) -> np.ndarray | None:
        """Stale survivals [R, W'] of the current requests (None: no information)."""
        count = ids.size
        if not self._calls:
            return None if self.prior is None else np.repeat(self.prior[None], count, axis=0)
        calls = list(self._calls)
        store = max([width] + [call.a.shape[1] for call in calls])
        stale = np.repeat(_pad(calls[0].mean()[None], store), count, axis=0)
        alive = np.ones(count, dtype=bool)
        if len(self._released) > 16:
            alive &= ~np.isin(ids, np.fromiter(self._released, dtype=np.int64))
        else:
            for request_id in self._released:
                alive &= ids != request_id
        for call in reversed(calls):  # newest first; a run ends at the first call a request missed
            rows, found = call.lookup(ids)
            alive &= found
            if not alive.any():
                break
            stale = np.where(alive[:, None], _pad(call.a, store)[rows], stale)
        return stale

    def _lengths(self, c, full, bad, ids, width):
        count = full.size
        ids = np.arange(count) if ids is None else ids.copy()  # kept across calls: not the caller's buffer
        a = np.cumprod(c, axis=1)
        values, order = sorted_candidates(a)
        last = self._calls[-1] if self._calls else None
        same = (last is not None and not self._released and last.ids.size == count
                and bool((last.ids == ids).all()))
        self._run = self._run + 1 if same else 0
        if self._run >= self.lag and bad is None and self._calls[0].bad is None:
            # Steady batch: the stale survivals are exactly those of the call `lag` ago, sorted then.
            stale_values, stale_width = self._calls[0].values, self._calls[0].a.shape[1]
        else:
            stale = self._stale(ids, width)
            if stale is not None and bad is not None:
                stale = np.where(bad[:, None], 0.0, stale)
            stale_values = None if stale is None else sorted_candidates(stale)[0]
            stale_width = 0 if stale is None else stale.shape[1]
        self._calls.append(_Call(ids, a, values, bad))
        self._released.clear()
        if stale_values is None:
            self.last_budget = None
            return full.copy()
        table = self.sps_table(count, max(width, stale_width))
        theta = throughput_path(stale_values, table, self._base(full, bad), float(count))
        budget = int(theta.argmax())  # first maximum over the whole path: no early stop
        self.last_budget = budget
        admitted = min(budget, values.size)
        if admitted and not values[admitted - 1] > 0:  # fewer positive current candidates than K
            admitted = int((values > 0).sum())
        return _lengths_from_order(order, admitted, width, count)

    def __repr__(self) -> str:
        return f"AsyncTopK(lag={self.lag}, include_draft={self.include_draft})"
