"""Reliability diagrams of the prefix survival â_k (docs/design.md §4.1, paper Fig. 6): one panel per block position,
observed acceptance frequency against mean predicted â_k per equal-width bin, before and after calibration,
with the diagonal and the bins' sample counts as a shaded background histogram. Agg canvas, no pyplot
state is touched."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dspark.calibration.metrics import DEFAULT_BINS, as_rounds, reliability_data


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def plot_reliability_data(before: Sequence[dict], path: str | Path, after: Sequence[dict] | None = None, *,
                          positions: Sequence[int] | None = None, title: str | None = None, min_points: int = 10,
                          dpi: int = 110) -> Path:
    """PNG of `reliability_data` lists (raw head `before`, optionally calibrated `after`) at `path`.

    positions: 1-based positions to draw (default every position with data); bins with fewer than
    min_points rounds are left off the curves (still in the histogram and the ECE). Returns the path.
    """
    by_position = {d["position"]: d for d in before}
    after_by_position = {d["position"]: d for d in after} if after is not None else {}
    if positions is None:
        positions = [k for k, d in sorted(by_position.items()) if d["count"] > 0]
    positions = [int(k) for k in positions]
    unknown = [k for k in positions if k not in by_position]
    if unknown:
        raise ValueError(f"positions {unknown} are not in 1..{len(by_position)}")
    if not positions:
        raise ValueError("no block position has verified rounds to plot")
    ncols = min(4, len(positions))
    nrows = math.ceil(len(positions) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 3.3 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles = []
    for i, ax in enumerate(axes.ravel()):
        if i >= len(positions):
            ax.set_visible(False)
            continue
        k = positions[i]
        raw, cal = by_position[k], after_by_position.get(k)
        shown = cal if cal is not None else raw
        hist = ax.twinx()
        width = [u - lo for lo, u in zip(shown["lower"], shown["upper"])]
        hist.bar(shown["lower"], shown["count_per_bin"], width=width, align="edge", color="0.55", alpha=0.18)
        hist.set_yticks([])
        hist.set_ylim(0, max(1, max(shown["count_per_bin"])) * 1.05)
        ax.set_zorder(hist.get_zorder() + 1)
        ax.patch.set_visible(False)
        handles = [ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="Perfect calibration")[0]]
        for data, color, label in ((raw, "tab:red", "Before calibration"), (cal, "tab:blue", "After calibration")):
            if data is None:
                continue
            points = [(p, o) for p, o, n in zip(data["mean_predicted"], data["observed"], data["count_per_bin"])
                      if p is not None and n >= min_points]
            xs, ys = [p for p, _ in points], [o for _, o in points]
            handles.append(ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=color, label=label)[0])
        ece = _percent(raw["ece"]) + (f" → {_percent(cal['ece'])}" if cal is not None else "")
        auc = "n/a" if raw["auc"] is None else f"{raw['auc']:.3f}"
        ax.text(0.03, 0.97, f"ECE: {ece}\nAUC: {auc}\nn = {raw['count']}", transform=ax.transAxes, va="top",
                fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"Position {k}", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("Observed acceptance")
        if i >= (nrows - 1) * ncols or i + ncols >= len(positions):
            ax.set_xlabel("Predicted acceptance")
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_reliability(rounds: Any, path: str | Path, calibration: Any = None, *, positions: Sequence[int] | None = None,
                     bins: int = DEFAULT_BINS, title: str | None = None, min_points: int = 10, dpi: int = 110) -> Path:
    """Reliability diagram PNG of the rounds (`Rounds` or a (confidences, verified, accepted) triple):
    raw head, plus the head calibrated with `calibration` (a `ConfidenceMap` or temperatures [γ]) when
    given (paper Fig. 6)."""
    r = as_rounds(rounds)
    before = reliability_data(r, None, bins)
    after = reliability_data(r, calibration, bins) if calibration is not None else None
    return plot_reliability_data(before, path, after, positions=positions, title=title, min_points=min_points, dpi=dpi)
