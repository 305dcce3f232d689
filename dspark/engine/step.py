"""One engine step (paper §2, Algorithm 1's loop), in two phases around the request scheduler's choice of
prompt chunks:

  `draft_and_plan` — for the requests that decode this step:
  1. draft: the drafter proposes up to k tokens per request (skipped when the controller's gate says so and
     no request is planned alone, or when no request can use a draft);
  2. plan: the controller calibrates the confidences and picks ℓ per request (≤ its proposal, its room).

  `run_step` — one ragged target forward over every decoding request's [x0, d_1..d_ℓ] and every scheduled
  prompt chunk, then:
  3. verify: `verify` accepts a prefix of each request's drafts and draws the correction or bonus token,
     from distributions processed exactly as in plain decoding (`logits_to_probs`);
  4. commit: each target cache is rolled back to x0 + the accepted drafts, the emitted tokens are cut at a
     stop token and at max_new_tokens, the verified positions' features wait for the drafter's next call,
     and the controller observes the outcome. A prompt chunk only adds its K/V and features; the chunk that
     completes a new prompt also emits the first token (a recomputed prompt after a preemption emits none).

Plain decoding is the same step with ℓ = 0. Random numbers come from `StepRandom` (one fixed-size block per
decoding request) and one uniform per completed prompt, drawn by the engine from each request's generator.
Non-finite logits or draft probabilities stop the step with a NumericalError naming the request before
anything computed from them is emitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from dspark.decoding.randomness import StepRandom
from dspark.decoding.sampling import logits_to_probs, sample, token_logprobs
from dspark.decoding.verification import verify
from dspark.engine.request import Request
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.errors import NumericalError
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import Plan, SpeculationController


def check_finite(values: torch.Tensor, requests: Sequence, what: str, valid: torch.Tensor | None = None) -> None:
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


@dataclass
class StepDrafts:
    """Phase 1's result for the R decoding requests: their proposals and the controller's plan."""

    requests: list[Request]
    proposal: DraftProposal
    plan: Plan
    drafter_called: bool
    gate_open: bool

    @property
    def verify_lens(self) -> torch.Tensor:
        return self.plan.lengths

    @property
    def num_tokens(self) -> int:
        """Target tokens the decoding rows add to the step: Σ (1 + ℓ)."""
        return len(self.requests) + int(self.plan.lengths.sum())


def draft_and_plan(runner: TargetRunner, requests: list[Request], drafter: Drafter | None,
                   controller: SpeculationController, num_draft_tokens: int, random: StepRandom,
                   generator: torch.Generator | None = None, timer=None) -> StepDrafts:
    """Phases 1–2 for `requests` (decoding, none finished). random: the step's uniforms, row b for request b;
    generator: for drafters that want more randomness of their own; timer: adds the drafter's seconds to its
    `draft_s`."""
    batch = len(requests)
    # Drafts are only worth proposing if the step can still emit them plus one target token.
    limits = []
    for r in requests:
        context_room = runner.max_context - runner.length(r.seq_id) - 1
        limits.append(max(0, min(num_draft_tokens if r.speculate else 0, r.room - 1, context_room)))
    alone = [r.batch_invariant for r in requests]
    gate_open = drafter is not None and any(limits) and controller.should_draft(batch)
    if drafter is not None and not gate_open and any(a and n for a, n in zip(alone, limits)):
        limits = [n if a else 0 for a, n in zip(alone, limits)]  # gate closed: draft only for requests planned alone
        drafter_called = True
    else:
        drafter_called = gate_open
    if not drafter_called:
        return StepDrafts(requests, DraftProposal.empty(batch), Plan.nothing(batch), False, False)
    started = time.perf_counter()
    proposal = drafter.propose([DraftInput(r.seq_id, r.token_ids, r.drafter_features(), limit, r.sampling, random.draft(b))
                                for b, (r, limit) in enumerate(zip(requests, limits))], generator)
    if timer is not None:
        timer.draft_s += time.perf_counter() - started
    plan = controller.plan(proposal.confidence_logits, proposal.lengths, torch.tensor(limits, dtype=torch.long),
                           [r.seq_id for r in requests], [r.sampling for r in requests],
                           alone=alone if any(alone) else None)
    return StepDrafts(requests, proposal, plan, True, gate_open)


def run_step(runner: TargetRunner, drafts: StepDrafts, chunks: Sequence[tuple[Request, int]], drafter: Drafter | None,
             controller: SpeculationController, random: StepRandom, first_uniforms: torch.Tensor, timer=None,
             totals: SpecStats | None = None) -> dict:
    """Phases 3–4: one forward over the decoding rows of `drafts` and the prompt `chunks` (request, tokens),
    then verification and commit; updates the requests in place. first_uniforms [C]: one uniform per chunk
    (used only by a chunk that completes a new prompt); timer: adds the forward's seconds to its `target_s`;
    totals: also gets every round's record (live statistics across requests).
    Returns {request_id: tokens it emitted this step}."""
    requests, proposal, plan = drafts.requests, drafts.proposal, drafts.plan
    batch = len(requests)
    layers = drafter.feature_layer_ids if drafter is not None else ()
    verify_lens = plan.lengths
    width = int(verify_lens.max()) if batch else 0
    drafts_tokens = proposal.tokens[:, :width]
    starts = [runner.length(r.seq_id) for r in requests]
    decode_tokens = [[r.last_token] + drafts_tokens[b, : int(verify_lens[b])].tolist() for b, r in enumerate(requests)]
    chunk_tokens = [r.prefill_ids[r.num_computed: r.num_computed + n] for r, n in chunks]
    samples_first = [r.num_computed + n == r.prefill_length and not r.resuming for r, n in chunks]
    started = time.perf_counter()
    out = runner.forward(
        [r.seq_id for r in requests] + [r.seq_id for r, _ in chunks], decode_tokens + chunk_tokens,
        logits_per_sequence=[len(t) for t in decode_tokens] + [int(s) for s in samples_first], feature_layer_ids=layers,
    )
    if timer is not None:
        if out.logits.is_cuda:
            torch.cuda.synchronize(out.logits.device)
        timer.target_s += time.perf_counter() - started
    decode_rows = sum(len(t) for t in decode_tokens)
    check_finite(out.logits[:decode_rows], [r.request_id for r, t in zip(requests, decode_tokens) for _ in t], "target's logits")
    check_finite(out.logits[decode_rows:], [r.request_id for (r, _), s in zip(chunks, samples_first) if s],
                 "target's prefill logits")
    features = out.split(out.features) if out.features is not None else [None] * (batch + len(chunks))
    emitted: dict = {}
    if batch:
        emitted.update(_verify_and_commit(runner, drafts, out.logits[:decode_rows], out.query_lens[:batch],
                                          features[:batch], starts, controller, random, width, totals))
    # Prompt chunks: K/V and features only, the first token when a new prompt completes.
    finishing = [(r, u) for (r, _), s, u in zip(chunks, samples_first, first_uniforms.tolist()) if s]
    first_tokens: list[int] = []
    if finishing:
        probs = logits_to_probs(out.logits[decode_rows:], [r.sampling for r, _ in finishing])
        first_tokens = sample(probs, uniforms=torch.tensor([u for _, u in finishing], dtype=torch.float64)).tolist()
    tokens_for = {id(r): (token, row) for row, ((r, _), token) in enumerate(zip(finishing, first_tokens))}
    for (r, n), feats in zip(chunks, features[batch:]):
        r.num_computed += n
        if feats is not None:
            r.pending_features.append(feats)
        if id(r) in tokens_for:
            token, row = tokens_for[id(r)]
            emitted[r.request_id] = r.emit([token])
            if r.logprobs is not None:
                r.output_logprobs += token_logprobs(out.logits[decode_rows + row: decode_rows + row + 1], [token], r.logprobs)
    return emitted


def _verify_and_commit(runner: TargetRunner, drafts: StepDrafts, logits: torch.Tensor, query_lens: list[int],
                       features: list, starts: list[int], controller: SpeculationController, random: StepRandom,
                       width: int, totals: SpecStats | None) -> dict:
    requests, proposal, plan = drafts.requests, drafts.proposal, drafts.plan
    batch, verify_lens = len(requests), plan.lengths
    # Target distributions, padded to [B, width + 1, V]; processed exactly as in plain decoding.
    row_params = [r.sampling for r, q in zip(requests, query_lens) for _ in range(q)]
    flat_probs = logits_to_probs(logits, row_params)
    if all(q == width + 1 for q in query_lens):
        target_probs = flat_probs.view(batch, width + 1, -1)
    else:
        target_probs = flat_probs.new_zeros(batch, width + 1, flat_probs.shape[-1])
        rows = torch.cat([torch.arange(q) + b * (width + 1) for b, q in enumerate(query_lens)])
        target_probs.view(batch * (width + 1), -1)[rows.to(flat_probs.device)] = flat_probs
    drafts_tokens = proposal.tokens[:, :width]
    draft_probs = None if proposal.probs is None else proposal.probs[:, :width].to(target_probs.device)
    if draft_probs is not None:
        used = torch.arange(width, device=draft_probs.device) < verify_lens.to(draft_probs.device)[:, None]
        check_finite(draft_probs, [r.request_id for r in requests], "drafter's proposal distribution", used)
    result = verify(target_probs, drafts_tokens.to(target_probs.device), verify_lens, draft_probs,
                    uniforms=random.verification())
    samplings = [r.sampling for r in requests]
    if drafts.drafter_called:
        controller.observe(plan, result.num_accepted, samplings, proposal.confidence_logits, gate=drafts.gate_open)
    accepted = result.num_accepted.tolist()
    next_tokens = result.next_tokens.tolist()
    confidences = None
    if plan.confidences is not None and any(r.record_rounds for r in requests):
        confidences = plan.confidences.detach().float().cpu().tolist()

    emitted = {}
    row_starts = [0]
    for q in query_lens:
        row_starts.append(row_starts[-1] + q)
    for b, r in enumerate(requests):
        n = accepted[b]
        runner.truncate(r.seq_id, starts[b] + 1 + n)  # keep x0 and the accepted drafts
        r.num_computed = starts[b] + 1 + n
        if features[b] is not None:
            verified = features[b][: 1 + n]
            if drafts.drafter_called:  # the drafter consumed the earlier parts
                r.pending_features = [verified]
            else:
                r.pending_features.append(verified)
        emitted[r.request_id] = r.emit(drafts_tokens[b, :n].tolist() + [next_tokens[b]])
        if r.logprobs is not None:  # row k of the request's logits predicts its k-th emitted token
            tokens = emitted[r.request_id]
            r.output_logprobs += token_logprobs(logits[row_starts[b]: row_starts[b] + len(tokens)], tokens, r.logprobs)
        drafted = int(proposal.lengths[b])
        record = RoundRecord(
            drafted=drafted, verified=int(verify_lens[b]), accepted=n, emitted=len(emitted[r.request_id]),
            confidences=None if confidences is None else confidences[b][:drafted],
        )
        r.stats.add(record)
        if totals is not None:
            totals.add(record)
        if r.record_rounds:
            r.rounds.append(record)
    return emitted
