"""Calibration maps of the confidence head: Sequential Temperature Scaling (docs/design.md §4.2, paper §3.2.1
"Post-hoc Calibration") and per-position Platt scaling.

Both map the head's conditional scores c_k (P(slot k survives | slots < k survived)) to c'_k = σ(logit(c_k)/T_k + b_k),
strictly increasing in c_k, so the ranking of scores within a position is unchanged.

- "sts" — the paper's: b_k = 0. For k = 1..γ in order, with T_{<k} fixed, T_k minimises the ECE of the prefix
  survival â_k = Π_{i≤k} c'_i over the fitting rounds with ℓ ≥ k (1-D grid search: log-spaced coarse grid,
  then a finer grid between the neighbours of the coarse minimum).
- "platt" (the default) — T_k and b_k by maximum likelihood of the conditional events (slot k accepted,
  over the rounds that verified slot k with slots < k accepted): logistic regression of the outcome on
  logit(c_k), with a weak prior at the identity map (T = 1, b = 0) so that a position whose outcomes are all
  equal stays finite. Two reasons, both measured on the shipped drafter (docs/benchmarks.md): a temperature
  only stretches a logit about 0, so it cannot move a position's mean across 0.5 — at temperature 1 the head
  reads 0.70 on average at position 2 where 53 % of the slots survive (0.62–0.67 against 0.48–0.53 at
  positions 3–7); and ECE is not a proper score — a constant map at the base rate has ECE ≈ 0 — so
  minimising it flattens such a head towards 0.5 (STS chose T = 13.8, 7.4, 19.5 at positions 2–4), after
  which every request looks alike to the scheduler. The likelihood
  rewards both calibration and resolution, and Newton's method on two parameters per position costs a few
  passes over the rounds (cheap enough for online refits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dspark.calibration.metrics import (
    DEFAULT_BINS,
    EPS,
    ConfidenceMap,
    Rounds,
    as_map,
    as_rounds,
    calibrated_confidences,
    logits,
    position_metrics,
    survival_events,
)

METHODS = ("sts", "platt")
DEFAULT_METHOD = "platt"
DEFAULT_GRID = np.geomspace(0.05, 20.0, 41)  # coarse grid of T, ratio ≈ 1.16 between neighbours
REFINE_POINTS = 17  # fine grid between the coarse minimum's neighbours, ratio ≈ 1.02
MIN_COUNT = 50  # positions verified in fewer fitting rounds keep their initial map
PLATT_PRIOR = 1.0  # precision of the Gaussian prior on (1/T − 1, b): about one pseudo-observation
PLATT_SLOPE = (1.0 / DEFAULT_GRID[-1], 1.0 / DEFAULT_GRID[0])  # 1/T kept in [1/20, 20], the STS grid's range
_CHUNK = 1 << 21  # elements of one [grid, rounds] block of the search


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def apply_calibration(confidences: Any, calibration: Any, eps: float = EPS) -> Any:
    """σ(logit(clamp(c, eps, 1 − eps))/T_k + b_k) on [..., m] (m ≤ γ: positions 1..m), clamped to
    [eps, 1 − eps]; NaN stays NaN. calibration: a `ConfidenceMap`, temperatures [≥ m] (biases 0) or None
    (input returned unchanged). torch in → torch out (same device and dtype, computed in ≥ fp32), otherwise
    numpy float64."""
    if calibration is None:
        return confidences
    if not isinstance(confidences, torch.Tensor):
        return calibrated_confidences(np.asarray(confidences, dtype=np.float64), calibration, eps)
    cmap = as_map(calibration, confidences.shape[-1])
    work = confidences.float() if confidences.dtype in (torch.bfloat16, torch.float16) else confidences
    temps = torch.as_tensor(cmap.temperatures).to(device=work.device, dtype=work.dtype)
    biases = torch.as_tensor(cmap.biases).to(device=work.device, dtype=work.dtype)
    out = torch.sigmoid(torch.logit(work.clamp(eps, 1.0 - eps)) / temps + biases).clamp(eps, 1.0 - eps)
    return out.to(confidences.dtype)


def _ece_over_temperatures(prefix: np.ndarray, logit: np.ndarray, outcome: np.ndarray, temps: np.ndarray,
                           bins: int) -> np.ndarray:
    """[G] ECE of prefix·σ(logit/T_g) against outcome [n] for every T_g; fp32 predictions, fp64 bin sums,
    chunked over the grid so one block holds ≤ 2^21 predictions."""
    n = logit.size
    z = torch.from_numpy(np.ascontiguousarray(logit, dtype=np.float32))
    p = torch.from_numpy(np.ascontiguousarray(prefix, dtype=np.float32))
    y = outcome.astype(np.float32)
    inverse = torch.from_numpy((1.0 / temps).astype(np.float32))
    out = np.empty(temps.size)
    rows = max(1, _CHUNK // max(1, n))
    for start in range(0, temps.size, rows):
        g = min(rows, temps.size - start)
        pred = torch.sigmoid(z[None, :] * inverse[start:start + g, None]).mul_(p).numpy()
        index = np.multiply(pred, bins).astype(np.int32)
        np.minimum(index, bins - 1, out=index)
        index += (np.arange(g, dtype=np.int32) * bins)[:, None]
        pred -= y
        sums = np.bincount(index.ravel(), weights=pred.ravel(), minlength=g * bins)
        out[start:start + g] = np.abs(sums.reshape(g, bins)).sum(axis=1) / max(n, 1)
    return out


def _best(temps: np.ndarray, ece: np.ndarray) -> int:
    """Index of the minimum ECE; among ties (1e-12), the T closest to 1 in log scale."""
    ties = np.flatnonzero(ece <= ece.min() + 1e-12)
    return int(ties[np.argmin(np.abs(np.log(temps[ties])))])


def _fit_sts(r: Rounds, temps: np.ndarray, coarse: np.ndarray, refine: int, min_count: int, bins: int) -> np.ndarray:
    logit = logits(r.confidences)
    outcome, mask = survival_events(r)
    prefix = np.ones(len(r))
    for j in range(r.block_size):
        rows = mask[:, j]
        if rows.sum() >= min_count:
            p, z, y = prefix[rows], logit[rows, j], outcome[rows, j].astype(np.float64)
            ece = _ece_over_temperatures(p, z, y, coarse, bins)
            i = _best(coarse, ece)
            lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, coarse.size - 1)]
            fine = np.geomspace(lo, hi, max(int(refine), 2))
            candidates = np.r_[coarse[i], fine]
            temps[j] = candidates[_best(candidates, np.r_[ece[i], _ece_over_temperatures(p, z, y, fine, bins)])]
        with np.errstate(invalid="ignore"):
            prefix = prefix * np.clip(1.0 / (1.0 + np.exp(-logit[:, j] / temps[j])), EPS, 1.0 - EPS)
    return temps


def _platt(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(a, b) maximising Σ log-likelihood of y ~ Bernoulli(σ(a·x + b)) − (PLATT_PRIOR/2)·((a − 1)² + b²) by
    Newton's method (the objective is concave), a kept in PLATT_SLOPE."""
    theta = np.array([1.0, 0.0])
    prior = np.array([1.0, 0.0])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[0] * x + theta[1])))
        w = p * (1.0 - p)
        grad = np.array([np.dot(y - p, x), np.sum(y - p)]) - PLATT_PRIOR * (theta - prior)
        hess = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), np.sum(w)]]) + PLATT_PRIOR * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        theta[0] = np.clip(theta[0], *PLATT_SLOPE)
        if np.max(np.abs(step)) < 1e-9:
            break
    return float(theta[0]), float(theta[1])


def _fit_platt(r: Rounds, start: ConfidenceMap, min_count: int) -> ConfidenceMap:
    temps, biases = start.temperatures.copy(), start.biases.copy()
    logit = logits(r.confidences)
    for j in range(r.block_size):
        rows = (r.verified > j) & (r.accepted >= j)  # slot j + 1 verified, slots ≤ j accepted
        if rows.sum() >= min_count:
            a, b = _platt(logit[rows, j], (r.accepted[rows] > j).astype(np.float64))
            temps[j], biases[j] = 1.0 / a, b
    return ConfidenceMap(temps, biases)


def fit_map(rounds: Any, *, method: str = DEFAULT_METHOD, bins: int = DEFAULT_BINS, grid: Any = None,
            refine: int = REFINE_POINTS, min_count: int = MIN_COUNT, initial: Any = None) -> ConfidenceMap:
    """The `ConfidenceMap` [γ] fitted on `rounds` (module docstring; `method` "sts" or "platt").

    rounds: `Rounds` or (confidences [N, γ], verified [N], accepted [N]). "sts": grid — increasing positive
    coarse grid of T (default 41 points log-spaced over 0.05..20), refine — points of the fine grid, bins —
    of the ECE; cost O(γ·(|grid| + refine)·N). "platt": cost about γ·10 passes over the conditional rounds.
    A position with fewer than min_count fitting rounds keeps its initial map (initial: a map or
    temperatures [γ]; default T = 1, b = 0).
    """
    check_method(method)
    r = as_rounds(rounds)
    start = as_map(initial, r.block_size) or ConfidenceMap.of(np.ones(r.block_size))
    if method == "platt":
        return _fit_platt(r, start, min_count)
    coarse = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64).ravel()
    if coarse.size < 2 or not np.all(np.isfinite(coarse) & (coarse > 0)) or np.any(np.diff(coarse) <= 0):
        raise ValueError("the temperature grid must be ≥ 2 increasing positive finite values")
    temps = _fit_sts(r, start.temperatures.copy(), coarse, refine, min_count, bins)
    return ConfidenceMap(temps, np.zeros(r.block_size))


def fit_sts(rounds: Any, *, bins: int = DEFAULT_BINS, grid: Any = None, refine: int = REFINE_POINTS,
            min_count: int = MIN_COUNT, initial: Any = None) -> np.ndarray:
    """Temperatures [γ] (float64) of the paper's Sequential Temperature Scaling (`fit_map` with method "sts")."""
    return fit_map(rounds, method="sts", bins=bins, grid=grid, refine=refine, min_count=min_count,
                   initial=initial).temperatures


def split_rounds(rounds: Any, held_out_fraction: float = 0.5, seed: int = 0,
                 groups: Any = None) -> tuple[Rounds, Rounds]:
    """Deterministic (fit, held_out) split of the rounds by a seeded permutation. With groups [N] (e.g. the
    sample id of every round), whole groups go to one side so correlated rounds are not split."""
    r = as_rounds(rounds)
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(len(r))
        held = np.zeros(len(r), dtype=bool)
        held[order[: int(round(held_out_fraction * len(r)))]] = True
    else:
        g = np.asarray(groups).ravel()
        if g.shape != (len(r),):
            raise ValueError(f"groups must be [N] = [{len(r)}], got {g.shape}")
        unique, inverse = np.unique(g, return_inverse=True)
        chosen = rng.permutation(unique.size)[: int(round(held_out_fraction * unique.size))]
        held = np.isin(inverse, chosen)
    return r.subset(~held), r.subset(held)


@dataclass(frozen=True)
class STSResult:
    """The map fitted on `fit_rounds` rounds; `before`/`after`: `position_metrics` of the raw and calibrated
    head on the `held_out_rounds` held-out rounds (`after` with the ECE noise floor, "ece_floor")."""

    calibration: ConfidenceMap
    before: dict
    after: dict
    fit_rounds: int
    held_out_rounds: int
    method: str = DEFAULT_METHOD

    @property
    def temperatures(self) -> np.ndarray:
        return self.calibration.temperatures


def calibrate(rounds: Any, *, held_out_fraction: float = 0.5, seed: int = 0, groups: Any = None,
              bins: int = DEFAULT_BINS, method: str = DEFAULT_METHOD, **fit_kwargs: Any) -> STSResult:
    """Split (`split_rounds`), fit on one part (`fit_map`), report metrics before/after on the other."""
    fit, held = split_rounds(rounds, held_out_fraction, seed, groups)
    cmap = fit_map(fit, method=method, bins=bins, **fit_kwargs)
    return STSResult(cmap, position_metrics(held, None, bins), position_metrics(held, cmap, bins, noise_floor=True),
                     len(fit), len(held), method)


__all__ = [
    "DEFAULT_GRID", "DEFAULT_METHOD", "METHODS", "STSResult", "apply_calibration", "calibrate",
    "check_method", "fit_map", "fit_sts", "split_rounds",
]
