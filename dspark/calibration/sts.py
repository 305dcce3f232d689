"""Sequential Temperature Scaling (SPEC §4.2, paper §3.2.1 "Post-hoc Calibration").

c'_k = σ(logit(c_k)/T_k). For k = 1..γ in order, with T_{<k} fixed, T_k minimises (1-D grid search:
log-spaced coarse grid, then a finer log-spaced grid between the neighbours of the coarse minimum) the ECE
of the prefix survival â_k = Π_{i≤k} σ(logit(c_i)/T_i) over the fitting rounds with ℓ ≥ k. Temperature
scaling is strictly increasing in c_k, so the ranking of scores within a position is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dspark.calibration.metrics import (
    DEFAULT_BINS,
    EPS,
    Rounds,
    as_rounds,
    check_temperatures,
    logits,
    position_metrics,
    survival_events,
)

DEFAULT_GRID = np.geomspace(0.05, 20.0, 41)  # coarse grid of T, ratio ≈ 1.16 between neighbours
REFINE_POINTS = 17  # fine grid between the coarse minimum's neighbours, ratio ≈ 1.02
MIN_COUNT = 50  # positions verified in fewer fitting rounds keep their initial temperature
_CHUNK = 1 << 21  # elements of one [grid, rounds] block of the search


def apply_temperatures(confidences: Any, temperatures: Any, eps: float = EPS) -> Any:
    """σ(logit(clamp(c, eps, 1 − eps))/T_k) on [..., m] (m ≤ len(T): positions 1..m), clamped to
    [eps, 1 − eps]; NaN stays NaN. torch in → torch out (same device and dtype, computed in ≥ fp32),
    otherwise numpy float64. temperatures None returns the input unchanged."""
    if temperatures is None:
        return confidences
    if isinstance(confidences, torch.Tensor):
        width = confidences.shape[-1]
        temps = torch.as_tensor(check_temperatures(temperatures, width))
        work = confidences.float() if confidences.dtype in (torch.bfloat16, torch.float16) else confidences
        temps = temps.to(device=work.device, dtype=work.dtype)
        out = torch.sigmoid(torch.logit(work.clamp(eps, 1.0 - eps)) / temps).clamp(eps, 1.0 - eps)
        return out.to(confidences.dtype)
    c = np.asarray(confidences, dtype=np.float64)
    temps = check_temperatures(temperatures, c.shape[-1])
    clamped = np.clip(c, eps, 1.0 - eps)
    z = (np.log(clamped) - np.log1p(-clamped)) / temps
    return np.clip(1.0 / (1.0 + np.exp(-z)), eps, 1.0 - eps)


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


def fit_sts(rounds: Any, *, bins: int = DEFAULT_BINS, grid: Any = None, refine: int = REFINE_POINTS,
            min_count: int = MIN_COUNT, initial: Any = None) -> np.ndarray:
    """Temperatures [γ] (float64) of Sequential Temperature Scaling fitted on `rounds` (SPEC §4.2).

    rounds: `Rounds` or (confidences [N, γ], verified [N], accepted [N]). grid: increasing positive
    coarse grid of T (default 41 points log-spaced over 0.05..20); refine: points of the fine grid between
    the coarse minimum's neighbours. A position verified in fewer than min_count rounds keeps its initial
    temperature (initial [γ], default 1.0). Cost: O(γ·(|grid| + refine)·N).
    """
    r = as_rounds(rounds)
    gamma = r.block_size
    coarse = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64).ravel()
    if coarse.size < 2 or not np.all(np.isfinite(coarse) & (coarse > 0)) or np.any(np.diff(coarse) <= 0):
        raise ValueError("the temperature grid must be ≥ 2 increasing positive finite values")
    temps = np.ones(gamma) if initial is None else check_temperatures(initial, gamma).copy()
    logit = logits(r.confidences)
    outcome, mask = survival_events(r)
    prefix = np.ones(len(r))
    for j in range(gamma):
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
    """Temperatures [γ] fitted on `fit_rounds` rounds; `before`/`after`: `position_metrics` of the raw and
    calibrated head on the `held_out_rounds` held-out rounds."""

    temperatures: np.ndarray
    before: dict
    after: dict
    fit_rounds: int
    held_out_rounds: int


def calibrate(rounds: Any, *, held_out_fraction: float = 0.5, seed: int = 0, groups: Any = None,
              bins: int = DEFAULT_BINS, **fit_kwargs: Any) -> STSResult:
    """Split (`split_rounds`), fit STS on one part, report metrics before/after on the other."""
    fit, held = split_rounds(rounds, held_out_fraction, seed, groups)
    temps = fit_sts(fit, bins=bins, **fit_kwargs)
    return STSResult(temps, position_metrics(held, None, bins), position_metrics(held, temps, bins), len(fit), len(held))


__all__ = [
    "DEFAULT_GRID", "STSResult", "apply_temperatures", "calibrate", "fit_sts", "split_rounds",
]
