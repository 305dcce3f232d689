"""Static confidence-threshold sweep (paper §4.3.3, Fig. 5; docs/design.md §4.1, §5).

Replays verify-all traces (`dspark.evaluation.simulator`, replay fact: verifying ℓ ≤ drafted slots of a
recorded round accepts min(accepted, ℓ) drafts) under a static threshold t:

* kind "confidence": ℓ = the longest prefix whose every conditional confidence c_k ≥ t;
* kind "survival": ℓ = the longest prefix whose prefix survival a_k = Π_{i≤k} c_i ≥ t (and > 0).

t = 0 is fixed-length (verify-all) verification. Per domain (and "all", every round pooled), per t:
accepted_per_step (drafts accepted per round), rejected_per_step (verified but not accepted),
verified_per_step (mean ℓ), tokens_per_step (accepted + 1), acceptance_rate (accepted / verified; None
when nothing is verified). Steps are verification rounds of one request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dspark.errors import ConfigError
from dspark.evaluation.report import save_figure
from dspark.evaluation.simulator import replay
from dspark.evaluation.traces import RecordedRounds
from dspark.scheduling import ConfidenceThreshold, SurvivalThreshold

DEFAULT_THRESHOLDS = "0.05:0.95:0.05"
KINDS = ("confidence", "survival")


def parse_thresholds(text: str) -> list[float]:
    """"start:stop:step" (inclusive, rounded to 6 digits) or "0.3,0.5,0.7" → sorted distinct values in [0, 1]."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or stop < start:
                raise ConfigError(f"--thresholds {text!r}: need start ≤ stop and step > 0")
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds {text!r}: give start:stop:step or a comma-separated list") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise ConfigError(f"--thresholds {text!r}: thresholds must lie in [0, 1]")
    return sorted(set(values))


def threshold_lengths(rounds: RecordedRounds, threshold: float, kind: str = "confidence") -> np.ndarray:
    """ℓ per round [N] under a static threshold (capped by the recorded verified count)."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: use {' or '.join(KINDS)}")
    policy = ConfidenceThreshold(threshold) if kind == "confidence" else SurvivalThreshold(threshold)
    return policy(torch.from_numpy(rounds.confidences), rounds.drafted, rounds.verified).numpy()


def _stats(accepted_all: np.ndarray, ell: np.ndarray) -> dict:
    accepted, emitted = replay(accepted_all, ell)
    verified = int(ell.sum())
    return {
        "accepted_per_step": float(accepted.mean()),
        "rejected_per_step": float((ell - accepted).mean()),
        "verified_per_step": float(ell.mean()),
        "tokens_per_step": float(emitted.mean()),
        "acceptance_rate": float(accepted.sum()) / verified if verified else None,
    }


def sweep(rounds: RecordedRounds, thresholds: Sequence[float], kind: str = "confidence") -> dict:
    """{"kind", "thresholds", "drafter", "block_size", "domains": {domain | "all": {"rounds", "baseline"
    (verify-all), "points": [{"threshold", ...per-step stats}]}}} (module docstring)."""
    if not rounds.has_confidences:
        raise ConfigError(f"drafter {rounds.label!r} has no confidences; the sweep needs a confidence head")
    lengths = {t: threshold_lengths(rounds, t, kind) for t in thresholds}
    full = rounds.verified
    domains = {}
    for domain in [*rounds.domains(), "all"]:
        mask = np.ones(len(rounds), dtype=bool) if domain == "all" else rounds.domain == domain
        acc = rounds.accepted[mask]
        domains[domain] = {
            "rounds": int(mask.sum()),
            "baseline": _stats(acc, full[mask]),
            "points": [dict(threshold=t, **_stats(acc, lengths[t][mask])) for t in thresholds],
        }
    return {"kind": kind, "thresholds": list(thresholds), "drafter": rounds.label, "block_size": rounds.block_size,
            "domains": domains}


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Paper Fig. 5: accepted (solid) and rejected (hatched) drafts per step as stacked bars vs threshold,
    acceptance rate on a twin axis; one panel per domain, then "all"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = result["domains"]
    thresholds = np.array(result["thresholds"], dtype=float)
    width = 0.8 * (float(np.min(np.diff(thresholds))) if thresholds.size > 1 else 0.05)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.0 * len(domains), 3.6), squeeze=False)
    top = max(max(p["verified_per_step"] for p in d["points"]) for d in domains.values())
    for ax, (name, data) in zip(axes[0], domains.items()):
        acc = np.array([p["accepted_per_step"] for p in data["points"]])
        rej = np.array([p["rejected_per_step"] for p in data["points"]])
        rate = np.array([np.nan if p["acceptance_rate"] is None else 100 * p["acceptance_rate"] for p in data["points"]])
        ax.bar(thresholds, acc, width, color="tab:blue", label="accepted")
        ax.bar(thresholds, rej, width, bottom=acc, color="white", edgecolor="tab:blue", hatch="///", label="rejected")
        ax.set_ylim(0, 1.1 * top if top > 0 else 1)
        ax.set_title(f"{name} ({data['rounds']} rounds)")
        ax.set_xlabel(f"{result['kind']} threshold")
        twin = ax.twinx()
        twin.plot(thresholds, rate, color="tab:red", marker="o", ms=3, label="acceptance rate")
        twin.set_ylim(0, 105)
        finite = np.flatnonzero(np.isfinite(rate))
        for i in (finite[:1].tolist() + finite[-1:].tolist()):
            twin.annotate(f"{rate[i]:.1f}%", (thresholds[i], rate[i]), fontsize=7, color="tab:red",
                          xytext=(0, 4), textcoords="offset points", ha="center")
        if ax is axes[0][-1]:
            twin.set_ylabel("acceptance rate (%)")
        if ax is axes[0][0]:
            ax.set_ylabel("draft tokens per step")
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")
    fig.suptitle(f"static threshold sweep, {result['drafter']} (paper Fig. 5)")
    return save_figure(fig, path)


def format_sweep_table(result: dict) -> str:
    """Text table: one row per threshold ("all" = verify everything), per domain accepted / rejected drafts
    per step and the acceptance rate (%)."""
    domains = result["domains"]
    lines = [(f"{result['kind']} threshold sweep, drafter {result['drafter']} (γ = {result['block_size']}): "
              "accepted / rejected drafts per step, acceptance %")]
    lines.append(f"{'t':>6}" + "".join(f"{name[:20]:>22}" for name in domains))
    rows = [("all", [d["baseline"] for d in domains.values()])]
    rows += [(f"{t:g}", [d["points"][i] for d in domains.values()]) for i, t in enumerate(result["thresholds"])]
    for label, cells in rows:
        text = []
        for p in cells:
            rate = "–" if p["acceptance_rate"] is None else f"{100 * p['acceptance_rate']:.1f}"
            text.append(f"{p['accepted_per_step']:>8.2f} /{p['rejected_per_step']:>5.2f} {rate:>6}")
        lines.append(f"{label:>6}" + "".join(f"{cell:>22}" for cell in text))
    return "\n".join(lines)
