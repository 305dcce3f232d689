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
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from dspark.decoding.randomness import StepRandom
from dspark.decoding.sampling import logits_to_probs, sample_tokens, token_logprobs
from dspark.decoding.verification import verify, verify_greedy
from dspark.devices import to_device
from dspark.engine.host_syncs import host_list, to_host
from dspark.engine.request import Request
from dspark.engine.stats import RoundRecord, SpecStats
from dspark.errors import NumericalError
from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import Plan, SpeculationController


def nonfinite_rows(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """values [N, ..., V] → [N] bool on their device: row n has a NaN or inf in an entry `valid` [N, ...]
    marks as used (all when None). No host read: the flags travel with the step's one transfer."""
    bad = ~torch.isfinite(values).all(-1)
    if valid is not None:
        bad &= valid
    return bad.flatten(1).any(-1) if bad.dim() > 1 else bad


def raise_if_nonfinite(flags: Sequence[int], requests: Sequence, what: str) -> None:
    """flags [N] (host values of `nonfinite_rows`, row n belongs to request `requests[n]`): NumericalError
    naming the first request with a non-finite used row, before anything computed from it is emitted."""
    for row, bad in enumerate(flags):
        if bad:
            raise NumericalError(f"request {requests[row]}: the {what} produced non-finite values (NaN or inf); no "
                                 "token was emitted from them (check the model's weights and config)")


@dataclass
class StepDrafts:
    """Phase 1's result for the R decoding requests: their proposals and the controller's plan, with the host
    values the step needs read once here, in the planning phase (the plan decides the forward's shape)."""

    requests: list[Request]
    proposal: DraftProposal
    plan: Plan
    drafter_called: bool
    gate_open: bool
    verify_list: list[int]  # ℓ_b
    drafted_list: list[int]  # proposed drafts per request
    draft_lists: list[list[int]]  # the ℓ_b drafts each request verifies
    confidence_rows: list[list[float]] | None = None  # the plan's calibrated confidences [R][K]

    @property
    def num_tokens(self) -> int:
        """Target tokens the decoding rows add to the step: Σ (1 + ℓ)."""
        return len(self.requests) + sum(self.verify_list)

    @classmethod
    def of(cls, requests: list[Request], proposal: DraftProposal, plan: Plan, drafter_called: bool,
           gate_open: bool) -> "StepDrafts":
        """From a proposal whose tokens and lengths are on the host (`_read_proposal`) and the controller's
        plan (computed on the host)."""
        verify, tokens = host_list(plan.lengths), host_list(proposal.tokens)
        confidences = None if plan.confidences is None else host_list(plan.confidences.detach())
        return cls(requests, proposal, plan, drafter_called, gate_open, verify, host_list(proposal.lengths),
                   [row[:n] for row, n in zip(tokens, verify)], confidences)


def _read_proposal(proposal: DraftProposal) -> DraftProposal:
    """The planning phase's one read of the device: the drafts, their count and the raw confidences the
    controller plans from (`to_host`); q stays on the device for verification."""
    tensors = [proposal.tokens, proposal.lengths]
    if proposal.confidence_logits is not None:
        tensors.append(proposal.confidence_logits.detach())
    tokens, lengths, *confidences = to_host(tensors)
    raw = proposal.confidence_logits
    return replace(proposal, tokens=torch.tensor(tokens, dtype=torch.long).view(proposal.tokens.shape),
                   lengths=torch.tensor(lengths, dtype=torch.long),
                   confidence_logits=torch.tensor(confidences[0], dtype=raw.dtype).view(raw.shape) if confidences else None)


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
        nothing = [0] * batch
        return StepDrafts(requests, DraftProposal.empty(batch), Plan.nothing(batch), False, False, nothing, nothing,
                          [[] for _ in requests])
    started = time.perf_counter()
    proposal = drafter.propose([DraftInput(r.seq_id, r.token_ids, r.drafter_features(), limit, r.sampling, random.draft(b))
                                for b, (r, limit) in enumerate(zip(requests, limits))], generator)
    proposal = _read_proposal(proposal)
    if timer is not None:
        timer.draft_s += time.perf_counter() - started
    plan = controller.plan(proposal.confidence_logits, proposal.lengths, torch.tensor(limits, dtype=torch.long),
                           [r.seq_id for r in requests], [r.sampling for r in requests],
                           alone=alone if any(alone) else None)
    return StepDrafts.of(requests, proposal, plan, True, gate_open)


class _ForwardClock:
    """Seconds of one forward without a host sync of its own: on CUDA two timing events around its kernels,
    read after the step's transfer has waited for them; elsewhere the wall time of the (synchronous) call.
    Both count from the forward's call, its host-side layouts included."""

    def __init__(self, device: torch.device):
        self.started = time.perf_counter()
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.wall: float | None = None

    def stop(self) -> None:
        if self.events is not None:
            self.events[1].record()
        else:
            self.wall = time.perf_counter() - self.started

    def seconds(self) -> float:
        if self.events is None:
            return self.wall
        self.events[1].synchronize()  # done already after the step's transfer (an empty one may not have waited)
        return self.events[0].elapsed_time(self.events[1]) / 1e3


@dataclass
class _StepResults:
    """What the step computed on the device, read by the host in one transfer (`to_host`)."""

    num_accepted: list[int]  # [R]
    next_tokens: list[int]  # [R] correction or bonus token
    first_tokens: list[int]  # one per prompt that completes this step
    bad_decode_rows: list[int]  # nonfinite flags of the decoding rows' logits
    bad_prefill_rows: list[int]  # ... of the completed prompts' logits
    bad_drafts: list[int]  # [R] ... of the drafter's proposal distributions (used slots)


def run_step(runner: TargetRunner, drafts: StepDrafts, chunks: Sequence[tuple[Request, int]], drafter: Drafter | None,
             controller: SpeculationController, random: StepRandom, first_uniforms: torch.Tensor, timer=None,
             totals: SpecStats | None = None, while_running=None) -> dict:
    """Phases 3–4: one forward over the decoding rows of `drafts` and the prompt `chunks` (request, tokens),
    then verification and commit; updates the requests in place. first_uniforms [C]: one uniform per chunk
    (used only by a chunk that completes a new prompt); timer: adds the forward's seconds to its `target_s`;
    totals: also gets every round's record (live statistics across requests); while_running: host work called
    once the forward is launched, before anything waits for it (on a GPU it overlaps the forward; the engine's
    async output processing); it must not touch these requests' caches.
    Between the forward and the commit the host reads the device once (`to_host`, docs/architecture.md
    "host syncs"); a request that asks for logprobs adds one read of its rows.
    Returns {request_id: tokens it emitted this step}."""
    requests = drafts.requests
    batch = len(requests)
    layers = drafter.feature_layer_ids if drafter is not None else ()
    starts = [runner.length(r.seq_id) for r in requests]
    decode_tokens = [[r.last_token] + d for r, d in zip(requests, drafts.draft_lists)]
    chunk_tokens = [r.prefill_ids[r.num_computed: r.num_computed + n] for r, n in chunks]
    samples_first = [r.num_computed + n == r.prefill_length and not r.resuming for r, n in chunks]
    clock = _ForwardClock(runner.device) if timer is not None else None
    out = runner.forward(
        [r.seq_id for r in requests] + [r.seq_id for r, _ in chunks], decode_tokens + chunk_tokens,
        logits_per_sequence=[len(t) for t in decode_tokens] + [int(s) for s in samples_first], feature_layer_ids=layers,
    )
    if clock is not None:
        clock.stop()
    if while_running is not None:
        while_running()
    decode_rows = sum(len(t) for t in decode_tokens)
    finishing = [r for (r, _), s in zip(chunks, samples_first) if s]
    accepted, next_tokens, bad_drafts = _verify(drafts, out.logits[:decode_rows], out.query_lens[:batch], random)
    prefill_logits = out.logits[decode_rows:]
    first_tokens = torch.zeros(0, dtype=torch.long, device=prefill_logits.device)
    if finishing:
        index = torch.tensor([c for c, s in enumerate(samples_first) if s], dtype=torch.long)
        first_tokens = sample_tokens(prefill_logits, [r.sampling for r in finishing], first_uniforms[index])
    results = _StepResults(*to_host([accepted, next_tokens, first_tokens, nonfinite_rows(out.logits[:decode_rows]),
                                     nonfinite_rows(prefill_logits), bad_drafts]))
    if clock is not None:
        timer.target_s += clock.seconds()  # the transfer above waited for the forward: no sync of its own
    raise_if_nonfinite(results.bad_decode_rows, [r.request_id for r, t in zip(requests, decode_tokens) for _ in t],
                       "target's logits")
    raise_if_nonfinite(results.bad_prefill_rows, [r.request_id for r in finishing], "target's prefill logits")
    raise_if_nonfinite(results.bad_drafts, [r.request_id for r in requests], "drafter's proposal distribution")

    features = out.split(out.features) if out.features is not None else [None] * (batch + len(chunks))
    emitted: dict = {}
    if batch:
        emitted.update(_commit(runner, drafts, results, out.logits[:decode_rows], out.query_lens[:batch],
                               features[:batch], starts, controller, totals))
    # Prompt chunks: K/V and features only, the first token when a new prompt completes.
    tokens_for = {id(r): (token, row) for row, (r, token) in enumerate(zip(finishing, results.first_tokens))}
    for (r, n), feats in zip(chunks, features[batch:]):
        r.num_computed += n
        if feats is not None:
            r.pending_features.append(feats)
        if id(r) in tokens_for:
            token, row = tokens_for[id(r)]
            emitted[r.request_id] = r.emit([token])
            if r.logprobs is not None:
                r.output_logprobs += token_logprobs(prefill_logits[row: row + 1], [token], r.logprobs)
    return emitted


def _verify(drafts: StepDrafts, logits: torch.Tensor, query_lens: list[int], random: StepRandom
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 3 on the device, no host read: logits [Σ (1 + ℓ_b), V] of the R decoding requests →
    (accepted drafts [R], next token [R], non-finite draft distribution flags [R]).

    Greedy requests are verified by argmax: a draft survives while it equals the target's argmax and the next
    token is the argmax after the last survivor — exactly what the rejection rule gives with p the one-hot
    of the argmax (docs/design.md §1), without building it. Sampled requests go through `verify` with their
    distributions processed exactly as in plain decoding (`logits_to_probs`)."""
    requests, proposal = drafts.requests, drafts.proposal
    batch, device = len(requests), logits.device
    width = max(drafts.verify_list, default=0)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    bad_drafts = torch.zeros(batch, dtype=torch.bool, device=device)
    if not batch:
        return num_accepted, next_tokens, bad_drafts
    row_starts = [0]
    for q in query_lens:
        row_starts.append(row_starts[-1] + q)
    greedy = [b for b, r in enumerate(requests) if r.sampling.greedy]
    sampled = [b for b, r in enumerate(requests) if not r.sampling.greedy]
    # Everything verification needs from the host, in one asynchronous copy per dtype (`to_device`): row
    # (b, k) of the padded [B, width + 1] layout ← flat row row_starts[b] + k (a padding slot, k > ℓ_b, reads
    # the request's first row; verification never uses it); the drafts; the verification uniforms.
    host = [
        torch.tensor(drafts.verify_list, dtype=torch.long),
        torch.tensor([[row_starts[b] + (k if k < q else 0) for k in range(width + 1)] for b, q in enumerate(query_lens)],
                     dtype=torch.long).view(batch, width + 1),
        torch.tensor(greedy, dtype=torch.long), torch.tensor(sampled, dtype=torch.long),
        torch.tensor([row + [0] * (width - len(row)) for row in drafts.draft_lists], dtype=torch.long)
        .view(batch, width),
        random.verification().contiguous(),
    ]
    verify_lens, padded_rows, greedy_rows, sampled_rows, drafts_tokens, uniforms = to_device(host, device)
    draft_probs = None if proposal.probs is None else proposal.probs[:, :width].to(device)
    if greedy:
        target_argmax = logits.argmax(-1)[padded_rows[greedy_rows]]  # [G, width + 1]
        accepted, tokens = verify_greedy(target_argmax, drafts_tokens[greedy_rows], verify_lens[greedy_rows])
        num_accepted[greedy_rows], next_tokens[greedy_rows] = accepted, tokens
    if sampled:
        row_params = [requests[b].sampling for b in sampled for _ in range(width + 1)]
        target_probs = logits_to_probs(logits[padded_rows[sampled_rows]].flatten(0, 1), row_params)
        result = verify(target_probs.view(len(sampled), width + 1, -1), drafts_tokens[sampled_rows],
                        verify_lens[sampled_rows], None if draft_probs is None else draft_probs[sampled_rows],
                        uniforms=uniforms[sampled_rows])
        num_accepted[sampled_rows], next_tokens[sampled_rows] = result.num_accepted, result.next_tokens
    if draft_probs is not None and width:
        used = torch.arange(width, device=device) < verify_lens[:, None]
        bad_drafts = nonfinite_rows(draft_probs, used)
    return num_accepted, next_tokens, bad_drafts


def _commit(runner: TargetRunner, drafts: StepDrafts, results: _StepResults, logits: torch.Tensor,
            query_lens: list[int], features: list, starts: list[int], controller: SpeculationController,
            totals: SpecStats | None) -> dict:
    """Phase 4 for the decoding requests, from the host values of the step's results."""
    requests, proposal, plan = drafts.requests, drafts.proposal, drafts.plan
    accepted, next_tokens = results.num_accepted, results.next_tokens
    if drafts.drafter_called:
        controller.observe(plan, torch.tensor(accepted, dtype=torch.long), [r.sampling for r in requests],
                           proposal.confidence_logits, gate=drafts.gate_open)
    confidences = drafts.confidence_rows
    emitted = {}
    row_start = 0
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
        emitted[r.request_id] = r.emit(drafts.draft_lists[b][:n] + [next_tokens[b]])
        if r.logprobs is not None:  # row k of the request's logits predicts its k-th emitted token
            tokens = emitted[r.request_id]
            r.output_logprobs += token_logprobs(logits[row_start: row_start + len(tokens)], tokens, r.logprobs)
        row_start += query_lens[b]
        drafted = drafts.drafted_list[b]
        record = RoundRecord(
            drafted=drafted, verified=drafts.verify_list[b], accepted=n, emitted=len(emitted[r.request_id]),
            confidences=None if confidences is None else confidences[b][:drafted],
        )
        r.stats.add(record)
        if totals is not None:
            totals.add(record)
        if r.record_rounds:
            r.rounds.append(record)
    return emitted
