"""Prometheus metrics of `dspark serve`, named as vLLM's with the prefix `dspark:` and a `model_name` label
(docs/serving.md "Metrics"). Counters are exposed with the suffix `_total`.

Live engine state (requests running and waiting, KV usage, speculation counters, the draft gate, calibration)
is read from one engine snapshot taken on the engine's thread between two steps when /metrics is scraped
(`ServerMetrics.collect`), so a scrape never sees a step half done and costs the decoding loop nothing.
Per-request latencies and token counts are histograms observed by the engine's thread as outputs leave it.
Intervals use one monotonic clock (time.perf_counter) in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "dspark:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
VERIFY_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServerMetrics:
    """The server's metrics in their own registry (several servers may live in one process, e.g. tests)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        disable_created_metrics()  # no `_created` series (as vLLM)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token (arrival → first token).", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two outputs of a request (one engine step "
                             "may emit several tokens).", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival → finish.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival → first scheduled.", REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled → first token.", REQUEST_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token → finish.", REQUEST_BUCKETS)
        self.prompt_tokens_hist = histogram("request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BUCKETS)
        self.generation_tokens_hist = histogram("request_generation_tokens", "Generated tokens per finished request.",
                                                TOKEN_BUCKETS)
        self.verify_per_step = histogram("verify_tokens_per_step", "Drafts verified per engine step (Σℓ over the "
                                         "batch; paper §3.2.2).", VERIFY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.snapshot: dict = {}
        self.registry.register(self)

    def observe_request(self, request, now: float) -> None:
        """A finished request (`dspark.engine.request.Request`): its latencies and token counts."""
        self.e2e.observe(now - request.arrival_time)
        if request.scheduled_time is not None:
            self.queue.observe(request.scheduled_time - request.arrival_time)
            if request.first_token_time is not None:
                self.prefill.observe(request.first_token_time - request.scheduled_time)
        if request.first_token_time is not None:
            self.decode.observe(now - request.first_token_time)
        self.prompt_tokens_hist.observe(len(request.prompt_ids))
        self.generation_tokens_hist.observe(len(request.output_ids))
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.success.labels(self.model_name, request.finish_reason or "abort").inc()

    # -- the live part, from the engine snapshot (a prometheus_client custom collector) --------------------
    def describe(self):
        return []

    def collect(self):
        snap = self.snapshot
        if not snap:
            return
        name = self.model_name

        def gauge(metric: str, doc: str, value) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            if value is not None:
                family.add_metric([name], float(value))
            return family

        def counter(metric: str, doc: str, value) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], float(value))
            return family

        yield gauge("num_requests_running", "Requests admitted to the engine.", snap["running"])
        yield gauge("num_requests_waiting", "Requests queued (new or preempted).", snap["waiting"])
        yield gauge("kv_cache_usage_perc", "KV pages in use, as a fraction (1 = 100 %).", snap["kv_usage"])
        yield counter("num_preemptions", "Requests preempted (their KV freed, recomputed later).", snap["num_preemptions"])
        yield counter("num_late_stops", "Requests that ran one engine step past the stop string that ended them (async "
                      "output processing finds stop strings a step late; that step's tokens are dropped).",
                      snap.get("late_stops", 0))
        times = snap["times"]
        yield counter("engine_steps", "Engine steps run.", times["steps"])
        yield counter("engine_step_seconds", "Seconds spent in engine steps.", times["step_s"])
        yield counter("engine_target_seconds", "Seconds of engine steps spent in the target's forwards.", times["target_s"])
        yield counter("engine_draft_seconds", "Seconds of engine steps spent in the drafter.", times["draft_s"])
        spec = snap["spec_live"]
        yield counter("spec_decode_num_drafts", "Steps of a request that verified at least one draft.", spec["drafts"])
        yield counter("spec_decode_num_draft_tokens", "Drafts verified by the target.", spec["verified_tokens"])
        yield counter("spec_decode_num_accepted_tokens", "Drafts accepted.", spec["accepted_tokens"])
        yield counter("spec_decode_num_proposed_tokens", "Drafts the drafter proposed (verified or not: the scheduler "
                      "verifies a prefix).", spec["drafted_tokens"])
        per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Drafts accepted at each "
                                      "block position (0 = first draft).", labels=["model_name", "position"])
        for k, value in enumerate(spec["accepted_per_position"]):
            per_pos.add_metric([name, str(k)], float(value))
        yield per_pos
        calibration = snap["calibration"]
        expected = CounterMetricFamily(PREFIX + "calibration_expected_accepted_tokens_per_pos", "Drafts the calibrated "
                                       "confidences predicted to be accepted (Σ prefix survival) at each position; "
                                       "compare with spec_decode_num_accepted_tokens_per_pos.",
                                       labels=["model_name", "position"])
        for k, value in enumerate(calibration["expected_accepted_per_position"]):
            expected.add_metric([name, str(k)], float(value))
        yield expected
        yield gauge("calibration_drift", "Predicted − observed acceptance per verified draft over the last 256 steps "
                    "(0 = calibrated, > 0 over-confident).", calibration["drift"])
        yield gauge("calibration_predicted_acceptance", "Acceptance the calibrated confidences predicted per verified "
                    "draft, last 256 steps.", calibration["predicted_acceptance"])
        yield gauge("calibration_observed_acceptance", "Observed acceptance per verified draft, last 256 steps.",
                    calibration["observed_acceptance"])
        gate = snap["controller"].get("draft_gate")
        fraction = None
        if gate is not None and gate["drafted_steps"] + gate["skipped_steps"]:
            fraction = gate["drafted_steps"] / (gate["drafted_steps"] + gate["skipped_steps"])
        yield gauge("draft_gate_open_fraction", "Share of engine steps the draft gate let the drafter run.", fraction)
        online = snap["controller"].get("online_calibration")
        if online is not None:
            yield gauge("calibration_ece_recent", "ECE of the online-calibrated confidences on recent rounds.",
                        online["ece_recent"]["mean"])
