"""Trace replay and a discrete-time serving simulator (docs/design.md §5; paper §5, Fig. 7 and Fig. 8).

Traces are the per-round records of `dspark eval --out DIR` (DIR/traces.json; format, reader and checks in
`dspark.evaluation.traces`): per drafter, per data set, each round's drafted / verified / accepted /
emitted counts and the drafter's confidences c_1..c_γ, recorded with verify-all.

Replay fact. In a verify-all round the target checks every drafted slot, and rejection sampling decides
slot k from its own randomness, independently of how many later slots are verified. So if a policy
verifies only ℓ ≤ drafted slots of that round, it accepts min(accepted_all, ℓ) drafts and emits
min(accepted_all, ℓ) + 1 tokens (the correction or bonus token). Stop tokens and length cuts are ignored:
a replayed round always emits accepted + 1. ℓ is also capped by the recorded verified count (equal to
drafted in verify-all traces), beyond which the outcome is unknown. A replayed round keeps the rest of the trace unchanged (the
next round is the recorded one), i.e. rounds are treated as draws of decoding states.

Simulator. At concurrency C, C request streams step together for max(steps, ⌈min_rounds / C⌉) steps.
Each stream walks through the rounds of randomly drawn prompts (the first one from a random round, then
whole prompts; stream s seeded by (seed, s), so every C shares its first streams with the larger ones), a
new request id per prompt. Each step, the policy picks ℓ_r for every stream from its round's recorded confidences;
the step costs verify_ms(B = Σ_r (1 + ℓ_r) tokens, R = C requests) + draft_ms(C) milliseconds (the SPS
profile, `dspark.scheduling.sps`; drafter and target run one after the other), and stream r emits min(accepted_r, ℓ_r) + 1
tokens. Every policy of one C replays the same round sequence (paired comparison). Confidence policies see
the confidences as recorded (calibrated when the recording applied a calibration) or, with online
calibration, the raw head's under the map an `OnlineCalibrator` refits from the replayed outcomes as the
engine would (docs/design.md §4.3). Reported per (C, policy):

* throughput_tok_s — all emitted tokens / simulated time (tokens/s);
* per_user_tok_s — mean over streams of the stream's tokens / simulated time (tokens/s per user; all
  streams share every step, so this is throughput / C);
* mean_budget — mean ℓ, draft tokens verified per request per step (the paper's Fig. 8 budget counts the
  target forward's 1 + ℓ tokens: `mean_budget_tokens`);
* mean_step_ms, tokens_per_step (per request), acceptance_rate (accepted / verified drafts).

Policies: plain decoding (ℓ = 0, no drafter cost); fixed-n (ℓ = min(n, drafted)); verify-all;
threshold-t (longest prefix with every c_k ≥ t); algorithm-1 (docs/design.md §5.2 as published); causal-greedy
(Algorithm 1 with the staircase lookahead of `CausalGreedy`, the default);
causal-greedy-gated (Algorithm 1 behind `dspark.scheduling.gate.DraftGate`: a step the gate skips runs no
drafter, costs verify_ms(C) only and emits one token per stream); async-topk (docs/design.md §5.4); mtp-1 — the traces' MTP-1 drafter (block size 1, label containing "mtp") verifying 1 token,
or, without one, the DSpark rounds cut to their first slot; its draft cost is draft_ms(C) · scale with
scale = 1 / draft_layers of the profile (one drafter layer instead of the profile drafter's five).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark.calibration.online import OnlineCalibrator
from dspark.calibration.sts import DEFAULT_METHOD
from dspark.errors import ConfigError
from dspark.evaluation.report import save_figure
from dspark.evaluation.traces import RecordedRounds
from dspark.scheduling import (
    AsyncTopK,
    ConfidenceThreshold,
    FixedLength,
    SPSProfile,
    VerifyAll,
)
from dspark.scheduling.controller import SpeculationController
from dspark.scheduling.gate import DraftGate
from dspark.scheduling.named import CONFIDENCE_POLICIES, PolicySpec, make_policy, parse_policies

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_STEPS = 400
DEFAULT_MIN_ROUNDS = 4096  # request-rounds per concurrency at least (more steps at low C)
DEFAULT_POLICIES = "plain,fixed,verify-all,threshold-0.5,algorithm-1,causal-greedy,causal-greedy-gated,async-topk,mtp-1"
RECORD_SETS = ("corpus-code", "corpus-prose", "gsm8k", "mbpp", "mt-bench")
MATCHED_SPEED_GOAL = 1.6  # per-user speed vs MTP-1 at matched throughput (docs/design.md §5.6: +57–85 %)
TIE_TOLERANCE = 0.005  # goal (a): a margin ≥ −0.5 % is a tie (at low load CG and the best fixed length agree)


def record_builtin_traces(drafters: Sequence[str] = ("dspark",), datasets: Sequence[str] = RECORD_SETS, *,
                          limit: int = 6, max_new_tokens: int = 128, temperature: float = 1.0, seed: int = 0,
                          data_dir: str | None = None, device: str = "auto", dtype: str | None = None,
                          progress: bool = True) -> dict:
    """Record verify-all traces with the built-in target and drafters at sampling `temperature` (the built-in
    calibration's regime for it applied to the confidences). Sets that are not found are skipped."""
    from dspark.evaluation.datasets import default_data_dir, load_set, resolve_set
    from dspark.evaluation.offline import EvalSettings, evaluate
    from dspark.models.zoo import resolve_drafter, resolve_target

    folder = Path(data_dir) if data_dir else default_data_dir()
    sets = []
    for spec in datasets:
        name, domain, path = resolve_set(spec, folder)
        if path.is_file():
            sets.append(load_set(name, domain, path, limit=limit, seed=seed))
    if not sets:
        raise ConfigError(f"no prompt set found to record traces ({', '.join(datasets)}); give --traces FILE")
    settings = EvalSettings(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    _, traces = evaluate(resolve_target(None), [resolve_drafter(d) for d in drafters], sets, settings,
                         device=device, dtype=dtype, progress=progress)
    return traces


# -------------------------------------------------------------------------------------------------
# Replay
# -------------------------------------------------------------------------------------------------

def replay(accepted: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Verify-all round with `accepted` drafts replayed at ℓ = `lengths` → (accepted, emitted) = (min(a, ℓ),
    min(a, ℓ) + 1) (module docstring)."""
    acc = np.minimum(np.asarray(accepted), np.asarray(lengths))
    return acc, acc + 1


def mtp_draft_scale(profile: SPSProfile, override: float | None = None) -> tuple[float, str]:
    """(factor on draft_ms(C) for MTP-1, how it was chosen): `override`, else 1 / the profile's draft_layers."""
    if override is not None:
        if not math.isfinite(override) or override < 0:
            raise ConfigError(f"--mtp-draft-scale must be a finite number ≥ 0, got {override}")
        return float(override), "given (--mtp-draft-scale)"
    layers = profile.metadata.get("draft_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1:
        return 1.0 / layers, f"1 / draft_layers ({layers}) of the profile: one MTP layer"
    return 1.0, "the profile records no draft_layers: MTP-1 charged the full drafter step"


# -------------------------------------------------------------------------------------------------
# Simulation
# -------------------------------------------------------------------------------------------------

def stream_rounds(prompts: list[np.ndarray], streams: int, steps: int, seed: int = 0,
                  salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """C streams × `steps` rounds → (round index [steps, C], request id [steps, C]). Each stream starts at a
    random round of a random prompt, then walks whole randomly drawn prompts; one request id per prompt.
    Stream s draws from its own generator (seed, salt, s), so a smaller C replays a subset of the streams of
    a larger one (common random numbers across concurrencies)."""
    rounds = np.empty((steps, streams), dtype=np.int64)
    ids = np.empty((steps, streams), dtype=np.int64)
    next_id = 0
    for s in range(streams):
        rng = np.random.default_rng([seed, salt, s])
        parts, id_parts, have = [], [], 0
        while have < steps:
            p = prompts[int(rng.integers(len(prompts)))]
            if not parts:
                p = p[int(rng.integers(p.size)):]
            parts.append(p)
            id_parts.append(np.full(p.size, next_id))
            next_id += 1
            have += p.size
        rounds[:, s] = np.concatenate(parts)[:steps]
        ids[:, s] = np.concatenate(id_parts)[:steps]
    return rounds, ids


def _lengths(controller: SpeculationController, rounds: RecordedRounds, idx: np.ndarray, ids: np.ndarray,
             limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ℓ [steps, C], drafted [steps] bool) from the controller the engine would use: each step its gate
    decides from earlier steps whether the drafter runs; if it does, its policy picks ℓ from the confidences,
    and the gate and the online calibrator observe the replayed outcome. The policy sees the confidences as
    recorded, or — with online calibration (docs/design.md §4.3) — the raw head's under the calibrator's current map,
    as in `dspark.engine.step`. A row-wise policy with neither gate nor calibrator is planned for all steps
    in one call."""
    steps, count = idx.shape
    full = rounds.verified if limit is None else np.minimum(rounds.verified, limit)
    drafted = np.ones(steps, dtype=bool)
    online = controller.online is not None
    if online:
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = rounds.raw_confidences()
            logits = np.log(raw) - np.log1p(-raw)
    if not online and controller.gate is None and isinstance(controller.policy, (FixedLength, VerifyAll, ConfidenceThreshold)):
        flat = idx.reshape(-1)
        plan = controller.plan(None, torch.from_numpy(rounds.drafted[flat]), torch.from_numpy(full[flat]), None,
                               calibrated=torch.from_numpy(rounds.confidences[flat]))
        return plan.lengths.numpy().reshape(steps, count), drafted
    out = np.zeros((steps, count), dtype=np.int64)
    for t in range(steps):
        row = idx[t]
        if not controller.should_draft(count):
            drafted[t] = False
            continue
        step_logits = torch.from_numpy(logits[row]) if online else None
        plan = controller.plan(step_logits, torch.from_numpy(rounds.drafted[row]), torch.from_numpy(full[row]), ids[t],
                               calibrated=None if online else torch.from_numpy(rounds.confidences[row]))
        out[t] = plan.lengths.numpy()
        controller.observe(plan, torch.from_numpy(np.minimum(rounds.accepted[row], out[t])), confidence_logits=step_logits)
        if isinstance(controller.policy, AsyncTopK) and t + 1 < steps:
            for rid in np.unique(ids[t][ids[t] != ids[t + 1]]):
                controller.release(int(rid))
    return out, drafted


def _point(spec: PolicySpec, c: int, ell: np.ndarray, acc_all: np.ndarray, verify_table: np.ndarray,
           draft_ms: float | np.ndarray) -> dict:
    """draft_ms: the drafter's cost per step (a scalar, or [steps] when a gate skips some steps)."""
    accepted, emitted = replay(acc_all, ell)
    batch = c + ell.sum(1)  # B per step
    step_ms = verify_table[batch - c] + draft_ms
    total_s = float(step_ms.sum()) / 1000.0
    per_stream = emitted.sum(0)
    verified = int(ell.sum())
    return {
        "policy": spec.name, "concurrency": c, "steps": int(ell.shape[0]),
        "throughput_tok_s": float(per_stream.sum()) / total_s,
        "per_user_tok_s": float(per_stream.mean()) / total_s,
        "mean_budget": float(ell.mean()),
        "mean_budget_tokens": 1.0 + float(ell.mean()),
        "mean_step_ms": float(step_ms.mean()),
        "tokens_per_step": float(emitted.mean()),
        "acceptance_rate": float(accepted.sum()) / verified if verified else None,
    }


def simulate(rounds: RecordedRounds, profile: SPSProfile, *, concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
             steps: int = DEFAULT_STEPS, min_rounds: int = DEFAULT_MIN_ROUNDS,
             policies: Sequence[PolicySpec] | None = None, seed: int = 0, mtp_rounds: RecordedRounds | None = None,
             mtp_scale: float | None = None, online_calibration: int | None = None,
             calibration_method: str = DEFAULT_METHOD) -> dict:
    """Run every policy at every concurrency (module docstring) → {"settings", "policies": {name: [points by C]},
    "notes"}. `rounds`: the DSpark traces; each concurrency C runs max(steps, ⌈min_rounds / C⌉) steps (so low
    concurrencies still average over many prompts); `mtp_rounds`: MTP-1 traces (else DSpark's first slot);
    `mtp_scale`: factor on draft_ms for MTP-1 (default `mtp_draft_scale(profile)`); `online_calibration` N:
    every confidence policy runs with an `OnlineCalibrator` (`calibration_method`) that starts from the
    recorded calibration and refits every N verified rounds (window 4N), a fresh one per concurrency (its
    point reports the refits and the final map)."""
    if policies is None:
        policies = parse_policies(DEFAULT_POLICIES, rounds.block_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be an integer ≥ 1, got {steps!r}")
    if isinstance(min_rounds, bool) or not isinstance(min_rounds, int) or min_rounds < 0:
        raise ConfigError(f"--min-rounds must be an integer ≥ 0, got {min_rounds!r}")
    concurrency = sorted({int(c) for c in concurrency})
    if not concurrency or concurrency[0] < 1:
        raise ConfigError("--concurrency: give request counts ≥ 1")
    if online_calibration is not None and (isinstance(online_calibration, bool) or not isinstance(online_calibration, int)
                                           or online_calibration < 1):
        raise ConfigError(f"--online-calibration must be an integer ≥ 1, got {online_calibration!r}")
    if online_calibration is not None and not rounds.has_confidences:
        raise ConfigError("--online-calibration needs traces with confidences")
    scale, scale_note = mtp_draft_scale(profile, mtp_scale)
    prompts = rounds.prompts()
    mtp_source = mtp_rounds if mtp_rounds is not None else rounds
    mtp_prompts = mtp_source.prompts() if mtp_rounds is not None else prompts
    block_size = max(rounds.block_size, 1)
    results: dict[str, list[dict]] = {spec.name: [] for spec in policies}
    for c in concurrency:
        n_steps = max(steps, -(-min_rounds // c))
        idx, ids = stream_rounds(prompts, c, n_steps, seed)
        if any(spec.kind == "mtp-1" for spec in policies):
            midx, mids = stream_rounds(mtp_prompts, c, n_steps, seed, 1) if mtp_rounds is not None else (idx, ids)
        b = np.arange(c, c * (1 + block_size) + 1, dtype=np.float64)
        verify_table = np.maximum.accumulate(np.asarray(profile.verify_ms(b, c), dtype=np.float64))
        draft = profile.draft_ms(c)
        for spec in policies:
            controller = SpeculationController(policy=make_policy(spec, profile))
            if online_calibration is not None and spec.kind in CONFIDENCE_POLICIES:
                controller.online = OnlineCalibrator(block_size, refit_every=online_calibration, window=4 * online_calibration,
                                                     initial=rounds.calibration, method=calibration_method)
                controller.set_regime(None, controller.online.calibration)
            if spec.kind == "plain":
                ell = np.zeros_like(idx)
                point = _point(spec, c, ell, rounds.accepted[idx], verify_table, 0.0)
            elif spec.kind == "causal-greedy-gated":
                controller.gate = DraftGate(profile)
                ell, drafted = _lengths(controller, rounds, idx, ids, None)
                point = _point(spec, c, ell, rounds.accepted[idx], verify_table, draft * drafted)
                point["drafted_fraction"] = float(drafted.mean())
            elif spec.kind == "mtp-1":
                ell, _ = _lengths(controller, mtp_source, midx, mids, 1)
                point = _point(spec, c, ell, mtp_source.accepted[midx], verify_table, draft * scale)
            else:
                ell, _ = _lengths(controller, rounds, idx, ids, None)
                point = _point(spec, c, ell, rounds.accepted[idx], verify_table, draft)
            calibrator = controller.online
            if calibrator is not None:
                point["online_calibration"] = {"refits": calibrator.refits, "temperatures": calibrator.temperatures.tolist(),
                                               "biases": calibrator.biases.tolist()}
            results[spec.name].append(point)
    notes = []
    if not profile.has_draft_cost:
        notes.append("the profile has no draft_ms table: drafting is free in this simulation")
    mtp_note = (f"MTP-1 from the traces' drafter {mtp_rounds.label!r}" if mtp_rounds is not None else
                "no MTP-1 drafter in the traces: MTP-1 approximated by the DSpark rounds cut to their first slot")
    if any(spec.kind == "mtp-1" for spec in policies):
        notes.append(mtp_note)
    if online_calibration is not None:
        start = "the recorded calibration" if rounds.calibration is not None else "the raw head"
        notes.append(f"online calibration: confidence policies refit {calibration_method} every {online_calibration} "
                     f"rounds from {start}")
    return {
        "settings": {"concurrency": concurrency, "steps": steps, "min_rounds": min_rounds, "seed": seed, "block_size": rounds.block_size,
                     "online_calibration": online_calibration,
                     "online_calibration_method": calibration_method if online_calibration is not None else None,
                     "mtp_draft_scale": scale, "mtp_draft_scale_source": scale_note,
                     "step_ms": "verify_ms(B = Σ(1 + ℓ), R = C) + draft_ms(C); plain: no draft cost"},
        "traces": {"drafter": rounds.label, "rounds": len(rounds), "prompts": len(prompts), "sets": rounds.sets,
                   "mtp_drafter": None if mtp_rounds is None else mtp_rounds.label,
                   "mtp_rounds": None if mtp_rounds is None else len(mtp_rounds)},
        "policies": results,
        "notes": notes,
    }


# -------------------------------------------------------------------------------------------------
# Goals (issue item 8; docs/design.md §5.6)
# -------------------------------------------------------------------------------------------------

def frontier(points: Sequence[dict], x: str = "throughput_tok_s", y: str = "per_user_tok_s") -> tuple[np.ndarray, np.ndarray]:
    """Pareto frontier of (x, y) points (no other point has both larger x and larger y), by ascending x."""
    pts = sorted(((p[x], p[y]) for p in points), key=lambda q: (q[0], -q[1]))
    keep, best = [], -math.inf
    for px, py in reversed(pts):
        if py > best:
            keep.append((px, py))
            best = py
    keep.reverse()
    return np.array([k[0] for k in keep]), np.array([k[1] for k in keep])


def matched_ratios(ours: Sequence[dict], base: Sequence[dict], x: str, y: str) -> list[dict]:
    """y(ours) / y(base) at equal x, where the x ranges of both frontiers overlap: each of our points
    against the base frontier interpolated linearly in x, and each base point against ours."""
    ox, oy = frontier(ours, x, y)
    bx, by = frontier(base, x, y)
    out = []
    if ox.size == 0 or bx.size == 0:
        return out
    for (px, py, fx, fy, mine) in ((ox, oy, bx, by, True), (bx, by, ox, oy, False)):
        for xv, yv in zip(px, py):
            if fx[0] <= xv <= fx[-1]:
                other = float(np.interp(xv, fx, fy))
                ours_y, base_y = (yv, other) if mine else (other, yv)
                if base_y > 0:
                    out.append({x: float(xv), "ours": float(ours_y), "base": float(base_y),
                                "ratio": float(ours_y / base_y), "from": "ours" if mine else "base"})
    return sorted(out, key=lambda r: r[x])


def goals(result: dict, policy: str = "causal-greedy") -> dict:
    """Targets for `policy` (issue item 8): (a) throughput ≥ max(plain, every fixed length) at every
    concurrency (margin = ours / best − 1; "met" allows ties within TIE_TOLERANCE); (b) per-user tokens/s at the lowest concurrency (1) vs the best fixed length; (c) per-user
    tokens/s vs MTP-1 at matched throughput (goal ≥ 1.6×), plus throughput vs MTP-1 at matched per-user
    speed."""
    pol = result["policies"]
    if policy not in pol:
        return {"available": False, "reason": f"policy {policy!r} was not simulated"}
    ours = {p["concurrency"]: p for p in pol[policy]}
    baselines = [name for name in pol if name == "plain" or name.startswith("fixed-")]
    fixed = [name for name in pol if name.startswith("fixed-")]
    out: dict[str, Any] = {"policy": policy, "available": True}
    if baselines:
        rows = []
        for c, p in ours.items():
            best = max(baselines, key=lambda n: next(q for q in pol[n] if q["concurrency"] == c)["throughput_tok_s"])
            best_thr = next(q for q in pol[best] if q["concurrency"] == c)["throughput_tok_s"]
            rows.append({"concurrency": c, "throughput": p["throughput_tok_s"], "best_baseline": best,
                         "best_baseline_throughput": best_thr, "margin": p["throughput_tok_s"] / best_thr - 1.0})
        out["a_throughput_vs_plain_and_fixed"] = {
            "goal": "throughput ≥ max(plain, every fixed length) at every concurrency",
            "met": all(r["margin"] >= -TIE_TOLERANCE for r in rows), "tie_tolerance": TIE_TOLERANCE,
            "met_strictly": all(r["margin"] >= 0 for r in rows), "min_margin": min(r["margin"] for r in rows),
            "failing_concurrency": [r["concurrency"] for r in rows if r["margin"] < -TIE_TOLERANCE], "points": rows}
    else:
        out["a_throughput_vs_plain_and_fixed"] = {"met": None, "reason": "neither plain nor a fixed length simulated"}
    c0 = min(ours)
    if fixed:
        best = max(fixed, key=lambda n: next(q for q in pol[n] if q["concurrency"] == c0)["per_user_tok_s"])
        best_pu = next(q for q in pol[best] if q["concurrency"] == c0)["per_user_tok_s"]
        out["b_per_user_at_lowest_concurrency"] = {
            "goal": "per-user tokens/s at concurrency 1 ≈ the best fixed length (ratio ≈ 1 or above)",
            "concurrency": c0, "per_user": ours[c0]["per_user_tok_s"], "best_fixed": best,
            "best_fixed_per_user": best_pu, "ratio": ours[c0]["per_user_tok_s"] / best_pu}
    else:
        out["b_per_user_at_lowest_concurrency"] = {"ratio": None, "reason": "no fixed length simulated"}
    if "mtp-1" in pol:
        speed = matched_ratios(pol[policy], pol["mtp-1"], "throughput_tok_s", "per_user_tok_s")
        thr = matched_ratios(pol[policy], pol["mtp-1"], "per_user_tok_s", "throughput_tok_s")
        ratios = [r["ratio"] for r in speed]
        out["c_per_user_vs_mtp1_at_matched_throughput"] = {
            "goal": f"per-user tokens/s ≥ {MATCHED_SPEED_GOAL}× MTP-1's at the same aggregate throughput",
            "met": (min(ratios) >= MATCHED_SPEED_GOAL) if ratios else None,
            "min_ratio": min(ratios) if ratios else None, "max_ratio": max(ratios) if ratios else None,
            "median_ratio": float(np.median(ratios)) if ratios else None, "points": speed,
            "throughput_ratio_at_matched_per_user": {
                "min": min(r["ratio"] for r in thr) if thr else None,
                "max": max(r["ratio"] for r in thr) if thr else None, "points": thr},
        }
        if not ratios:
            out["c_per_user_vs_mtp1_at_matched_throughput"]["reason"] = "the throughput ranges do not overlap"
    else:
        out["c_per_user_vs_mtp1_at_matched_throughput"] = {"met": None, "reason": "mtp-1 was not simulated"}
    return out


# -------------------------------------------------------------------------------------------------
# Rendering
# -------------------------------------------------------------------------------------------------

def _style(name: str, fixed_names: list[str]):
    import matplotlib.pyplot as plt

    if name.startswith("fixed-"):
        k = fixed_names.index(name)
        shade = plt.cm.Greys(0.35 + 0.5 * k / max(1, len(fixed_names) - 1))
        return {"color": shade, "lw": 1.0, "ms": 3, "alpha": 0.9}
    colors = {"plain": "black", "ar": "black", "verify-all": "tab:brown", "causal-greedy": "tab:red",
              "async-topk": "tab:orange", "mtp-1": "tab:blue", "mtp": "tab:blue"}
    return {"color": colors.get(name, "tab:green"), "lw": 2.2 if name == "causal-greedy" else 1.6, "ms": 4}


def plot_frontier(result: dict, path: str | Path, title: str = "") -> Path:
    """Paper Fig. 7: aggregate throughput (tokens/s) vs per-user tokens/s, one curve per policy through the
    concurrency points (C written next to the causal-greedy points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = result["policies"]
    fixed_names = [n for n in pol if n.startswith("fixed-")]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for name, points in pol.items():
        xs = [p["per_user_tok_s"] for p in points]
        ys = [p["throughput_tok_s"] for p in points]
        ax.plot(xs, ys, marker="o", label=name, **_style(name, fixed_names))
        if name == "causal-greedy":
            for p in points:
                ax.annotate(f"C={p['concurrency']}", (p["per_user_tok_s"], p["throughput_tok_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("per-user generation speed (tokens/s/user)")
    ax.set_ylabel("aggregate throughput (tokens/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "throughput vs per-user speed (paper Fig. 7)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_budget(result: dict, path: str | Path, title: str = "") -> Path:
    """Paper Fig. 8: (a) aggregate throughput and (b) mean draft tokens verified per request (ℓ) vs
    concurrency (log2 axis), one curve per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = result["policies"]
    fixed_names = [n for n in pol if n.startswith("fixed-")]
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 7.4), sharex=True)
    for name, points in pol.items():
        cs = [p["concurrency"] for p in points]
        style = _style(name, fixed_names)
        axes[0].plot(cs, [p["throughput_tok_s"] for p in points], marker="o", label=name, **style)
        axes[1].plot(cs, [p["mean_budget"] for p in points], marker="o", label=name, **style)
    axes[0].set_ylabel("aggregate throughput (tokens/s)")
    axes[1].set_ylabel("verified drafts per request, mean ℓ\n(paper's budget = 1 + ℓ)")
    axes[1].set_xlabel("concurrent requests")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(result["settings"]["concurrency"])
    axes[1].set_xticklabels([str(c) for c in result["settings"]["concurrency"]])
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title(title or "load-adaptive throughput and verification budget (paper Fig. 8)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def simulation_table(result: dict, goal: dict | None = None, gated_goal: dict | None = None) -> str:
    """Short text table: throughput (tokens/s) per concurrency for the main policies, CG per-user speed
    and budget, then the goals (of Algorithm 1, and of Algorithm 1 behind the draft gate when given)."""
    pol = result["policies"]
    fixed = [n for n in pol if n.startswith("fixed-")]
    cols = [n for n in ("plain", "verify-all") if n in pol] + [n for n in pol if n.startswith("threshold-")]
    cols += [n for n in ("async-topk", "mtp-1", "algorithm-1", "causal-greedy", "causal-greedy-gated") if n in pol]
    short = {"causal-greedy-gated": "CG gated"}
    header = f"{'C':>5} " + "".join(f"{short.get(n, n)[:13]:>14}" for n in cols)
    if fixed:
        header += f"{'best fixed':>17}"
    if "causal-greedy" in pol:
        header += f"{'CG tok/s/user':>14}{'CG ℓ':>7}"
    lines = ["aggregate throughput (tokens/s)", header]
    for i, c in enumerate(result["settings"]["concurrency"]):
        row = f"{c:>5} " + "".join(f"{pol[n][i]['throughput_tok_s']:>14.0f}" for n in cols)
        if fixed:
            best = max(fixed, key=lambda n: pol[n][i]["throughput_tok_s"])
            row += f"{pol[best][i]['throughput_tok_s']:>10.0f} ({best[6:]:>2}) "
        if "causal-greedy" in pol:
            p = pol["causal-greedy"][i]
            row += f"{p['per_user_tok_s']:>14.1f}{p['mean_budget']:>7.2f}"
        lines.append(row)
    for label, g in (("CG", goal), ("CG gated", gated_goal)):
        lines.extend(_goal_lines(label, g))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _goal_lines(label: str, goal: dict | None) -> list[str]:
    if not goal or not goal.get("available"):
        return []
    lines = []
    a = goal["a_throughput_vs_plain_and_fixed"]
    b = goal["b_per_user_at_lowest_concurrency"]
    c = goal["c_per_user_vs_mtp1_at_matched_throughput"]
    if a.get("met") is not None:
        fails = ", ".join(f"C={c}" for c in a["failing_concurrency"])
        lines.append(f"(a) {label} throughput ≥ max(plain, fixed) at every C: {'met' if a['met'] else 'NOT met'} "
                     f"(min margin {100 * a['min_margin']:+.1f} %{'; below at ' + fails if fails else ''})")
    if b.get("ratio") is not None:
        lines.append(f"(b) {label} per-user speed at C={b['concurrency']} / best fixed ({b['best_fixed']}): {b['ratio']:.3f}")
    if c.get("min_ratio") is not None:
        lines.append(f"(c) {label} per-user speed / MTP-1 at matched throughput: {c['min_ratio']:.2f}–{c['max_ratio']:.2f}× "
                     f"(median {c['median_ratio']:.2f}×; goal ≥ {MATCHED_SPEED_GOAL}×: "
                     f"{'met' if c['met'] else 'NOT met'})")
    elif "reason" in c:
        lines.append(f"(c) {label} vs MTP-1: {c['reason']}")
    return lines
