"""Rendering of evaluation results: a Table-1-style τ table, the Fig. 2-style per-position plot, and the
figure writer every evaluation plot uses."""

from __future__ import annotations

from pathlib import Path

from dspark.engine.stats import SpecStats


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` (parents created), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def tau_table(report: dict) -> str:
    """Markdown table: one row per drafter, τ per data set, domain averages and the macro average."""
    results = report["drafters"]
    sets = list(dict.fromkeys(name for r in results.values() for name in r["datasets"]))
    domains = list(dict.fromkeys(d for r in results.values() for d in r["domains"]))
    header = ["drafter", *sets, *(f"{d} avg" for d in domains), "macro"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value) -> str:
        return "–" if value is None else f"{value:.2f}"

    for label, r in results.items():
        cells = [label]
        cells += [fmt(r["datasets"].get(name, {}).get("tau")) for name in sets]
        cells += [fmt(r["domains"].get(d)) for d in domains]
        cells.append(fmt(r["macro_tau"]))
        lines.append("| " + " | ".join(cells) + " |")
    for a, others in report.get("gains", {}).items():
        text = ", ".join(f"{g:+.1f} % over {b}" for b, g in others.items())
        lines.append(f"\nmacro τ of {a}: {text}")
    skipped = {name: n for name, n in report.get("skipped_too_long", {}).items() if n}
    if skipped:
        text = ", ".join(f"{name} {n}" for name, n in skipped.items())
        lines.append(f"\nprompts skipped (beyond the target's context): {text}")
    return "\n".join(lines)


def pooled_by_domain(result: dict) -> dict[str, SpecStats]:
    """Per-domain SpecStats rebuilt from the per-set counts (for the per-position plot)."""
    out: dict[str, SpecStats] = {}
    for r in result["datasets"].values():
        stats = out.setdefault(r["domain"], SpecStats())
        stats.merge(SpecStats(
            rounds=r["rounds"], verified_per_position=list(r["verified_per_position"]),
            accepted_per_position=list(r["accepted_per_position"]), reached_per_position=list(r["reached_per_position"]),
        ))
    return out


def plot_conditional_acceptance(report: dict, path: str | Path) -> Path:
    """Fig. 2: conditional acceptance per block position, one panel per domain, one line per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["drafters"]
    domains = list(dict.fromkeys(d for r in results.values() for d in r["domains"]))
    fig, axes = plt.subplots(1, max(1, len(domains)), figsize=(4.2 * max(1, len(domains)), 3.4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for label, r in results.items():
            stats = pooled_by_domain(r).get(domain)
            if stats is None or not stats.verified_per_position:
                continue
            values = stats.conditional_acceptance
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_title(domain)
        ax.set_xlabel("block position k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(slot k accepted | slots < k accepted)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"conditional acceptance per position (T = {report['settings']['temperature']})")
    return save_figure(fig, path)
