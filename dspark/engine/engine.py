"""The serving engine: requests arrive and leave at any step; every step is one ragged target forward.

    engine = Engine(runner, drafter, controller, config=EngineConfig(...), tokenizer=tokenizer)
    engine.add_request("a", prompt_ids, sampling=SamplingParams(temperature=1.0), max_new_tokens=128, seed=7)
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput: new token ids, new text, finish reason
            ...
    engine.abort("a")                     # any time: its KV pages are freed at once

A step (`step`): the request scheduler (`dspark.engine.scheduler`) picks the decoding requests, preempting
the newest when the KV budget (`dspark.engine.block_manager`) cannot grow; the drafter drafts for them and the
speculation controller (`dspark.scheduling.controller`) picks ℓ per request from the live batch (Algorithm 1,
paper §3.2.2, with the machine's SPS profile); the tokens they leave of the step's budget go to prompt chunks;
then one target forward runs all of it, and verification commits (`dspark.engine.step`). Greedy and sampled
requests, temperatures, top-k/top-p, stop conditions and requests without speculation share one batch.

Randomness (docs/design.md §1): each request owns a generator — seeded by its `seed`, else from the engine's
generator (seeded by `EngineConfig.seed`) in arrival order — and every step draws the same number of uniforms
from it whatever the batch (`dspark.decoding.randomness`). A request with a seed and temperature > 0 is planned
as if alone (the controller's `alone` rows: the regimes as given, `policy.alone()`, the drafter runs for it
even when the gate is closed), so its tokens do not depend on what else is in the batch or when it arrived.
Greedy requests need none of this: their tokens are the target's argmax whatever ℓ is.
"""

from __future__ import annotations

import operator
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from dspark.decoding.randomness import StepRandom, first_token_uniforms
from dspark.decoding.sampling import MAX_TOP_LOGPROBS, SamplingParams
from dspark.engine.block_manager import BlockManager, budget_pages
from dspark.engine.detokenizer import IncrementalDetokenizer, check_stop_strings
from dspark.engine.request import Request, Status
from dspark.engine.scheduler import RequestScheduler
from dspark.engine.stats import SpecStats
from dspark.engine.step import draft_and_plan, run_step
from dspark.errors import ConfigError, RequestError
from dspark.models.drafters.base import Drafter
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import SpeculationController

MAX_SEED = 2**63 - 1


@dataclass
class EngineConfig:
    """max_num_seqs: requests running at once; max_num_batched_tokens: target tokens per step (decoding rows
    first, prompt chunks take the rest); kv_cache_tokens: the KV budget in tokens (None: from
    kv_cache_memory_fraction of the free device memory, default 0.9; `dspark.engine.block_manager`);
    page_size: tokens per KV page (None: the runner's); num_draft_tokens: drafts per step (None: the
    drafter's block size γ); seed: the engine generator's seed (None: random); async_output: each step's
    outputs are detokenized and returned by the next step, while its forward runs on the GPU (`Engine.step`;
    None: on CUDA only, `--disable-async-output-proc` turns it off).

    When the engine is given no controller (`default_controller`): policy — the verification policy by name
    (`dspark.scheduling.named`; "auto" = causal-greedy-gated, Algorithm 1 with the staircase lookahead behind
    the draft gate, for a drafter with a confidence head, else verify-all; docs/benchmarks.md "Serving engine"
    for why the gate is on by default); profile — the SPS
    profile JSON of the hardware-aware policies (None: this machine's, measured at start-up once and cached,
    `dspark.scheduling.profiler`; with the drafter's cost when the drafter knows its folder, as `load_drafter`
    records it); calibration — the drafter's calibration file ("auto": the built-in one when
    it was fitted for this drafter; "none": the raw head)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None
    kv_cache_memory_fraction: float | None = None
    page_size: int | None = None
    num_draft_tokens: int | None = None
    seed: int | None = 0
    policy: str = "auto"
    profile: str | None = None
    calibration: str = "auto"
    async_output: bool | None = None  # None: on CUDA only (`Engine.step`, "async output processing")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name in ("page_size", "num_draft_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "page_size" else 0)):
                raise ConfigError(f"{name} must be an integer ≥ {1 if name == 'page_size' else 0}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise ConfigError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.async_output is not None and not isinstance(self.async_output, bool):
            raise ConfigError(f"async_output must be true, false or null (on CUDA only), got {self.async_output!r}")


@dataclass
class RequestOutput:
    """What one step did for one request: the tokens it emitted (`new_token_ids`), the text they complete
    (`new_text`, None without a tokenizer) and, when it ended, why ("stop" | "length"). With the request's
    `logprobs`: one (logprob, top alternatives) per new token; with `text_per_token`: `new_text` split into
    one piece per new token (a piece may be empty: a character that needs the next token, a stop token)."""

    request_id: Hashable
    new_token_ids: list[int]
    new_text: str | None
    finished: bool
    finish_reason: str | None
    num_output_tokens: int
    logprobs: list | None = None
    text_pieces: list[str] | None = None


@dataclass
class StepTimes:
    """Seconds spent, summed over steps: the whole step, the target's forwards, the drafter's proposals."""

    steps: int = 0
    step_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0

    @property
    def overhead_share(self) -> float | None:
        """Share of step time outside the model calls (scheduling, sampling, verification, bookkeeping)."""
        return None if self.step_s <= 0 else max(0.0, 1 - (self.target_s + self.draft_s) / self.step_s)


@dataclass
class EngineStats:
    """Live engine state for a server's metrics (and `Engine.stats()`)."""

    running: int
    waiting: int
    kv_pages_used: int
    kv_pages_total: int
    kv_usage: float
    num_preemptions: int
    steps: int
    finished_requests: int
    last_step: dict
    verify_budget_mean: float | None  # mean Σℓ (drafts verified) per step over the last STEP_WINDOW steps
    spec: dict  # SpecStats of finished requests
    controller: dict  # policy, calibration regimes and drift, draft gate state
    times: dict = field(default_factory=dict)
    spec_live: dict = field(default_factory=dict)  # SpecStats of every round so far, running requests included
    calibration: dict = field(default_factory=dict)  # `Engine.calibration_report`
    late_stops: int = 0  # async output: requests that ran one step past the stop string that ended them

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


HARDWARE_AWARE = ("causal-greedy", "causal-greedy-gated", "algorithm-1", "async-topk")


def default_controller(runner: TargetRunner, drafter: Drafter | None, config: EngineConfig) -> SpeculationController:
    """The controller of `config.policy` / `profile` / `calibration` (EngineConfig) for this drafter."""
    from pathlib import Path

    from dspark.calibration.calibration_file import regimes_for
    from dspark.scheduling.gate import DraftGate
    from dspark.scheduling.named import make_policy, parse_policies

    if drafter is None:
        return SpeculationController()
    name = config.policy
    if name == "auto":
        name = "causal-greedy-gated" if drafter.provides_confidence else "verify-all"
    specs = parse_policies(name, drafter.block_size, "policy")
    if len(specs) != 1 or specs[0].kind in ("plain", "mtp-1"):
        raise ConfigError(f"policy {config.policy!r}: give one of auto, verify-all, fixed-N, threshold-T, causal-greedy, "
                          "causal-greedy-gated, algorithm-1, async-topk")
    spec = specs[0]
    profile = None
    if spec.kind in HARDWARE_AWARE:
        from dspark.scheduling.sps import SPSProfile

        if config.profile is not None:
            profile = SPSProfile.load(config.profile)
        else:
            if not Path(runner.name).is_dir():
                raise ConfigError(f"policy {name!r} needs an SPS profile: give EngineConfig.profile, or load the target "
                                  "from a folder so this machine's profile can be measured")
            from dspark.scheduling.profiler import profile_with_cache

            source = str(drafter.source) if drafter.source is not None else "none"
            data, path, _ = profile_with_cache(runner.name, source, device=runner.device, dtype=runner.dtype)
            profile = SPSProfile.from_dict(data, source=str(path))
    gate = DraftGate(profile) if spec.kind == "causal-greedy-gated" else None
    controller = SpeculationController(policy=make_policy(spec, profile), regimes=regimes_for(drafter, config.calibration),
                                       gate=gate)
    controller.check_drafter(drafter)
    return controller


class Engine:
    STEP_WINDOW = 256

    def __init__(self, runner: TargetRunner, drafter: Drafter | None = None,
                 controller: SpeculationController | None = None, *, config: EngineConfig | None = None,
                 tokenizer=None, eos_token_ids: Sequence[int] = (), expected_tokens: int | None = None):
        """runner, drafter: the models (the drafter may be None: plain decoding); controller: gate, policy and
        calibration (None: `default_controller` of the config — Algorithm 1 with the lookahead behind the
        draft gate for a drafter with a confidence head); tokenizer: for text out and stop strings; eos_token_ids: stop
        every request unless it sets ignore_eos; expected_tokens: the most tokens the requests will hold
        together, when known (offline batches), caps the KV budget."""
        self.runner = runner
        self.drafter = drafter
        self.config = config = config or EngineConfig()
        self.controller = controller if controller is not None else default_controller(runner, drafter, config)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.num_draft_tokens = 0
        if drafter is not None:
            k = drafter.block_size if config.num_draft_tokens is None else config.num_draft_tokens
            drafter.check_num_draft_tokens(k)
            drafter.check_target(runner.config)
            self.controller.check_drafter(drafter)
            self.num_draft_tokens = k
        self.draft_width = drafter.block_size if drafter is not None else 0
        page_size = config.page_size or runner.cache.page_size
        caches = [runner.cache] + ([drafter.cache] if drafter is not None and drafter.cache is not None else [])
        lookahead = 1 + self.draft_width
        most = config.max_num_seqs * (runner.max_context + lookahead)
        if expected_tokens is not None:
            most = min(most, expected_tokens)
        pages = budget_pages(caches, page_size=page_size, max_tokens_needed=most, kv_cache_tokens=config.kv_cache_tokens,
                             memory_fraction=config.kv_cache_memory_fraction, device=runner.device)
        self._previous_sizes = [(c.num_pages, c.page_size, c.max_pages) for c in caches]
        self.blocks = BlockManager(caches, pages, page_size, lookahead)
        self.scheduler = RequestScheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                          max_num_batched_tokens=config.max_num_batched_tokens)
        self.requests: dict[Hashable, Request] = {}
        self._generator = torch.Generator()
        if config.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(config.seed)
        self.spec = SpecStats()
        self.finished_requests = 0
        self.steps = 0
        self.times = StepTimes()
        self._verify_budgets: deque[int] = deque(maxlen=self.STEP_WINDOW)
        self.last_step: dict = {}
        self.spec_live = SpecStats()  # every round of every request, updated each step
        self.expected_accepted_per_position: list[float] = []  # Σ calibrated survival of each verified slot
        self._calibration_window: deque[tuple[float, int, int]] = deque(maxlen=self.STEP_WINDOW)
        self.async_output = runner.device.type == "cuda" if config.async_output is None else bool(config.async_output)
        self._pending: list[tuple[Request, list[int]]] = []  # async: the last step's tokens, not yet output
        self._ready: list[RequestOutput] = []  # async: outputs made while this step's forward ran
        self._stopped: list[tuple[Request, int]] = []  # async: (request, its length at the stop string) to retire
        self.late_stops = 0  # async: requests that ran one step past the stop string that ended them

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: Hashable, prompt_ids: Sequence[int], *, sampling: SamplingParams | None = None,
                    max_new_tokens: int = 64, stop: Sequence[str] | str | None = None,
                    stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, seed: int | None = None,
                    speculate: bool = True, record_rounds: bool = False, logprobs: int | None = None,
                    text_per_token: bool = False) -> Request:
        """Queue a request; RequestError (nothing queued) for bad input: an empty or out-of-vocabulary
        prompt, a prompt + max_new_tokens beyond the model's context or the whole KV budget, a duplicate
        id, stop strings without a tokenizer, a seed outside [0, 2^63), logprobs outside [0, 20].
        logprobs, text_per_token: see `Request`."""
        try:
            if request_id in self.requests:
                raise RequestError(f"request id {request_id!r} is already in use")
        except TypeError:
            raise RequestError(f"request id {request_id!r} is not hashable") from None
        try:
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise RequestError(f"request {request_id!r}: prompt token ids must be integers") from None
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise RequestError(f"request {request_id!r}: sampling must be a SamplingParams, got {type(sampling).__name__}")
        vocab = self.runner.config.vocab_size
        if not prompt:
            raise RequestError(f"request {request_id!r}: the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"request {request_id!r}: prompt token id out of range [0, {vocab})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"request {request_id!r}: max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        needed = len(prompt) + max_new_tokens
        if needed > self.runner.max_context:
            raise RequestError(
                f"request {request_id!r}: the prompt has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {needed} positions, beyond the model's context of {self.runner.max_context}")
        if not self.blocks.fits_alone(needed):
            raise RequestError(
                f"request {request_id!r}: {needed} tokens (+{self.blocks.lookahead} for a step) exceed the whole KV "
                f"budget of {self.blocks.capacity_tokens} tokens; raise kv_cache_tokens or shorten the request")
        stops = check_stop_strings(stop)
        if stops and self.tokenizer is None:
            raise RequestError(f"request {request_id!r}: stop strings need the engine's tokenizer")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise RequestError(f"request {request_id!r}: seed must be an integer in [0, 2^63), got {seed!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"request {request_id!r}: logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        bad_ids = [t for t in stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad_ids:
            raise RequestError(f"request {request_id!r}: stop token ids out of range [0, {vocab}): {bad_ids}")
        stop_ids = frozenset(int(t) for t in stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        request = Request(prompt, sampling or SamplingParams(), max_new_tokens, stop_ids, speculate=bool(speculate),
                          request_id=request_id, record_rounds=record_rounds, stop=stops, seed=seed,
                          logprobs=logprobs, text_per_token=bool(text_per_token))
        own_seed = seed if seed is not None else int(torch.randint(0, MAX_SEED, (), generator=self._generator))
        request.generator = torch.Generator().manual_seed(own_seed)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, stops)
        request.arrival_time = time.perf_counter()
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort(self, request_id: Hashable) -> bool:
        """Drop a request (finish reason "abort"); its pages return to the budget now. False if unknown."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return False
        request.finish_reason = "abort"
        self._finish(request)
        return True

    def has_unfinished(self) -> bool:
        """Requests still to run, or (async output) outputs still to return."""
        return self.scheduler.has_unfinished or bool(self._pending)

    def _free_kv(self, request: Request) -> None:
        if request.seq_id is None:
            return
        self.runner.free_sequence(request.seq_id)
        if self.drafter is not None:
            self.drafter.release(request.seq_id)
        self.controller.release(request.seq_id)
        request.seq_id = None
        request.pending_features = []

    def _finish(self, request: Request) -> None:
        self.scheduler.remove(request)
        self._free_kv(request)
        request.status = Status.FINISHED
        request.finish_time = time.perf_counter()
        self.spec.merge(request.stats)
        self.finished_requests += 1
        self.requests.pop(request.request_id, None)

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that emitted a token or finished.

        With `async_output` (vLLM's async output processing) the outputs returned are the previous step's:
        its tokens are detokenized, checked for stop strings and packed into RequestOutputs while this step's
        target forward runs on the device (`run_step`'s `while_running`), so that host work hides behind GPU
        work instead of adding to it. Token-id stops (EOS, stop tokens, max_new_tokens) still end a request
        in the step that emits them. A stop string found one step late ends a request that has already run
        one more step: that step's tokens are dropped and its output is what it would have been (the text
        is cut at the stop string either way). A step with nothing to run returns the outputs still due."""
        started = time.perf_counter()
        model_before = self.times.target_s + self.times.draft_s
        decoding, preempted = self.scheduler.schedule_decode()
        for request in preempted:
            self._free_kv(request)
        random = StepRandom.from_generators([r.generator for r in decoding], self.draft_width, self.num_draft_tokens)
        drafts = draft_and_plan(self.runner, decoding, self.drafter, self.controller, self.num_draft_tokens, random,
                                self._generator, timer=self.times)
        budget = self.config.max_num_batched_tokens - drafts.num_tokens
        chunks, admitted = self.scheduler.schedule_prefill(budget)
        for request in admitted:
            request.seq_id = self.runner.new_sequence()
            if request.scheduled_time is None:
                request.scheduled_time = time.perf_counter()
        if not decoding and not chunks:
            self._process_pending()
            return self._take_ready()
        completes = [r.num_computed + n == r.prefill_length and not r.resuming for r, n in chunks]
        first = torch.zeros(len(chunks), dtype=torch.float64)
        if any(completes):
            first[torch.tensor(completes)] = first_token_uniforms([r.generator for (r, _), c in zip(chunks, completes) if c])
        accepted_before = self.spec_live.accepted_tokens
        emitted = run_step(self.runner, drafts, chunks, self.drafter, self.controller, random, first, timer=self.times,
                           totals=self.spec_live, while_running=self._process_pending if self.async_output else None)
        if decoding and drafts.plan.confidences is not None:
            self._observe_calibration(drafts, self.spec_live.accepted_tokens - accepted_before)
        stepped = [(r, emitted[r.request_id]) for r in decoding + [r for r, _ in chunks] if r.request_id in emitted]
        if self.async_output:
            retired = {id(r) for r, _ in self._stopped}
            outputs = self._take_ready()
            self._pending = [(r, tokens) for r, tokens in stepped if id(r) not in retired]
            for request, _ in self._pending:
                if request.finished:  # a stop token or max_new_tokens: its pages go back now, its output next step
                    self._finish(request)
        else:
            now = time.perf_counter()
            outputs = []
            for request, tokens in stepped:
                outputs.append(self._output(request, tokens, now))
                if request.finished:
                    self._finish(request)
        verified = sum(drafts.verify_list)
        self._verify_budgets.append(verified)
        self.steps += 1
        self.last_step = {"decoding": len(decoding), "prefill_tokens": sum(n for _, n in chunks),
                          "admitted": len(admitted), "preempted": len(preempted), "verified_drafts": verified,
                          "drafter_ran": drafts.drafter_called}
        elapsed = time.perf_counter() - started
        self.controller.record_step(elapsed, self.times.target_s + self.times.draft_s - model_before)
        self.times.steps += 1
        self.times.step_s += elapsed
        return outputs

    def _output(self, request: Request, tokens: list[int], now: float) -> RequestOutput:
        """The RequestOutput of the tokens a request emitted in one step: detokenized now (a stop string may cut
        them and finish the request), with their logprobs."""
        if request.first_token_time is None and tokens:
            request.first_token_time = now
        text, pieces = self._detokenize(request, tokens)
        logprobs = None
        if request.logprobs is not None:
            del request.output_logprobs[len(request.output_ids):]  # a stop string cut the output
            logprobs = request.output_logprobs[len(request.output_ids) - len(tokens):]
        return RequestOutput(request.request_id, tokens, text, request.finished, request.finish_reason,
                             len(request.output_ids), logprobs, pieces)

    def _process_pending(self) -> None:
        """Async output: the outputs of the last step's tokens, made while this step's forward runs. A request
        still running whose tokens complete a stop string is retired after the step (`_take_ready`):
        its cache and its place in the forward in flight stay untouched until then."""
        now = time.perf_counter()
        for request, tokens in self._pending:
            if request.finish_reason == "abort":
                continue
            running = request.status != Status.FINISHED
            self._ready.append(self._output(request, tokens, now))
            if running and request.finished:
                self._stopped.append((request, len(request.output_ids)))
        self._pending = []

    def _take_ready(self) -> list[RequestOutput]:
        """Async output: the outputs made during this step, once the requests a stop string ended are retired:
        the tokens this step appended go, the output stays as the stop string cut it."""
        for request, length in self._stopped:
            del request.output_ids[length:]
            del request.output_logprobs[length:]
            request.finish_reason = "stop"
            if request.status != Status.FINISHED:
                self.late_stops += 1
                self._finish(request)
        self._stopped = []
        outputs, self._ready = self._ready, []
        return outputs

    def _detokenize(self, request: Request, tokens: list[int]) -> tuple[str | None, list[str] | None]:
        """Feed the step's tokens to the request's detokenizer; a stop string cuts the output after the token
        that completed it (finish reason "stop"). Returns the text that may be shown now and, with the request's
        `text_per_token`, that text split by token."""
        detok = request.detokenizer
        if detok is None:
            return None, None
        if not tokens:
            return detok.take_new_text(final=request.finished), ([] if request.text_per_token else None)
        kept = len(request.output_ids) - len(tokens)
        pieces = [""] * len(tokens)
        last = 0
        for i, token in enumerate(tokens):
            if request.finish_reason == "stop" and i == len(tokens) - 1 and token in request.stop_token_ids:
                break  # a stop token's text is not part of the output
            last = i
            if detok.add(token):
                del request.output_ids[kept + i + 1:]
                del tokens[i + 1:]
                del pieces[i + 1:]
                request.finish_reason = "stop"
                break
            if request.text_per_token:
                pieces[i] = detok.take_new_text()
        pieces[last] += detok.take_new_text(final=request.finished)
        return "".join(pieces), (pieces if request.text_per_token else None)

    def _observe_calibration(self, drafts, accepted: int) -> None:
        """Calibration monitoring: the acceptance the calibrated confidences predicted for this step's verified
        slots (prefix survival Π c'_j, paper §3.2.1) next to the drafts actually accepted."""
        rows = drafts.confidence_rows
        per_position = [0.0] * (len(rows[0]) if rows else 0)
        for row, length in zip(rows, drafts.verify_list):
            survival = 1.0
            for k, confidence in enumerate(row[:length]):
                survival *= confidence
                per_position[k] += survival
        grow = len(per_position) - len(self.expected_accepted_per_position)
        if grow > 0:
            self.expected_accepted_per_position.extend([0.0] * grow)
        for k, value in enumerate(per_position):
            self.expected_accepted_per_position[k] += value
        self._calibration_window.append((sum(per_position), accepted, sum(drafts.verify_list)))

    def calibration_report(self) -> dict:
        """Live calibration: predicted and observed acceptance per verified draft over the last STEP_WINDOW
        steps, and drift = predicted − observed (0 when the confidences are calibrated; > 0 over-confident)."""
        expected = sum(e for e, _, _ in self._calibration_window)
        accepted = sum(a for _, a, _ in self._calibration_window)
        verified = sum(v for _, _, v in self._calibration_window)
        if not verified:
            return {"verified": 0, "predicted_acceptance": None, "observed_acceptance": None, "drift": None}
        return {"verified": verified, "predicted_acceptance": expected / verified, "observed_acceptance": accepted / verified,
                "drift": (expected - accepted) / verified}

    # -- state ---------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        budgets = self._verify_budgets
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_pages_used=self.blocks.used_pages, kv_pages_total=self.blocks.num_pages, kv_usage=self.blocks.usage,
            num_preemptions=self.scheduler.num_preemptions, steps=self.steps, finished_requests=self.finished_requests,
            last_step=dict(self.last_step), verify_budget_mean=sum(budgets) / len(budgets) if budgets else None,
            spec=self.spec.to_dict(), controller=self.controller.report(),
            times={"steps": self.times.steps, "step_s": self.times.step_s, "target_s": self.times.target_s,
                   "draft_s": self.times.draft_s, "overhead_share": self.times.overhead_share},
            spec_live=self.spec_live.to_dict(),
            calibration=dict(self.calibration_report(), expected_accepted_per_position=list(self.expected_accepted_per_position)),
            late_stops=self.late_stops,
        )

    def close(self) -> None:
        """Abort every request and hand the caches back to standalone use: their page size and limit as
        before the engine (growable on demand)."""
        for request_id in list(self.requests):
            self.abort(request_id)
        for cache, (pages, page_size, max_pages) in zip(self.blocks.caches, self._previous_sizes):
            if cache.page_size != page_size:
                cache.allocate(pages, page_size)
            cache.max_pages = max_pages

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
