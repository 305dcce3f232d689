#!/usr/bin/env python
"""Compare the calibration methods (docs/design.md §4): the paper's STS against per-position Platt scaling.

For each sampling temperature of the `--calibration-traces` (raw-head rounds from `dspark eval --calibration
none --out DIR`, one temperature per file), both methods are fitted on one half of the prompts and scored on
the other half (`dspark.calibration.fitting.fit_regime`, as `dspark calibrate` does), then applied to the
raw head of every `--eval-traces` file recorded at the same temperature (its recorded calibration undone).
Reported per (temperature, data, method): mean ECE (20 bins) and Brier score of the prefix-survival
prediction over the γ positions, the ECE's noise floor (what a perfectly calibrated head would score on
that many rounds with those predictions; raw rows of the held-out half have none), mean predicted vs
observed survival, and the fitted maps.

One more row per data set measures a candidate that dspark does not ship yet, "platt+prefix-bins": the
Platt map, then per position k a histogram map of the prefix survival â_k itself (HISTOGRAM_BINS equal-mass
bins fitted on the same half, each predicting its bins' observed survival; non-increasing in k). Under greedy
verification slot outcomes are strongly correlated (loops are accepted whole), so the product of calibrated
conditional scores is miscalibrated in a way no per-position monotone map of the scores can remove (docs/
benchmarks.md, calibration); this row measures how far a map of the prefix survival gets.

    .venv/bin/python benchmarks/bench_calibration.py \\
        --calibration-traces benchmarks/results/calibration_traces_t1.json \\
        --calibration-traces benchmarks/results/calibration_traces_t0.json \\
        --eval-traces benchmarks/results/eval_builtin_t1/traces.json \\
        --eval-traces benchmarks/results/eval_builtin_t0/traces.json --drafter dspark
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from dspark.calibration import METHODS, Rounds, position_metrics  # noqa: E402
from dspark.calibration.fitting import fit_regime  # noqa: E402
from dspark.calibration.metrics import (  # noqa: E402
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    prefix_survival,
    survival_events,
    valid_round_mask,
)
from dspark.calibration.sts import fit_map, split_rounds  # noqa: E402

HISTOGRAM_BINS = 10
from dspark.evaluation.traces import drafter_rounds, load_traces  # noqa: E402


def _entry(path: str, label: str | None) -> tuple[str, dict]:
    traces = load_traces(path)
    if label is not None:
        if label not in traces:
            sys.exit(f"{path}: no drafter {label!r}; it has {', '.join(traces)}")
        return label, traces[label]
    name = next((n for n, e in traces.items() if e.get("has_confidences")), None)
    if name is None:
        sys.exit(f"{path}: no drafter with confidences")
    return name, traces[name]


def _summary(metrics: dict) -> dict:
    mean = metrics["mean"]
    return {"ece": mean["ece"], "ece_floor": mean.get("ece_floor"), "brier": mean["brier"],
            "mean_predicted": mean["mean_predicted"], "mean_observed": mean["mean_observed"],
            "ece_per_position": [p["ece"] for p in metrics["positions"]]}


def prefix_bins_fit(fit: Rounds, cmap) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position: (bin edges, observed prefix survival per bin) of â_k under `cmap`, equal-mass bins."""
    pred, (outcome, mask) = prefix_survival(fit.confidences, cmap), survival_events(fit)
    out = []
    for j in range(fit.block_size):
        x, y = pred[mask[:, j], j], outcome[mask[:, j], j]
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)))
        index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        out.append((edges, np.array([y[index == i].mean() if (index == i).any() else 0.0 for i in range(len(edges) - 1)])))
    return out


def prefix_bins_summary(held: Rounds, cmap, bins: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The `_summary` fields of the candidate map on `held` (mean over positions)."""
    pred, (outcome, mask) = prefix_survival(held.confidences, cmap), survival_events(held)
    mapped, previous = np.full(pred.shape, np.nan), np.ones(len(held))
    for j, (edges, values) in enumerate(bins):
        index = np.clip(np.searchsorted(edges, pred[:, j], side="right") - 1, 0, len(edges) - 2)
        mapped[:, j] = np.minimum(values[index], previous)
        previous = mapped[:, j]
    ece, floor, brier, predicted, observed = [], [], [], [], []
    for j in range(held.block_size):
        p, y = mapped[mask[:, j], j], outcome[mask[:, j], j]
        if p.size:
            ece.append(expected_calibration_error(p, y))
            floor.append(ece_noise_floor(p))
            brier.append(brier_score(p, y))
            predicted.append(float(p.mean()))
            observed.append(float(y.mean()))
    return {"ece": float(np.mean(ece)), "ece_floor": float(np.mean(floor)), "brier": float(np.mean(brier)),
            "mean_predicted": float(np.mean(predicted)), "mean_observed": float(np.mean(observed)),
            "ece_per_position": ece}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-traces", action="append", required=True)
    parser.add_argument("--eval-traces", action="append", default=[])
    parser.add_argument("--drafter", default=None, help="drafter label in the traces (default: the first with confidences)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_methods.json"))
    args = parser.parse_args()

    rows = []
    for path in args.calibration_traces:
        name, entry = _entry(path, args.drafter)
        if entry.get("confidence_temperatures") is not None:
            sys.exit(f"{path}: recorded with a calibrated head; record with --calibration none")
        recorded = drafter_rounds({name: entry}, name, path)
        temperature = recorded.sampling_temperature
        maps = {}
        for method in METHODS:
            regime = fit_regime(recorded.fit_data(), temperature, method=method)
            maps[method] = regime.map
            if method == METHODS[0]:
                rows.append({"temperature": temperature, "data": f"{Path(path).name}, held-out half", "method": "raw",
                             **_summary(regime.ece_before)})
            rows.append({"temperature": temperature, "data": f"{Path(path).name}, held-out half", "method": method,
                         **_summary(regime.ece_after), "temperatures": regime.temperatures,
                         "biases": regime.map.biases.tolist()})
        data = recorded.fit_data()
        keep = valid_round_mask(data.confidences, data.verified, data.accepted)  # as fit_regime: same split
        fit, held = split_rounds(Rounds(data.confidences[keep], data.verified[keep], data.accepted[keep]), 0.5, 0,
                                 data.prompt[keep])
        platt = fit_map(fit, method="platt")
        candidate = (platt, prefix_bins_fit(fit, platt))
        rows.append({"temperature": temperature, "data": f"{Path(path).name}, held-out half",
                     "method": "platt+prefix-bins", **prefix_bins_summary(held, *candidate)})
        for eval_path in args.eval_traces:
            eval_name, eval_entry = _entry(eval_path, args.drafter or name)
            if float(eval_entry["temperature"]) != temperature:
                continue
            recorded = drafter_rounds(load_traces(eval_path), eval_name, eval_path)
            raw = Rounds.from_arrays(recorded.raw_confidences(), recorded.verified, recorded.accepted, drop_invalid=True)
            for method, cmap in (("raw", None), *maps.items()):
                rows.append({"temperature": temperature, "data": eval_path, "method": method,
                             **_summary(position_metrics(raw, cmap, noise_floor=True))})
            rows.append({"temperature": temperature, "data": eval_path, "method": "platt+prefix-bins",
                         **prefix_bins_summary(raw, *candidate)})
    report = {
        "benchmark": "calibration_methods",
        "date": dt.date.today().isoformat(),
        "machine": platform.platform(),
        "calibration_traces": args.calibration_traces,
        "eval_traces": args.eval_traces,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| T | data | method | mean ECE % | noise floor % | Brier | mean predicted / observed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        floor = "–" if r["ece_floor"] is None else f"{100 * r['ece_floor']:.2f}"
        print(f"| {r['temperature']:g} | {r['data']} | {r['method']} | {100 * r['ece']:.2f} | {floor} | {r['brier']:.4f} | "
              f"{r['mean_predicted']:.3f} / {r['mean_observed']:.3f} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
