"""The generation loop: a batch of prompts in, token ids and statistics out.

One round for every unfinished sequence (SPEC §1):
  1. the drafter proposes up to k tokens (none in plain decoding);
  2. the target runs [x0, d_1..d_ℓ] for all sequences in one ragged forward (ℓ may differ, 0 allowed);
  3. `verify` accepts a prefix and emits a correction or bonus token;
  4. the target KV cache is rolled back to x0 + accepted drafts; the emitted tokens are cut at the first
     stop token (an accepted stop token ends the sequence with no bonus) and at max_new_tokens.
Plain decoding is the same loop with ℓ = 0, so both use identical target processing.
With a `scheduler` (SPEC §5, dspark.scheduling) step 2 verifies only ℓ = scheduler(confidences, ...) of
the proposed drafts; every policy there keeps the output distribution exact. With a `gate`
(dspark.scheduling.gate.DraftGate) step 1 is skipped in rounds where, by earlier rounds, drafting does not
pay at this batch size: the round is a plain decoding step, and the target features it produces are
kept for the drafter's next call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dspark.decoding.sampling import SamplingParams, logits_to_probs, sample
from dspark.decoding.verification import verify
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.errors import NumericalError, RequestError
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.target_runner import TargetRunner
from dspark.calibration.online import OnlineCalibrator
from dspark.scheduling.gate import DraftGate
from dspark.scheduling.policies import VerificationPolicy


@dataclass
class SequenceResult:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens (stop token included when generation stopped on one)
    finish_reason: str  # "stop" (stop token) or "length" (max_new_tokens)
    stats: SpecStats
    rounds: list[RoundRecord] = field(default_factory=list)


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


@dataclass
class _Active:
    index: int
    seq_id: int
    prompt: list[int]
    generated: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    pending_features: torch.Tensor | None
    stats: SpecStats = field(default_factory=SpecStats)
    rounds: list[RoundRecord] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]


def _per_sequence(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise RequestError(f"{name}: {len(value)} values for {count} prompts")
        return list(value)
    return [value] * count


def check_finite(values: torch.Tensor, requests: Sequence[int], what: str, valid: torch.Tensor | None = None) -> None:
    """values [N, ..., V] (row n belongs to request `requests[n]`); `valid` [N, ...] bool marks the entries
    that are used. NumericalError naming the first request with a NaN or inf in a used row, before anything
    computed from it is sampled or emitted."""
    bad = ~torch.isfinite(values).all(-1)
    if valid is not None:
        bad &= valid
    if bool(bad.any()):
        row = int(bad.reshape(bad.shape[0], -1).any(-1).nonzero()[0])
        raise NumericalError(f"request {requests[row]}: the {what} produced non-finite values (NaN or inf); no token "
                             "was emitted from them (check the model's weights and config)")


def _cut(tokens: list[int], stop_ids: frozenset[int], room: int) -> tuple[list[int], str | None]:
    """Cut emitted tokens at the first stop token (kept) and at the remaining budget."""
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            if i + 1 <= room:
                return tokens[: i + 1], "stop"
            break
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None


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
    scheduler: VerificationPolicy | None = None,
    calibrator: OnlineCalibrator | None = None,
    gate: DraftGate | None = None,
) -> GenerationOutput:
    """Generate continuations for a batch of tokenised prompts, with or without a drafter.

    num_draft_tokens: drafts proposed per round (default: the drafter's trained block size).
    stop_token_ids: generation of a sequence ends after it emits one of these.
    seed: seeds the one generator used for target sampling, verification and drafting (None: random).
    record_rounds: keep a RoundRecord per round and sequence (with the drafter's confidences, if any).
    scheduler: verification-length policy (SPEC §5; None: verify every proposed draft). A policy that
        needs confidences with a drafter that does not declare `provides_confidence` is a RequestError.
    calibrator: online calibration (SPEC §4.3): every round's raw-head confidences and outcomes are fed to
        it (only the requests at its `sampling_temperature` when it has one), and the temperatures of each
        refit are applied to the drafter from the next round on (its `drift_report()` / `metrics()` export
        the drift). Ignored for drafters without confidences.
    gate: decides before each round, from earlier rounds only, whether the drafter runs (needs a drafter
        with confidences; a skipped round is a plain decoding step). Lossless: the decision never depends
        on the round's own tokens.
    """
    count = len(prompts)
    samplings = _per_sequence(sampling, count, "sampling")
    budgets = _per_sequence(max_new_tokens, count, "max_new_tokens")
    k = 0
    if drafter is not None:
        k = drafter.block_size if num_draft_tokens is None else num_draft_tokens
        if k < 0:
            raise RequestError(f"num_draft_tokens must be ≥ 0, got {k}")
        drafter.check_num_draft_tokens(k)
        drafter.check_target(runner.config)
        if scheduler is not None and scheduler.needs_confidences and not drafter.provides_confidence:
            raise RequestError(
                f"scheduler '{scheduler.name}' chooses verification lengths from confidences, and drafter "
                f"'{drafter.name}' provides none; use a drafter with a confidence head, or no scheduler"
            )
        if gate is not None and not drafter.provides_confidence:
            raise RequestError(f"the draft gate needs confidences, and drafter '{drafter.name}' provides none")
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if len(prompt) == 0:
            raise RequestError(f"prompt {i} is empty")
        if not isinstance(budget, int) or budget < 1:
            raise RequestError(f"max_new_tokens must be an integer ≥ 1, got {budget!r}")
        if len(prompt) + budget > runner.max_context:
            raise RequestError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={budget} it needs "
                f"{len(prompt) + budget} positions, beyond the model's context of {runner.max_context}"
            )
    stop_ids = frozenset(int(t) for t in stop_token_ids)
    generator = torch.Generator(device=runner.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    layers = drafter.feature_layer_ids if drafter is not None else ()
    start_time = time.perf_counter()

    seq_ids = [runner.new_sequence() for _ in range(count)]
    active: list[_Active] = []
    done: list[_Active] = []
    try:
        out = runner.forward(seq_ids, [list(p) for p in prompts], all_logits=False, feature_layer_ids=layers)
        check_finite(out.logits, range(count), "target's prefill logits")
        first = sample(logits_to_probs(out.logits, samplings), generator).tolist()
        features = out.split(out.features) if out.features is not None else [None] * count
        for i in range(count):
            state = _Active(i, seq_ids[i], list(prompts[i]), [], samplings[i], budgets[i], features[i])
            emitted, reason = _cut([first[i]], stop_ids, budgets[i])
            state.generated.extend(emitted)
            state.finish_reason = reason
            (done if reason else active).append(state)
        while active:
            _round(runner, active, drafter, k, layers, stop_ids, generator, record_rounds, scheduler, calibrator,
                   gate)
            still = []
            for state in active:
                (done if state.finish_reason else still).append(state)
                if state.finish_reason and drafter is not None:
                    drafter.release(state.seq_id)
                if state.finish_reason and scheduler is not None:
                    scheduler.release(state.seq_id)
            active = still
    finally:
        for seq_id in seq_ids:
            runner.free_sequence(seq_id)
        for state in active:
            if drafter is not None:
                drafter.release(state.seq_id)
            if scheduler is not None:
                scheduler.release(state.seq_id)
    elapsed = time.perf_counter() - start_time
    done.sort(key=lambda s: s.index)
    total = SpecStats()
    results = []
    for s in done:
        total.merge(s.stats)
        results.append(SequenceResult(s.prompt, s.generated, s.finish_reason, s.stats, s.rounds))
    return GenerationOutput(sequences=results, stats=total, elapsed_s=elapsed)


def feed_calibrator(calibrator: OnlineCalibrator, drafter: Drafter, confidences: torch.Tensor,
                    verify_lens: torch.Tensor, accepted: torch.Tensor, samplings: Sequence[SamplingParams]) -> None:
    """One round's outcomes → the online calibrator, with the raw head's confidences [B, K] (the drafter's
    current map of each request's regime undone: raw logit = (calibrated logit − b_k) · T_k). A calibrator
    bound to a sampling temperature sees only the requests sampled at exactly that temperature; after a
    refit, its map becomes the drafter's for that regime (for every request when it is unbound)."""
    conf = confidences.detach().double().cpu()
    cmap = drafter.calibration_map(list(samplings))
    if cmap is not None:
        eps = 1e-12
        width = conf.shape[1]
        temps, biases = cmap[0][:, :width].double().cpu(), cmap[1][:, :width].double().cpu()
        conf = torch.sigmoid((torch.logit(conf.clamp(eps, 1 - eps)) - biases) * temps)
    rows = slice(None)
    if calibrator.sampling_temperature is not None:
        rows = torch.tensor([s.temperature == calibrator.sampling_temperature for s in samplings])
        if not bool(rows.any()):
            return
    refits = calibrator.refits
    calibrator.observe(conf[rows, : calibrator.block_size].numpy(), verify_lens.cpu()[rows].numpy(),
                       accepted.cpu()[rows].numpy())
    if calibrator.refits != refits:
        drafter.set_calibration(calibrator.calibration, sampling_temperature=calibrator.sampling_temperature)


def _round(
    runner: TargetRunner,
    active: list[_Active],
    drafter: Drafter | None,
    k: int,
    layers: tuple[int, ...],
    stop_ids: frozenset[int],
    generator: torch.Generator,
    record_rounds: bool,
    scheduler: VerificationPolicy | None = None,
    calibrator: OnlineCalibrator | None = None,
    gate: DraftGate | None = None,
) -> None:
    batch = len(active)
    # Drafts are only worth proposing if the round can still emit them plus one target token.
    limits = []
    for s in active:
        room = s.max_new_tokens - len(s.generated)
        context_room = runner.max_context - runner.length(s.seq_id) - 1
        limits.append(max(0, min(k, room - 1, context_room)))
    drafter_called = drafter is not None and any(limits) and (gate is None or gate.should_draft(batch))
    if drafter_called:
        inputs = [
            DraftInput(s.seq_id, s.prompt + s.generated, s.pending_features, limit, s.sampling)
            for s, limit in zip(active, limits)
        ]
        proposal = drafter.propose(inputs, generator)
    else:
        proposal = DraftProposal.empty(batch)
    limits_t = torch.tensor(limits, dtype=torch.long)
    verify_lens = torch.minimum(proposal.lengths, limits_t)
    if scheduler is not None and drafter_called:
        chosen = scheduler(proposal.confidences, proposal.lengths, limits_t, [s.seq_id for s in active])
        verify_lens = torch.minimum(chosen.to(torch.long).clamp_min(0), verify_lens)
    width = int(verify_lens.max()) if batch else 0
    drafts = proposal.tokens[:, :width]
    starts = [runner.length(s.seq_id) for s in active]
    new_tokens = [[s.last_token] + drafts[b, : int(verify_lens[b])].tolist() for b, s in enumerate(active)]
    out = runner.forward([s.seq_id for s in active], new_tokens, all_logits=True, feature_layer_ids=layers)
    check_finite(out.logits, [s.index for s, q in zip(active, out.query_lens) for _ in range(q)], "target's logits")

    # Target distributions, padded to [B, width + 1, V]; processed exactly as in plain decoding.
    row_params = [s.sampling for s, q in zip(active, out.query_lens) for _ in range(q)]
    flat_probs = logits_to_probs(out.logits, row_params)
    if all(q == width + 1 for q in out.query_lens):
        target_probs = flat_probs.view(batch, width + 1, -1)
    else:
        target_probs = flat_probs.new_zeros(batch, width + 1, flat_probs.shape[-1])
        rows = torch.cat([torch.arange(q) + b * (width + 1) for b, q in enumerate(out.query_lens)])
        target_probs.view(batch * (width + 1), -1)[rows.to(flat_probs.device)] = flat_probs
    draft_probs = None if proposal.probs is None else proposal.probs[:, :width].to(target_probs.device)
    if draft_probs is not None:
        used = torch.arange(width, device=draft_probs.device) < verify_lens.to(draft_probs.device)[:, None]
        check_finite(draft_probs, [s.index for s in active], "drafter's proposal distribution", used)
    result = verify(target_probs, drafts.to(target_probs.device), verify_lens, draft_probs, generator)
    if calibrator is not None and drafter_called and proposal.confidences is not None:
        feed_calibrator(calibrator, drafter, proposal.confidences, verify_lens, result.num_accepted,
                        [s.sampling for s in active])
    if gate is not None and drafter_called and proposal.confidences is not None:
        gate.observe(proposal.confidences.detach().float().cpu().numpy(), torch.minimum(proposal.lengths, limits_t),
                     verify_lens.cpu(), result.num_accepted.cpu())
    accepted = result.num_accepted.tolist()
    next_tokens = result.next_tokens.tolist()
    features = out.split(out.features) if out.features is not None else [None] * batch
    confidences = None
    if record_rounds and proposal.confidences is not None:
        confidences = proposal.confidences.detach().float().cpu().tolist()

    for b, s in enumerate(active):
        n = accepted[b]
        runner.truncate(s.seq_id, starts[b] + 1 + n)  # keep x0 and the accepted drafts
        if features[b] is not None:
            verified = features[b][: 1 + n]
            unconsumed = None if drafter_called else s.pending_features
            s.pending_features = verified if unconsumed is None else torch.cat([unconsumed, verified])
        emitted = drafts[b, :n].tolist() + [next_tokens[b]]
        emitted, reason = _cut(emitted, stop_ids, s.max_new_tokens - len(s.generated))
        s.generated.extend(emitted)
        s.finish_reason = reason
        drafted = int(proposal.lengths[b])
        record = RoundRecord(
            drafted=drafted, verified=int(verify_lens[b]), accepted=n, emitted=len(emitted),
            confidences=None if confidences is None else confidences[b][:drafted],
        )
        s.stats.add(record)
        if record_rounds:
            s.rounds.append(record)
