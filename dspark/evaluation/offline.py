"""The paper's offline evaluation (docs/design.md §3, Table 1 and Fig. 2).

Chain drafting with a fixed block (every drafted token is verified, no scheduler), per data set:
τ = emitted tokens over all rounds / rounds, pooled over samples (accepted drafts + the correction or
bonus token per round); drafted / verified / accepted counts; position-wise *conditional acceptance*
P(slot k accepted | slots < k accepted) and *prefix survival* P(slots ≤ k all accepted). Domain and
macro averages are unweighted means of per-set τ. The same target runner serves every drafter; each
drafter sees the same prompts and the same seeds. A prompt that leaves no room in the target's context for
a new token is skipped and counted per set ("skipped_too_long", with its FILE:LINE), as evaluations of the
paper's protocol drop over-long prompts; `EvalSettings.strict` refuses it instead. Every other prompt
generates up to `max_new_tokens`, fewer where its context runs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dspark.calibration.calibration_file import regimes_for
from dspark.data.chat import DEFAULT_TEMPLATE_KWARGS, render_sample_prompt
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.errors import ConfigError
from dspark.evaluation.datasets import DOMAIN_ORDER, PromptSet
from dspark.evaluation.traces import confidence_matrix, merge_traces, round_arrays
from dspark.models.drafters import load_drafter
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer, stop_token_ids
from dspark.scheduling.controller import SpeculationController


@dataclass
class EvalSettings:
    temperature: float = 1.0
    block_size: int | None = None  # drafts per round; None = each drafter's trained block size
    max_new_tokens: int = 2048
    seed: int = 0
    batch_size: int = 8
    template_kwargs: dict = field(default_factory=lambda: dict(DEFAULT_TEMPLATE_KWARGS))  # as generate renders
    strict: bool = False  # a prompt beyond the context is an error (ConfigError naming set and line), not skipped


@dataclass
class RenderedSet:
    """A prompt set rendered for the target: token ids of the prompts that fit its context, and the
    FILE:LINE of those that do not (skipped)."""

    prompt_set: PromptSet
    prompts: list[list[int]]
    skipped_too_long: list[str]


def render_sets(tokenizer, prompt_sets: list[PromptSet], settings: EvalSettings, max_context: int) -> list[RenderedSet]:
    """Render every set's prompts once (shared by all drafters); a prompt with no room left for a new token
    is skipped, or refused with `settings.strict`. A set left empty is kept with no prompts (evaluated as
    nothing: its τ is reported as null)."""
    out = []
    for prompt_set in prompt_sets:
        prompts, skipped = [], []
        for sample in prompt_set.samples:
            ids = render_sample_prompt(tokenizer, sample, template_kwargs=settings.template_kwargs)
            if len(ids) + 2 > max_context:  # the generation budget below keeps one position spare
                if settings.strict:
                    raise ConfigError(f"data set {prompt_set.name!r}, {sample.where}: the prompt has {len(ids)} tokens, "
                                      f"no room for a new token in the target's context of {max_context} (--strict)")
                skipped.append(sample.where)
            else:
                prompts.append(ids)
        out.append(RenderedSet(prompt_set, prompts, skipped))
    if not any(r.prompts for r in out):
        raise ConfigError(f"every prompt of {', '.join(p.name for p in prompt_sets)} is beyond the target's context "
                          f"of {max_context} tokens")
    return out


def drafter_label(spec: str) -> str:
    return Path(spec).name if Path(spec).is_dir() else spec


def set_report(stats: SpecStats, samples: int, generated: int, elapsed_s: float, domain: str) -> dict:
    return {
        "domain": domain,
        "tau": stats.mean_accepted_length,
        "rounds": stats.rounds,
        "samples": samples,
        "drafted_tokens": stats.drafted_tokens,
        "verified_tokens": stats.verified_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "emitted_tokens": stats.emitted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "conditional_acceptance": stats.conditional_acceptance,
        "prefix_survival": stats.prefix_survival,
        "verified_per_position": list(stats.verified_per_position),
        "accepted_per_position": list(stats.accepted_per_position),
        "reached_per_position": list(stats.reached_per_position),
        "generated_tokens": generated,
        "elapsed_s": elapsed_s,
    }


def averages(datasets: dict[str, dict]) -> tuple[dict[str, float], float | None]:
    """Per-domain and macro τ: unweighted means of per-set τ (sets with no rounds skipped)."""
    taus = {name: r["tau"] for name, r in datasets.items() if r["tau"] is not None}
    domains = {}
    for domain in DOMAIN_ORDER:
        values = [taus[n] for n, r in datasets.items() if r["domain"] == domain and n in taus]
        if values:
            domains[domain] = sum(values) / len(values)
    macro = sum(taus.values()) / len(taus) if taus else None
    return domains, macro


def calibration_report(traces: dict, calibration, block_size: int) -> dict:
    """Per-position ECE / AUC / Brier of the prefix-survival prediction (docs/design.md §4.1) for the confidences the
    drafter reported, and — when a calibration (a `ConfidenceMap`) was applied — for the raw head (the map
    undone)."""
    from dspark.calibration.metrics import Rounds, position_metrics
    from dspark.calibration.sts import apply_calibration

    conf = confidence_matrix(traces["confidences"], block_size)
    rounds = Rounds.from_arrays(conf, traces["verified"], traces["accepted"], drop_invalid=True)
    out = {"reported": position_metrics(rounds, noise_floor=True), "calibrated": calibration is not None, "dropped_rounds": rounds.dropped}
    if calibration is not None:
        raw = apply_calibration(conf, calibration.inverse())
        out["raw"] = position_metrics(Rounds.from_arrays(raw, traces["verified"], traces["accepted"], drop_invalid=True))
    return out


def evaluate_drafter(
    runner: TargetRunner, stops: list[int], drafter_spec: str, rendered_sets: list[RenderedSet],
    settings: EvalSettings, *, device: str = "auto", dtype: str | None = None, progress: bool = True,
    calibration: str | None = "auto",
) -> tuple[dict, dict]:
    """Run one drafter over every prompt set → (report {"datasets", "domains", "macro_tau", ...}, traces
    {set name: round_arrays}; confidences are null for drafters without a confidence head)."""
    from tqdm import tqdm

    drafter = load_drafter(drafter_spec, num_draft_tokens=settings.block_size, device=device, dtype=dtype,
                           target=runner.model)
    controller = SpeculationController(regimes=regimes_for(drafter, calibration))
    block_size = drafter.block_size if settings.block_size is None else settings.block_size
    label = drafter_label(drafter_spec)
    sampling = SamplingParams(temperature=settings.temperature)
    # The calibration regime for this sampling temperature (calibration_file), as applied to every round.
    calibration = controller.map_for(sampling)
    total = sum(len(r.prompts) for r in rendered_sets)
    bar = tqdm(total=total, disable=not progress, desc=f"eval {label}", unit="prompt")
    datasets, traces = {}, {}
    for rendered in rendered_sets:
        prompt_set, prompts = rendered.prompt_set, rendered.prompts
        stats, generated, started = SpecStats(), 0, time.perf_counter()
        records: list[tuple[int, RoundRecord]] = []
        for b, start in enumerate(range(0, len(prompts), settings.batch_size)):
            batch = prompts[start:start + settings.batch_size]
            room = [max(1, min(settings.max_new_tokens, runner.max_context - len(p) - 1)) for p in batch]
            out = generate(
                runner, batch, sampling=sampling, max_new_tokens=room, drafter=drafter,
                num_draft_tokens=settings.block_size, stop_token_ids=stops, seed=settings.seed + b,
                record_rounds=True, controller=controller,
            )
            stats.merge(out.stats)
            for i, seq in enumerate(out.sequences):
                records.extend((start + i, r) for r in seq.rounds)
            generated += out.num_generated
            bar.update(len(batch))
        report = set_report(stats, len(prompts), generated, time.perf_counter() - started, prompt_set.domain)
        report.update(skipped_too_long=len(rendered.skipped_too_long), skipped_lines=rendered.skipped_too_long)
        traces[prompt_set.name] = dict(round_arrays(records, block_size), domain=prompt_set.domain)
        if drafter.provides_confidence:
            report["calibration"] = calibration_report(traces[prompt_set.name], calibration, block_size)
        datasets[prompt_set.name] = report
    bar.close()
    domains, macro = averages(datasets)
    result = {"drafter": drafter_spec, "label": label, "block_size": block_size, "datasets": datasets, "domains": domains,
              "macro_tau": macro, "confidence_temperatures": None if calibration is None else calibration.temperatures.tolist(),
              "confidence_biases": None if calibration is None else calibration.biases.tolist()}
    if drafter.provides_confidence:
        result["calibration"] = calibration_report(merge_traces(traces.values()), calibration, block_size)
    return result, traces


def evaluate(
    target: str, drafters: list[str], prompt_sets: list[PromptSet], settings: EvalSettings, *,
    device: str = "auto", dtype: str | None = None, progress: bool = True, calibration: str | None = "auto",
) -> tuple[dict, dict]:
    """Evaluate every drafter → (report, traces {drafter label: {set: round_arrays}})."""
    runner = TargetRunner.from_pretrained(target, device=device, dtype=dtype)
    tokenizer = load_tokenizer(target)
    stops = stop_token_ids(target, tokenizer, runner.config.eos_token_ids)
    rendered_sets = render_sets(tokenizer, prompt_sets, settings, runner.max_context)
    results, all_traces = {}, {}
    for spec in drafters:
        result, traces = evaluate_drafter(runner, stops, spec, rendered_sets, settings, device=device,
                                          dtype=dtype, progress=progress, calibration=calibration)
        label = result["label"]
        while label in results:
            label += "'"
        results[label] = result
        all_traces[label] = {"drafter": spec, "block_size": result["block_size"], "temperature": settings.temperature,
                             "has_confidences": "calibration" in result,
                             "confidence_temperatures": result["confidence_temperatures"],
                             "confidence_biases": result["confidence_biases"], "datasets": traces}
    report = {
        "target": target,
        "settings": {"temperature": settings.temperature, "block_size": settings.block_size,
                     "max_new_tokens": settings.max_new_tokens, "seed": settings.seed, "strict": settings.strict},
        "skipped_too_long": {r.prompt_set.name: len(r.skipped_too_long) for r in rendered_sets},
        "drafters": results,
        "gains": macro_gains(results),
    }
    if len(results) == 1:
        only = next(iter(results.values()))
        report.update(datasets=only["datasets"], domains=only["domains"], macro_tau=only["macro_tau"])
        if "calibration" in only:
            report["calibration"] = only["calibration"]
    return report, all_traces


def macro_gains(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Relative macro-τ gain (%) of each drafter over each other one: 100 · (τ_a / τ_b − 1)."""
    gains: dict[str, dict[str, float]] = {}
    for a, ra in results.items():
        for b, rb in results.items():
            if a != b and ra["macro_tau"] and rb["macro_tau"]:
                gains.setdefault(a, {})[b] = 100.0 * (ra["macro_tau"] / rb["macro_tau"] - 1.0)
    return gains
