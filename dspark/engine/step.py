"""One speculative step, shared by `generate()` and the engine (paper §2, Algorithm 1's loop):

  1. draft: the drafter proposes up to k tokens per request (skipped when the controller's gate says so,
     or when no request can use a draft);
  2. plan: the controller calibrates the confidences and picks ℓ per request (≤ its proposal, its room);
  3. verify: the target runs [x0, d_1..d_ℓ] of every request in one ragged forward and `verify` accepts a
     prefix and draws the correction or bonus token, from distributions processed exactly as in plain
     decoding (`logits_to_probs`);
  4. commit: each target cache is rolled back to x0 + the accepted drafts, the emitted tokens are cut at a
     stop token and at max_new_tokens, the verified positions' features wait for the drafter's next call,
     and the controller observes the outcome.

Plain decoding is the same step with ℓ = 0. Non-finite logits or draft probabilities stop the step with
a NumericalError naming the request before anything computed from them is emitted.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.decoding.randomness import StepRandom
from dspark.decoding.sampling import logits_to_probs, sample
from dspark.decoding.verification import verify
from dspark.engine.request import Request
from dspark.engine.stats import RoundRecord
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


def prefill(runner: TargetRunner, requests: list[Request], layers: tuple[int, ...], uniforms: torch.Tensor) -> None:
    """Run every request's whole prompt in one ragged forward and emit its first token (inverse CDF at
    uniforms [N]); the prompt's features (of `layers`) wait for the drafter."""
    out = runner.forward([r.seq_id for r in requests], [list(r.prompt_ids) for r in requests], all_logits=False,
                         feature_layer_ids=layers)
    check_finite(out.logits, [r.request_id for r in requests], "target's prefill logits")
    first = sample(logits_to_probs(out.logits, [r.sampling for r in requests]), uniforms=uniforms).tolist()
    features = out.split(out.features) if out.features is not None else [None] * len(requests)
    for request, token, feats in zip(requests, first, features):
        request.pending_features = feats
        request.emit([token])


def speculative_step(runner: TargetRunner, requests: list[Request], drafter: Drafter | None, controller: SpeculationController,
                     num_draft_tokens: int, random: StepRandom, generator: torch.Generator | None = None) -> None:
    """One step (module docstring) for every request of `requests` (none finished); updates them in place.
    random: the step's uniforms, row b for request b (drafts, acceptance tests, the final token);
    generator: for drafters that want more randomness of their own."""
    batch = len(requests)
    layers = drafter.feature_layer_ids if drafter is not None else ()
    # Drafts are only worth proposing if the step can still emit them plus one target token.
    limits = []
    for r in requests:
        context_room = runner.max_context - runner.length(r.seq_id) - 1
        limits.append(max(0, min(num_draft_tokens if r.speculate else 0, r.room - 1, context_room)))
    drafter_called = drafter is not None and any(limits) and controller.should_draft(batch)
    if drafter_called:
        proposal = drafter.propose([DraftInput(r.seq_id, r.token_ids, r.pending_features, limit, r.sampling, random.draft(b))
                                    for b, (r, limit) in enumerate(zip(requests, limits))], generator)
    else:
        proposal = DraftProposal.empty(batch)
    samplings = [r.sampling for r in requests]
    if drafter_called:
        plan = controller.plan(proposal.confidence_logits, proposal.lengths, torch.tensor(limits, dtype=torch.long),
                               [r.seq_id for r in requests], samplings)
    else:
        plan = Plan.nothing(batch)
    verify_lens = plan.lengths
    width = int(verify_lens.max()) if batch else 0
    drafts = proposal.tokens[:, :width]
    starts = [runner.length(r.seq_id) for r in requests]
    new_tokens = [[r.last_token] + drafts[b, : int(verify_lens[b])].tolist() for b, r in enumerate(requests)]
    out = runner.forward([r.seq_id for r in requests], new_tokens, all_logits=True, feature_layer_ids=layers)
    check_finite(out.logits, [r.request_id for r, q in zip(requests, out.query_lens) for _ in range(q)], "target's logits")

    # Target distributions, padded to [B, width + 1, V]; processed exactly as in plain decoding.
    row_params = [r.sampling for r, q in zip(requests, out.query_lens) for _ in range(q)]
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
        check_finite(draft_probs, [r.request_id for r in requests], "drafter's proposal distribution", used)
    result = verify(target_probs, drafts.to(target_probs.device), verify_lens, draft_probs, uniforms=random.verification())
    if drafter_called:
        controller.observe(plan, result.num_accepted, samplings, proposal.confidence_logits)
    accepted = result.num_accepted.tolist()
    next_tokens = result.next_tokens.tolist()
    features = out.split(out.features) if out.features is not None else [None] * batch
    confidences = None
    if plan.confidences is not None and any(r.record_rounds for r in requests):
        confidences = plan.confidences.detach().float().cpu().tolist()

    for b, r in enumerate(requests):
        n = accepted[b]
        runner.truncate(r.seq_id, starts[b] + 1 + n)  # keep x0 and the accepted drafts
        if features[b] is not None:
            verified = features[b][: 1 + n]
            unconsumed = None if drafter_called else r.pending_features
            r.pending_features = verified if unconsumed is None else torch.cat([unconsumed, verified])
        emitted = r.emit(drafts[b, :n].tolist() + [next_tokens[b]])
        drafted = int(proposal.lengths[b])
        record = RoundRecord(
            drafted=drafted, verified=int(verify_lens[b]), accepted=n, emitted=len(emitted),
            confidences=None if confidences is None else confidences[b][:drafted],
        )
        r.stats.add(record)
        if r.record_rounds:
            r.rounds.append(record)
