"""Calibration metrics of the confidence head (docs/design.md §4.1, paper §3.2.1 and Fig. 6).

A verification round of a drafter with a confidence head gives, for block positions k = 1..γ, the head's
conditional confidences c_k ∈ (0, 1) (P(slot k accepted | slots < k accepted)), the number of verified
drafts ℓ and the accepted prefix length n ≤ ℓ. A set of N rounds is `Rounds`: confidences [N, γ]
(NaN beyond the drafted slots), verified [N], accepted [N].

Per position k the prediction is the prefix survival â_k = Π_{i≤k} c_i, the event is "slots ≤ k all
accepted" (n ≥ k), defined only for rounds with ℓ ≥ k. Metrics per position: ECE with equal-width bins
Σ_b (n_b/N)·|mean â in b − fraction accepted in b|, ROC-AUC (rank-based, ties averaged), Brier score
mean (â − y)², mean prediction vs mean outcome, counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

DEFAULT_BINS = 20
EPS = 1e-6  # confidences are clamped to [EPS, 1 − EPS] before a logit


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy copy-free view of a numpy array, torch tensor (any device) or nested sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)


def valid_round_mask(confidences: np.ndarray, verified: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """[N] bool: 0 ≤ n ≤ ℓ ≤ γ and c_1..c_ℓ finite and in [0, 1] (slots beyond ℓ are not looked at).

    0 and 1 are accepted (a bf16/fp32 sigmoid saturates there) and clamped to [EPS, 1 − EPS] later.
    """
    block_size = confidences.shape[1]
    ok = (verified >= 0) & (verified <= block_size) & (accepted >= 0) & (accepted <= verified)
    in_range = np.isfinite(confidences) & (confidences >= 0.0) & (confidences <= 1.0)
    needed = np.arange(1, block_size + 1)[None, :] <= verified[:, None]
    return ok & np.all(in_range | ~needed, axis=1)


def integer_counts(verified: Any, accepted: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ℓ, n) as int64 [N] (−1 where not a finite integer) and the [N] bool mask of integral rows."""
    ver = to_numpy(verified, np.float64).ravel()
    acc = to_numpy(accepted, np.float64).ravel()
    if ver.shape != acc.shape:
        raise ValueError(f"verified {ver.shape} and accepted {acc.shape} differ in shape")
    integral = np.isfinite(ver) & np.isfinite(acc) & (ver == np.round(ver)) & (acc == np.round(acc))
    return np.where(integral, ver, -1).astype(np.int64), np.where(integral, acc, -1).astype(np.int64), integral


@dataclass(frozen=True, eq=False)
class Rounds:
    """N verification rounds: confidences [N, γ] float64 (raw c_k, NaN where not drafted), verified [N]
    int64 (ℓ), accepted [N] int64 (n ≤ ℓ). `dropped` counts invalid rows removed by `from_arrays`."""

    confidences: np.ndarray
    verified: np.ndarray
    accepted: np.ndarray
    dropped: int = 0

    @classmethod
    def from_arrays(cls, confidences: Any, verified: Any, accepted: Any, *, drop_invalid: bool = False) -> "Rounds":
        """Validate and copy (numpy, torch or lists). Invalid rows (non-integer counts or see
        `valid_round_mask`) raise ValueError, or are dropped and counted with drop_invalid=True."""
        conf = np.array(to_numpy(confidences, np.float64), dtype=np.float64)
        if conf.ndim != 2:
            raise ValueError(f"confidences must be [N, γ], got shape {conf.shape}")
        ver, acc, integral = integer_counts(verified, accepted)
        if ver.shape != (conf.shape[0],):
            raise ValueError(f"verified and accepted must be [N] with N = {conf.shape[0]}, got {ver.shape}")
        ok = integral & valid_round_mask(conf, ver, acc)
        bad = int((~ok).sum())
        if bad and not drop_invalid:
            first = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{bad} of {len(ok)} rounds are invalid (first: row {first}, verified={to_numpy(verified).ravel()[first]}, "
                f"accepted={to_numpy(accepted).ravel()[first]}, confidences={conf[first].tolist()}); need integers "
                f"0 ≤ accepted ≤ verified ≤ γ = {conf.shape[1]} and finite confidences in [0, 1] on the verified slots"
            )
        return cls(conf[ok], ver[ok], acc[ok], dropped=bad)

    @property
    def block_size(self) -> int:
        return int(self.confidences.shape[1])

    def __len__(self) -> int:
        return int(self.confidences.shape[0])

    def subset(self, index: np.ndarray) -> "Rounds":
        return Rounds(self.confidences[index], self.verified[index], self.accepted[index])

    @staticmethod
    def concat(parts: Sequence["Rounds"]) -> "Rounds":
        """Rounds of the same block size, one after another."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({p.block_size for p in parts}) != 1:
            raise ValueError(f"block sizes differ: {[p.block_size for p in parts]}")
        return Rounds(
            np.concatenate([p.confidences for p in parts]),
            np.concatenate([p.verified for p in parts]),
            np.concatenate([p.accepted for p in parts]),
            dropped=sum(p.dropped for p in parts),
        )


def as_rounds(rounds: Any) -> Rounds:
    """A `Rounds`, or a (confidences, verified, accepted) triple validated by `Rounds.from_arrays`."""
    if isinstance(rounds, Rounds):
        return rounds
    if isinstance(rounds, (tuple, list)) and len(rounds) == 3:
        return Rounds.from_arrays(*rounds)
    raise TypeError(f"expected Rounds or a (confidences, verified, accepted) triple, got {type(rounds).__name__}")


def logits(confidences: np.ndarray, eps: float = EPS) -> np.ndarray:
    """logit(clamp(c, eps, 1 − eps)), NaN kept."""
    c = np.clip(confidences, eps, 1.0 - eps)
    return np.log(c) - np.log1p(-c)


def check_temperatures(temperatures: Any, width: int) -> np.ndarray:
    """The first `width` temperatures as float64 [width]; ValueError unless ≥ width values, all finite > 0."""
    temps = to_numpy(temperatures, np.float64).ravel()
    if temps.size < width:
        raise ValueError(f"{temps.size} temperatures for {width} block positions")
    temps = temps[:width]
    if not np.all(np.isfinite(temps) & (temps > 0)):
        raise ValueError(f"temperatures must be finite and > 0, got {temps.tolist()}")
    return temps


@dataclass(frozen=True, eq=False)
class ConfidenceMap:
    """Per-position calibration of the head's scores: c'_k = σ(logit(c_k)/T_k + b_k), temperatures [γ] > 0 and
    biases [γ] (float64). Sequential Temperature Scaling (paper §3.2.1) is b = 0; the bias lets a position's
    mean move across 0.5, which a temperature cannot (`dspark.calibration.sts`). Strictly increasing in c_k,
    so the ranking of scores within a position is unchanged."""

    temperatures: np.ndarray
    biases: np.ndarray

    @classmethod
    def of(cls, temperatures: Any, biases: Any = None) -> "ConfidenceMap":
        temps = check_temperatures(temperatures, to_numpy(temperatures, np.float64).size).copy()
        if biases is None:
            return cls(temps, np.zeros_like(temps))
        b = to_numpy(biases, np.float64).ravel().copy()
        if b.shape != temps.shape or not np.all(np.isfinite(b)):
            raise ValueError(f"biases must be {temps.size} finite numbers, got {b.tolist()}")
        return cls(temps, b)

    @property
    def block_size(self) -> int:
        return int(self.temperatures.size)

    def head(self, width: int) -> "ConfidenceMap":
        """The map of positions 1..width (ValueError when it has fewer)."""
        if width > self.block_size:
            raise ValueError(f"{self.block_size} temperatures for {width} block positions")
        return ConfidenceMap(self.temperatures[:width], self.biases[:width])

    def to_lists(self) -> tuple[list[float], list[float]]:
        return self.temperatures.tolist(), self.biases.tolist()

    def inverse(self) -> "ConfidenceMap":
        """The map that undoes this one: logit(c) = (logit(c') − b_k)·T_k = logit(c')/(1/T_k) − b_k·T_k."""
        return ConfidenceMap(1.0 / self.temperatures, -self.biases * self.temperatures)


def as_map(calibration: Any, width: int) -> ConfidenceMap | None:
    """None, a `ConfidenceMap`, or temperatures [≥ width] (biases 0) → the map of the first `width` positions."""
    if calibration is None:
        return None
    if isinstance(calibration, ConfidenceMap):
        return calibration.head(width)
    return ConfidenceMap.of(check_temperatures(calibration, width))


def calibrated_confidences(confidences: np.ndarray, calibration: Any = None, eps: float = EPS) -> np.ndarray:
    """[..., m] c'_k = σ(logit(c_k)/T_k + b_k) (paper §3.2.1 with b = 0) of positions k = 1..m, clamped to
    [eps, 1 − eps], NaN kept; calibration: see `as_map` (None = raw c_k)."""
    cmap = as_map(calibration, confidences.shape[-1])
    if cmap is None:
        return np.clip(confidences, eps, 1.0 - eps)
    z = logits(confidences, eps) / cmap.temperatures + cmap.biases
    return np.clip(1.0 / (1.0 + np.exp(-z)), eps, 1.0 - eps)


def prefix_survival(confidences: np.ndarray, calibration: Any = None) -> np.ndarray:
    """[N, γ] â_k = Π_{i≤k} c'_i (NaN from the first undrafted slot on)."""
    return np.cumprod(calibrated_confidences(confidences, calibration), axis=1)


def survival_events(rounds: Rounds) -> tuple[np.ndarray, np.ndarray]:
    """(outcome, mask), both [N, γ] bool: outcome[:, k−1] = n ≥ k, mask[:, k−1] = ℓ ≥ k."""
    k = np.arange(1, rounds.block_size + 1)[None, :]
    return rounds.accepted[:, None] >= k, rounds.verified[:, None] >= k


def bin_index(pred: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Equal-width bin of each prediction in [0, 1]: min(⌊p·bins⌋, bins − 1)."""
    return np.clip((pred * bins).astype(np.int64), 0, bins - 1)


def expected_calibration_error(pred: Any, outcome: Any, bins: int = DEFAULT_BINS) -> float | None:
    """ECE = Σ_b (n_b/N)·|mean p in b − mean y in b| = (1/N)·Σ_b |Σ_{i∈b} (p_i − y_i)|; None if N = 0."""
    p = to_numpy(pred, np.float64).ravel()
    y = to_numpy(outcome, np.float64).ravel()
    if p.size == 0:
        return None
    diff = np.bincount(bin_index(p, bins), weights=p - y, minlength=bins)
    return float(np.abs(diff).sum() / p.size)


def ece_noise_floor(pred: Any, bins: int = DEFAULT_BINS, draws: int = 200, seed: int = 0) -> float | None:
    """Expected ECE of a perfectly calibrated predictor making the same predictions: the mean ECE of `draws`
    outcome sets y ~ Bernoulli(pred) (seeded Monte Carlo); None if empty.

    ECE with equal-width bins is biased upward on finite data (each bin's |mean p − mean y| has a sampling
    error of about sqrt(p(1 − p)/n_b)), so an ECE is only meaningful against this floor; it grows with the
    number of occupied bins and shrinks as 1/sqrt(N).
    """
    p = to_numpy(pred, np.float64).ravel()
    if p.size == 0:
        return None
    rng = np.random.default_rng(seed)
    y = rng.random((int(draws), p.size)) < p[None, :]
    index = bin_index(p, bins)[None, :] + (np.arange(int(draws)) * bins)[:, None]
    diff = np.bincount(index.ravel(), weights=(p[None, :] - y).ravel(), minlength=int(draws) * bins)
    return float(np.abs(diff.reshape(int(draws), bins)).sum(axis=1).mean() / p.size)


def ece_grid(pred: np.ndarray, outcome: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """ECE of every row of pred [G, n] against outcome [n] in one bincount: [G]."""
    g, n = pred.shape
    if n == 0:
        return np.zeros(g)
    index = bin_index(pred, bins) + (np.arange(g) * bins)[:, None]
    diff = np.bincount(index.ravel(), weights=(pred - outcome[None, :]).ravel(), minlength=g * bins)
    return np.abs(diff.reshape(g, bins)).sum(axis=1) / n


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(xs.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new) - 1]
    return ranks


def roc_auc(pred: Any, outcome: Any) -> float | None:
    """Mann–Whitney ROC-AUC: P(p_pos > p_neg) + ½·P(tie); None when only one class is present."""
    p = to_numpy(pred, np.float64).ravel()
    y = to_numpy(outcome).ravel().astype(bool)
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return None
    return float((average_ranks(p)[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def brier_score(pred: Any, outcome: Any) -> float | None:
    """mean (p − y)²; None if empty."""
    p = to_numpy(pred, np.float64).ravel()
    y = to_numpy(outcome, np.float64).ravel()
    return float(np.mean((p - y) ** 2)) if p.size else None


def position_data(rounds: Any, calibration: Any = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position k = 1..γ: (â_k, y_k) over the rounds with ℓ ≥ k (1-D float64, bool); calibration: see
    `as_map`."""
    r = as_rounds(rounds)
    pred = prefix_survival(r.confidences, calibration)
    outcome, mask = survival_events(r)
    return [(pred[mask[:, j], j], outcome[mask[:, j], j]) for j in range(r.block_size)]


def ece_per_position(rounds: Any, calibration: Any = None, bins: int = DEFAULT_BINS) -> list[float | None]:
    """[γ] ECE of â_k (None where no round verified slot k)."""
    return [expected_calibration_error(p, y, bins) for p, y in position_data(rounds, calibration)]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def position_metrics(rounds: Any, calibration: Any = None, bins: int = DEFAULT_BINS, *,
                     noise_floor: bool = False) -> dict:
    """JSON-able metrics of â_k per position and their unweighted means over positions with data.

    {"bins", "block_size", "rounds", "positions": [{"position": k, "count", "accepted", "ece", "auc",
    "brier", "mean_predicted", "mean_observed"}], "mean": {"ece", "auc", "brier", "mean_predicted",
    "mean_observed"}}; undefined values (no data, one class for AUC) are None. noise_floor: also "ece_floor"
    (`ece_noise_floor`, the ECE a perfectly calibrated head would show on this many rounds) per position and
    in the mean.
    """
    r = as_rounds(rounds)
    rows = []
    for k, (p, y) in enumerate(position_data(r, calibration), start=1):
        rows.append({
            "position": k,
            "count": int(p.size),
            "accepted": int(y.sum()),
            "ece": expected_calibration_error(p, y, bins),
            "auc": roc_auc(p, y),
            "brier": brier_score(p, y),
            "mean_predicted": float(p.mean()) if p.size else None,
            "mean_observed": float(y.mean()) if p.size else None,
        })
        if noise_floor:
            rows[-1]["ece_floor"] = ece_noise_floor(p, bins)
    keys = ("ece", "auc", "brier", "mean_predicted", "mean_observed") + (("ece_floor",) if noise_floor else ())
    return {
        "bins": bins,
        "block_size": r.block_size,
        "rounds": len(r),
        "positions": rows,
        "mean": {key: _mean([row[key] for row in rows]) for key in keys},
    }


def reliability_data(rounds: Any, calibration: Any = None, bins: int = DEFAULT_BINS) -> list[dict]:
    """Reliability diagram per position k: {"position", "count", "ece", "auc", "lower", "upper" [bins]
    (bin edges), "mean_predicted", "observed" [bins] (None for empty bins), "count_per_bin" [bins]}."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for k, (p, y) in enumerate(position_data(rounds, calibration), start=1):
        index = bin_index(p, bins)
        count = np.bincount(index, minlength=bins)
        sum_p = np.bincount(index, weights=p, minlength=bins)
        sum_y = np.bincount(index, weights=y.astype(np.float64), minlength=bins)
        out.append({
            "position": k,
            "count": int(p.size),
            "ece": expected_calibration_error(p, y, bins),
            "auc": roc_auc(p, y),
            "lower": edges[:-1].tolist(),
            "upper": edges[1:].tolist(),
            "mean_predicted": [float(s / c) if c else None for s, c in zip(sum_p, count)],
            "observed": [float(s / c) if c else None for s, c in zip(sum_y, count)],
            "count_per_bin": count.tolist(),
        })
    return out
