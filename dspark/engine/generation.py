"""The offline generation loop: a batch of prompts in, token ids and statistics out — a thin loop over the
engine (`dspark.engine.engine.Engine`).

Every prompt is queued at once; the engine prefills them (in one ragged forward when the step's token budget
allows, here unbounded by default) and then runs `dspark.engine.step` for every unfinished request until each
hits a stop token or its max_new_tokens (the step: draft → plan → verify → commit; plain decoding is the same
step with ℓ = 0, so both process the target's logits identically). A `SpeculationController`
(`dspark.scheduling.controller`) decides, per step, whether the drafter runs (the draft gate) and how many
drafts of each request are verified (the verification policy, docs/design.md §5), from confidences calibrated
under each request's regime; every choice keeps the output distribution exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence


from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.errors import RequestError
from dspark.models.drafters.base import Drafter
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import SpeculationController


@dataclass
class SequenceResult:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens (stop token included when generation stopped on one)
    finish_reason: str  # "stop" (stop token) or "length" (max_new_tokens)
    stats: SpecStats
    rounds: list[RoundRecord]


@dataclass
class GenerationOutput:
    sequences: list[SequenceResult]
    stats: SpecStats  # pooled over all rounds of all sequences
    elapsed_s: float  # wall time of the whole call, prefill included

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated / self.elapsed_s if self.elapsed_s > 0 else float("inf")


def _per_sequence(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise RequestError(f"{name}: {len(value)} values for {count} prompts")
        return list(value)
    return [value] * count


def generate(
    runner: TargetRunner,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    max_new_tokens: int | Sequence[int] = 64,
    drafter: Drafter | None = None,
    num_draft_tokens: int | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = 0,
    record_rounds: bool = False,
    controller: SpeculationController | None = None,
) -> GenerationOutput:
    """Generate continuations for a batch of tokenised prompts, with or without a drafter.

    num_draft_tokens: drafts proposed per step (default: the drafter's block size γ).
    stop_token_ids: generation of a sequence ends after it emits one of these.
    seed: the engine's seed (None: random): every prompt's own random stream is drawn from it in order
        (`dspark.engine.engine`), so one seed reproduces the whole batch.
    record_rounds: keep a RoundRecord per step and sequence (with the calibrated confidences, if any).
    controller: the draft gate, verification policy, calibration regimes and online calibrator (None: no
        gate, verify every draft, the raw head's confidences). A policy, gate or online calibrator that
        needs confidences with a drafter that does not declare `provides_confidence` is a RequestError.
    """
    count = len(prompts)
    samplings = _per_sequence(sampling, count, "sampling")
    budgets = _per_sequence(max_new_tokens, count, "max_new_tokens")
    if drafter is not None and num_draft_tokens is not None and num_draft_tokens < 0:
        raise RequestError(f"num_draft_tokens must be ≥ 0, got {num_draft_tokens}")
    lookahead = 1 + (drafter.block_size if drafter is not None else 0)
    page = runner.cache.page_size
    sizes = [len(p) + (b if isinstance(b, int) else 0) + lookahead for p, b in zip(prompts, budgets)]
    config = EngineConfig(max_num_seqs=max(1, count), max_num_batched_tokens=max(1, sum(sizes)),
                          num_draft_tokens=num_draft_tokens if drafter is not None else None, seed=seed)
    start_time = time.perf_counter()
    pages = sum(-(-n // page) for n in sizes)
    pages += pages // 50 + 1  # the scheduler's admission watermark: every prompt is admitted at once
    engine = Engine(runner, drafter, controller or SpeculationController(), config=config, expected_tokens=pages * page)
    try:  # add_request validates each prompt (request id = its index); nothing runs before all are queued
        requests = [engine.add_request(i, p, sampling=s, max_new_tokens=b, stop_token_ids=stop_token_ids,
                                       record_rounds=record_rounds)
                    for i, (p, s, b) in enumerate(zip(prompts, samplings, budgets))]
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.close()
    elapsed = time.perf_counter() - start_time
    total = SpecStats()
    results = []
    for r in requests:
        total.merge(r.stats)
        results.append(SequenceResult(r.prompt_ids, r.output_ids, r.finish_reason, r.stats, r.rounds))
    return GenerationOutput(sequences=results, stats=total, elapsed_s=elapsed)
