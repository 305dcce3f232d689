"""`dspark bench serve`: a load generator for any OpenAI-compatible HTTP server (what `vllm bench serve` does).

Every request is one streamed `POST {url}/v1/completions` (or `/v1/chat/completions`, `endpoint="chat"`) with
`stream_options.include_usage`, sent by one `httpx.AsyncClient` whose connection pool holds as many connections
as requests can be in flight. Load shapes, combinable as in vLLM:

* `max_concurrency` C: at most C requests in flight (a closed loop when every request arrives at once);
* `request_rate` λ: request i arrives i Exp(λ)-distributed gaps after the first (Poisson arrivals, seeded);
  `inf` sends them all at once. An arrived request waits for a free slot under `max_concurrency`.

`warmup_prompts` requests run first at the same load and are not measured.

Per request, with `time.perf_counter()` from the moment it is sent: TTFT (until the first chunk that carries
text), the end-to-end latency E2EL (until the stream ends), ITL (the gaps between consecutive chunks that carry
text; a speculative server delivers several tokens per chunk, and vLLM's benchmark counts the same way) and TPOT
= (E2EL − TTFT) / (completion tokens − 1). Tokens are counted only from the stream's final `usage` event, never
from the chunks; a stream without one is a failed request, as is an `error` event, a non-2xx status, a transport
error or a request running past `timeout_s`.

Speculative decoding: the counters `spec_decode_num_drafts`, `_num_draft_tokens`, `_num_accepted_tokens` and
`_num_accepted_tokens_per_pos` (prefix `dspark:` or `vllm:`) are scraped from `GET {url}/metrics` before and after
the measured requests; their differences give the acceptance rate, the mean acceptance length and the acceptance
rate per draft position. A server without them gets `"speculative": null` and a note. Every `sample_interval_s`
seconds the run records the requests finished so far and the server's `process_resident_memory_bytes` and
`kv_cache_usage_perc` (the `timeline`, for soak tests: resident memory flat, KV usage back to zero at the end).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx
import numpy as np

from dspark.errors import ConfigError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("random", "eval")
DEFAULT_RANDOM_INPUT_LEN = 100  # words per random prompt
DEFAULT_EVAL_LIMIT = 8  # prompts per evaluation set
METRIC_PREFIXES = ("dspark:", "vllm:")  # the first one carrying every spec-decode counter is used
SPEC_COUNTERS = {"spec_decode_num_drafts": "drafts", "spec_decode_num_draft_tokens": "draft_tokens",
                 "spec_decode_num_accepted_tokens": "accepted_tokens"}
PER_POSITION_COUNTER = "spec_decode_num_accepted_tokens_per_pos"  # label "position", 0-based
KV_USAGE_GAUGE = "kv_cache_usage_perc"  # a fraction in [0, 1], despite its name
RESIDENT_MEMORY = "process_resident_memory_bytes"  # prometheus_client's process collector
MODELS_TIMEOUT_S = 30.0  # the reachability check's GET /v1/models
METRICS_TIMEOUT_S = 30.0  # each GET /metrics
ERRORS_REPORTED = 10  # distinct failure messages kept in the result
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class ServeBenchSettings:
    """One `dspark bench serve` run; each field is the flag of the same name (`timeout_s` is --timeout,
    `sample_interval_s` --sample-interval)."""

    url: str  # the server's root (a trailing /v1 is dropped)
    endpoint: str = "completions"  # "completions" | "chat"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None  # sent as "Authorization: Bearer KEY"; never written to the result
    num_prompts: int = 100  # measured requests
    max_concurrency: int | None = None  # requests in flight at most; None: unlimited
    request_rate: float = math.inf  # Poisson arrivals, requests/s; inf: all at once
    warmup_prompts: int = 0  # unmeasured requests run first at the same load
    max_tokens: int = 128  # output tokens per request at most
    temperature: float = 0.0
    seed: int | None = None  # sent as each request's "seed" when given; seeds prompts and arrivals (0 when None)
    ignore_eos: bool = False  # sent as "ignore_eos": true (a vLLM extension) when set
    timeout_s: float = 600.0  # per request, from send to the end of its stream
    dataset: str = "random"  # "random" | "eval"
    random_input_len: int | None = None  # words per random prompt; None: DEFAULT_RANDOM_INPUT_LEN
    datasets: tuple[str, ...] | None = None  # eval set names or JSONL paths; None: the simulator's RECORD_SETS
    data_dir: str | None = None  # folder of <name>.jsonl eval sets; None: datasets.default_data_dir()
    limit: int | None = None  # prompts per eval set; None: DEFAULT_EVAL_LIMIT
    sample_interval_s: float = 1.0  # timeline period in seconds; 0: no timeline

    @property
    def generator_seed(self) -> int:
        """The seed of the random prompts, the eval sets' shuffle and the arrival times."""
        return 0 if self.seed is None else self.seed


def normalize_url(url: str) -> str:
    """The server root of --url: an http(s) URL with a host, without a trailing "/" or "/v1"."""
    text = url.strip()
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"--url {url!r}: not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--url {url!r}: give an http:// or https:// URL with a host, e.g. http://localhost:8000")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"--url {url!r}: give the server's root, without a query or fragment")
    text = text.rstrip("/")
    return text.removesuffix("/v1").rstrip("/")


def wait_for_health(url: str, timeout_s: float, process=None, poll_s: float = 0.2) -> None:
    """Return once GET {url}/health answers 200 (a server that is still loading refuses the connection);
    RuntimeError when `process` (the server's `subprocess.Popen`, optional) exits first, with the end of its
    stderr when it was piped, or when `timeout_s` seconds pass."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            tail = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr is not None else ""
            raise RuntimeError(f"the server exited with status {process.returncode} before it was healthy: {tail}")
        try:
            if httpx.get(f"{normalize_url(url)}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy in {timeout_s:g} s")
        time.sleep(poll_s)


def check_settings(settings: ServeBenchSettings) -> None:
    """Refuse out-of-range settings before any request is sent: ConfigError naming the flag."""
    normalize_url(settings.url)
    if settings.endpoint not in ENDPOINTS:
        raise ConfigError(f"--endpoint: unknown endpoint {settings.endpoint!r} (use {' or '.join(ENDPOINTS)})")
    if settings.model is not None and not settings.model.strip():
        raise ConfigError("--model: give a model name (or leave it out for the server's first model)")
    if settings.api_key is not None:
        key = settings.api_key
        if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            raise ConfigError("--api-key (or $DSPARK_API_KEY / $OPENAI_API_KEY): give a non-empty key of printable "
                              "ASCII characters without spaces")
    for flag, value, least in (("--num-prompts", settings.num_prompts, 1), ("--warmup-prompts", settings.warmup_prompts, 0),
                               ("--max-tokens", settings.max_tokens, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be ≥ {least}, got {value}")
    if settings.max_concurrency is not None and settings.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be ≥ 1, got {settings.max_concurrency}")
    if math.isnan(settings.request_rate) or settings.request_rate <= 0:
        raise ConfigError(f"--request-rate must be > 0 requests/s (or inf), got {settings.request_rate}")
    if not (math.isfinite(settings.temperature) and settings.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number ≥ 0, got {settings.temperature}")
    if not (math.isfinite(settings.timeout_s) and settings.timeout_s > 0):
        raise ConfigError(f"--timeout must be a finite number of seconds > 0, got {settings.timeout_s}")
    if not (math.isfinite(settings.sample_interval_s) and settings.sample_interval_s >= 0):
        raise ConfigError(f"--sample-interval must be a finite number of seconds ≥ 0 (0: no timeline), "
                          f"got {settings.sample_interval_s}")
    if settings.dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {settings.dataset!r} (use {' or '.join(DATASETS)})")
    if settings.dataset == "random":
        for flag, value in (("--datasets", settings.datasets), ("--data-dir", settings.data_dir),
                            ("--limit", settings.limit)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --dataset eval only")
        if settings.random_input_len is not None and settings.random_input_len < 1:
            raise ConfigError(f"--random-input-len must be ≥ 1, got {settings.random_input_len}")
    else:
        if settings.random_input_len is not None:
            raise ConfigError("--random-input-len applies to --dataset random only")
        if settings.limit is not None and settings.limit < 1:
            raise ConfigError(f"--limit must be ≥ 1, got {settings.limit}")
        if settings.datasets is not None and not settings.datasets:
            raise ConfigError("--datasets: give at least one set name or JSONL path")


# ---------------------------------------------------------------------------------------------------- prompts


def random_prompts(count: int, words: int, seed: int) -> list[str]:
    """`count` prompts of `words` random lowercase words (2–8 letters each), the same for the same seed."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    prompts = []
    for _ in range(count):
        lengths = rng.integers(2, 9, size=words)
        chars = letters[rng.integers(0, len(letters), size=int(lengths.sum()))]
        ends = np.cumsum(lengths)
        prompts.append(" ".join("".join(chars[end - n:end]) for n, end in zip(lengths, ends)))
    return prompts


def eval_prompts(datasets: Sequence[str] | None, data_dir: str | None, limit: int | None, seed: int,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """The first user turn of each sample of the evaluation sets, set after set (`dspark bench engine`'s sets:
    at most `limit` per set, shuffled with `seed` when a set is longer). A set whose file is missing is skipped
    (and logged); ConfigError when none is found."""
    from dspark.data.samples import prompt_messages
    from dspark.evaluation.datasets import default_data_dir, load_set, resolve_set
    from dspark.evaluation.simulator import RECORD_SETS

    names = RECORD_SETS if datasets is None else tuple(datasets)
    folder = Path(data_dir) if data_dir else default_data_dir()
    prompts = []
    for spec in names:
        try:
            name, domain, path = resolve_set(spec, folder)
        except ConfigError as exc:
            raise ConfigError(f"--datasets: {exc}") from None
        if not path.is_file():
            if progress is not None:
                progress(f"dspark bench serve: prompt set {spec!r} not found ({path}); skipped")
            continue
        prompt_set = load_set(name, domain, path, limit=DEFAULT_EVAL_LIMIT if limit is None else limit, seed=seed)
        prompts.extend(prompt_messages(sample)[-1]["content"] for sample in prompt_set.samples)
    if not prompts:
        raise ConfigError(f"--datasets: none of {', '.join(names)} was found (give --data-dir or JSONL paths)")
    return prompts


def load_prompts(settings: ServeBenchSettings, progress: Callable[[str], None] | None = None) -> list[str]:
    """The run's prompt texts: one per request (warm-up included) for `random`, the eval sets' prompts for
    `eval` (cycled through by the requests)."""
    if settings.dataset == "random":
        return random_prompts(settings.num_prompts + settings.warmup_prompts,
                              settings.random_input_len or DEFAULT_RANDOM_INPUT_LEN, settings.generator_seed)
    return eval_prompts(settings.datasets, settings.data_dir, settings.limit, settings.generator_seed, progress)


def arrival_offsets(count: int, request_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each of `count` requests arrives: all at 0 for an infinite rate, else the
    first at 0 and exponential gaps of mean 1 / request_rate between consecutive ones (a Poisson process)."""
    if math.isinf(request_rate):
        return np.zeros(count)
    gaps = rng.exponential(1.0 / request_rate, size=max(count - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:count]


# ------------------------------------------------------------------------------------------------ SSE streams


_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Server-sent events from the bytes of a response, fed as they arrive (WHATWG rules): lines end in "\\n",
    "\\r\\n" or "\\r"; the `data:` lines of an event (one space after the colon dropped) are joined by "\\n"; a blank
    line ends the event; comments (":") and other fields are ignored. A UTF-8 character or a "\\r\\n" split
    between two chunks is decoded whole. An event the stream ends inside of is dropped (`truncated`)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last complete line
        self._data: list[str] = []  # the current event's data lines
        self.truncated = False  # set by close(): the stream ended inside an event

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that `chunk` completes, in order."""
        return self._lines(self._pending + self._utf8.decode(chunk))

    def close(self) -> None:
        """At the end of the stream: note whether it ended inside an event (a line or event not terminated, an
        incomplete UTF-8 character)."""
        tail = self._pending + self._utf8.decode(b"", final=True)
        self.truncated = bool(tail or self._data)
        self._pending, self._data = "", []

    def _lines(self, text: str) -> list[str]:
        held = ""
        if text.endswith("\r"):  # maybe the first half of "\r\n"
            text, held = text[:-1], "\r"
        *lines, rest = _LINE_END.split(text)
        self._pending = rest + held
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events


def error_text(error: object) -> str:
    """The message of an OpenAI error object ({"message", "type", "param", "code"}), on one line."""
    if isinstance(error, dict):
        message = error.get("message")
        text = message if isinstance(message, str) and message else json.dumps(error, ensure_ascii=False)
    else:
        text = str(error)
    return " ".join(text.split())


def http_error_text(status: int, body: bytes) -> str:
    """A failed status's message: "HTTP 400: <the body's error message>" (OpenAI's {"error": {...}}, FastAPI's
    {"detail": ...}, else the body's first 200 characters)."""
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and "error" in payload:
        message = error_text(payload["error"])
    elif isinstance(payload, dict) and "detail" in payload:
        message = error_text(payload["detail"] if isinstance(payload["detail"], str) else json.dumps(payload["detail"]))
    else:
        message = " ".join(text.split())[:200] or "(empty body)"
    return f"HTTP {status}: {message}"


def chunk_text(event: dict, endpoint: str) -> str:
    """The text of a streamed chunk: choices[0].text (completions) or choices[0].delta.content (chat); "" when
    it carries none (a chat role chunk, the usage chunk)."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


class CompletionStream:
    """The events of one streamed completion, fed as bytes with their arrival times (perf_counter seconds):
    the arrival time of each chunk carrying text, the final `usage`, and the first error. Events after
    `[DONE]` or an error are ignored."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.text_times: list[float] = []
        self.usage: dict | None = None
        self.error: str | None = None
        self.done = False
        self._sse = SSEDecoder()

    def feed(self, chunk: bytes, now: float) -> None:
        for data in self._sse.feed(chunk):
            self._event(data, now)

    def close(self) -> None:
        """The end of the stream."""
        self._sse.close()

    def _event(self, data: str, now: float) -> None:
        if self.done or self.error is not None:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"malformed event in the stream: {data[:200]!r}"
            return
        if not isinstance(event, dict):
            self.error = f"malformed event in the stream: {data[:200]!r}"
            return
        if "error" in event:
            self.error = error_text(event["error"])
            return
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if chunk_text(event, self.endpoint):
            self.text_times.append(now)

    def failure(self) -> str | None:
        """Why the stream counts as failed, or None: its error event, or a missing or malformed usage."""
        if self.error is not None:
            return self.error
        if self.usage is None:
            return "no usage in the stream" + (" (it ended inside an event)" if self._sse.truncated else "")
        for key in ("prompt_tokens", "completion_tokens"):
            value = self.usage.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return f"usage.{key} is not a count: {value!r}"
        return None


@dataclass
class RequestResult:
    """One request's outcome; times in seconds."""

    prompt_index: int
    error: str | None = None  # None: completed
    prompt_tokens: int = 0  # from usage
    completion_tokens: int = 0  # from usage
    ttft_s: float | None = None  # send → first chunk with text; None when no chunk carried text
    e2el_s: float | None = None  # send → end of the stream
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive chunks with text

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL − TTFT) / (completion tokens − 1), when more than one token came."""
        if not self.ok or self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.completion_tokens - 1)


def stream_result(prompt_index: int, stream: CompletionStream, sent: float, ended: float) -> RequestResult:
    """The RequestResult of a finished stream sent at `sent` and ended at `ended` (perf_counter seconds)."""
    failure = stream.failure()
    if failure is not None:
        return RequestResult(prompt_index, error=failure)
    times = stream.text_times
    return RequestResult(prompt_index, prompt_tokens=stream.usage["prompt_tokens"],
                         completion_tokens=stream.usage["completion_tokens"],
                         ttft_s=times[0] - sent if times else None, e2el_s=ended - sent,
                         itl_s=[b - a for a, b in zip(times, times[1:])])


def request_body(settings: ServeBenchSettings, model: str, prompt: str) -> dict:
    """The JSON body of one streamed request to settings.endpoint."""
    body: dict = {"model": model}
    if settings.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = settings.max_tokens
    else:
        body["prompt"] = prompt
        body["max_tokens"] = settings.max_tokens
    body.update(temperature=settings.temperature, stream=True, stream_options={"include_usage": True})
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_request(client: httpx.AsyncClient, settings: ServeBenchSettings, model: str, prompt: str,
                       prompt_index: int) -> RequestResult:
    """One streamed request, timed from the moment it is sent; every failure becomes RequestResult.error."""
    stream = CompletionStream(settings.endpoint)
    body = request_body(settings, model, prompt)

    async def exchange() -> str | None:
        async with client.stream("POST", ENDPOINTS[settings.endpoint], json=body) as response:
            if not response.is_success:
                return http_error_text(response.status_code, await response.aread())
            async for chunk in response.aiter_bytes():
                stream.feed(chunk, time.perf_counter())
            stream.close()
        return None

    sent = time.perf_counter()
    try:
        failure = await asyncio.wait_for(exchange(), settings.timeout_s)
    except asyncio.TimeoutError:
        failure = f"no complete response within --timeout {settings.timeout_s:g} s"
    except httpx.HTTPError as exc:
        failure = f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}"
    ended = time.perf_counter()
    if failure is not None:
        return RequestResult(prompt_index, error=failure)
    return stream_result(prompt_index, stream, sent, ended)


# ---------------------------------------------------------------------------------------------------- metrics


@dataclass
class MetricsSnapshot:
    """What one scrape of GET /metrics found. `spec`: the spec-decode counters of the first prefix that has all
    three ({"prefix", "drafts", "draft_tokens", "accepted_tokens", "accepted_per_position": {position: count}}),
    None when no prefix has them; summed over every other label (model_name, engine)."""

    spec: dict | None
    resident_memory_bytes: float | None  # summed over the processes that report it
    kv_cache_usage_perc: float | None  # a fraction in [0, 1]; the mean over the engines that report it


def parse_metrics(text: str) -> MetricsSnapshot:
    """A MetricsSnapshot of Prometheus text (`_total` samples of counters, or untyped samples without the
    suffix; `_created` samples ignored). ValueError when the text is not Prometheus exposition format."""
    from prometheus_client.parser import text_string_to_metric_families

    counters: dict[str, dict[str, float]] = {prefix: {} for prefix in METRIC_PREFIXES}
    per_position: dict[str, dict[int, float]] = {prefix: {} for prefix in METRIC_PREFIXES}
    kv_usage: list[float] = []
    resident: list[float] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RESIDENT_MEMORY:
                resident.append(sample.value)
                continue
            prefix = next((p for p in METRIC_PREFIXES if sample.name.startswith(p)), None)
            if prefix is None or sample.name.endswith("_created"):
                continue
            base = sample.name[len(prefix):].removesuffix("_total")
            if base in SPEC_COUNTERS:
                key = SPEC_COUNTERS[base]
                counters[prefix][key] = counters[prefix].get(key, 0.0) + sample.value
            elif base == PER_POSITION_COUNTER and str(sample.labels.get("position", "")).isdigit():
                position = int(sample.labels["position"])
                per_position[prefix][position] = per_position[prefix].get(position, 0.0) + sample.value
            elif base == KV_USAGE_GAUGE and sample.name == prefix + KV_USAGE_GAUGE:
                kv_usage.append(sample.value)
    spec = None
    for prefix in METRIC_PREFIXES:
        if len(counters[prefix]) == len(SPEC_COUNTERS):
            spec = {"prefix": prefix, **counters[prefix], "accepted_per_position": per_position[prefix]}
            break
    return MetricsSnapshot(spec=spec, resident_memory_bytes=sum(resident) if resident else None,
                           kv_cache_usage_perc=sum(kv_usage) / len(kv_usage) if kv_usage else None)


def speculative_delta(before: MetricsSnapshot | None, after: MetricsSnapshot | None) -> dict | None:
    """The spec-decode counters' growth between two scrapes: drafts, draft_tokens, accepted_tokens,
    acceptance_rate = accepted / draft tokens, mean_acceptance_length = 1 + accepted / drafts (tokens per
    verification, the bonus token included), and per draft position k (0-based) the accepted count and the
    acceptance rate accepted_k / drafts. Rates are None when nothing was drafted; the whole is None when either
    scrape lacks the counters."""
    if before is None or after is None or before.spec is None or after.spec is None:
        return None
    grown = {key: int(round(after.spec[key] - before.spec.get(key, 0.0))) for key in SPEC_COUNTERS.values()}
    drafts, draft_tokens, accepted = grown["drafts"], grown["draft_tokens"], grown["accepted_tokens"]
    old_positions = before.spec["accepted_per_position"] if before.spec["prefix"] == after.spec["prefix"] else {}
    positions = sorted(after.spec["accepted_per_position"])
    per_position = [int(round(after.spec["accepted_per_position"][k] - old_positions.get(k, 0.0))) for k in positions]
    return {"metrics_prefix": after.spec["prefix"], "drafts": drafts, "draft_tokens": draft_tokens,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens > 0 else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts > 0 else None,
            "accepted_per_position": per_position,
            "acceptance_rate_per_position": [n / drafts for n in per_position] if drafts > 0 else None}


async def scrape_metrics(client: httpx.AsyncClient) -> tuple[MetricsSnapshot | None, str | None]:
    """(snapshot, None), or (None, why not) when GET /metrics fails, answers a non-2xx status or no Prometheus
    text."""
    try:
        response = await client.get("/metrics", timeout=METRICS_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return None, f"GET /metrics failed ({type(exc).__name__}: {exc})"
    if not response.is_success:
        return None, f"GET /metrics answered HTTP {response.status_code}"
    try:
        return parse_metrics(response.text), None
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        return None, f"GET /metrics did not answer Prometheus text ({' '.join(str(exc).split())[:120]})"


# ------------------------------------------------------------------------------------------------- statistics


def latency_stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 and std (population) of `values`, in their unit; every field None when empty.
    Percentiles interpolate linearly between order statistics (numpy.percentile's default)."""
    from dspark.evaluation.engine_bench import percentile

    if not len(values):
        return {"mean": None, "median": None, "p90": None, "p99": None, "std": None}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "median": percentile(array, 50), "p90": percentile(array, 90),
            "p99": percentile(array, 99), "std": float(array.std())}


def error_counts(results: Sequence[RequestResult]) -> list[dict]:
    """The first ERRORS_REPORTED distinct failure messages, in order of first occurrence, with their counts."""
    counts: dict[str, int] = {}
    for result in results:
        if result.error is not None:
            counts[result.error] = counts.get(result.error, 0) + 1
    return [{"message": message, "count": count} for message, count in list(counts.items())[:ERRORS_REPORTED]]


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict:
    """Counts, throughputs (per second of `duration_s`, tokens from usage) and the latency statistics in ms of
    the measured requests; `latencies_ms` holds every value (for the CDF plots)."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.completion_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    latencies = {"ttft": [1000 * r.ttft_s for r in done if r.ttft_s is not None],
                 "tpot": [1000 * r.tpot_s for r in done if r.tpot_s is not None],
                 "itl": [1000 * gap for r in done for gap in r.itl_s],
                 "e2el": [1000 * r.e2el_s for r in done]}
    summary = {"completed": len(done), "failed": len(results) - len(done), "errors": error_counts(results),
               "duration_s": duration_s,
               "request_throughput": len(done) / duration_s if duration_s > 0 else None,
               "output_throughput": output_tokens / duration_s if duration_s > 0 else None,
               "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else None,
               "total_input_tokens": input_tokens, "total_output_tokens": output_tokens}
    for name in LATENCY_METRICS:
        summary[f"{name}_ms"] = latency_stats(latencies[name])
    summary["latencies_ms"] = latencies
    return summary


# -------------------------------------------------------------------------------------------------------- run


async def resolve_model(client: httpx.AsyncClient, settings: ServeBenchSettings, url: str) -> str:
    """settings.model, checked against GET /v1/models, or the first id listed there. ConfigError naming the URL
    when the server cannot be reached or does not answer a model list, naming --model when it lacks it."""
    try:
        response = await client.get("/v1/models", timeout=min(settings.timeout_s, MODELS_TIMEOUT_S))
    except httpx.HTTPError as exc:
        raise ConfigError(f"--url {url}: cannot reach the server (GET {url}/v1/models: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split()) or 'no detail'})") from None
    if not response.is_success:
        hint = "; give its key with --api-key or $DSPARK_API_KEY" if response.status_code in (401, 403) else ""
        raise ConfigError(f"--url {url}: GET /v1/models answered "
                          f"{http_error_text(response.status_code, response.content)}{hint}")
    try:
        listed = [entry["id"] for entry in response.json()["data"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"--url {url}: GET /v1/models did not answer an OpenAI model list") from None
    if settings.model is not None:
        if settings.model not in listed:
            raise ConfigError(f"--model {settings.model}: the server at {url} serves {', '.join(map(str, listed)) or 'none'}")
        return settings.model
    if not listed or not isinstance(listed[0], str):
        raise ConfigError(f"--url {url}: GET /v1/models lists no model; give --model")
    return listed[0]


async def run_load(client: httpx.AsyncClient, settings: ServeBenchSettings, model: str, prompts: Sequence[str],
                   request_ids: range, rng: np.random.Generator,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send requests `request_ids` (prompt id % len(prompts)) at the settings' load: request j arrives at
    arrival_offsets[j] and waits for a slot under max_concurrency. Returns (results in id order, seconds from
    the first arrival until the last stream ended)."""
    offsets = arrival_offsets(len(request_ids), settings.request_rate, rng)
    slots = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
    start = time.perf_counter()

    async def one(offset: float, request_id: int) -> RequestResult:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        index = request_id % len(prompts)
        if slots is None:
            result = await send_request(client, settings, model, prompts[index], index)
        else:
            async with slots:
                result = await send_request(client, settings, model, prompts[index], index)
        if on_done is not None:
            on_done(result)
        return result

    results = await asyncio.gather(*(one(float(offset), rid) for offset, rid in zip(offsets, request_ids)))
    return list(results), time.perf_counter() - start


async def sample_timeline(client: httpx.AsyncClient, start: float, interval_s: float, results: list[RequestResult],
                          stop: asyncio.Event, timeline: list[dict]) -> None:
    """Append a point to `timeline` every `interval_s` seconds until `stop` is set, and one after: elapsed_s
    since `start`, requests completed and failed so far, the scraped resident memory (bytes) and KV cache usage
    (fraction; None each when /metrics lacks it)."""
    while True:
        stopping = stop.is_set()
        elapsed = time.perf_counter() - start
        completed = sum(r.ok for r in results)
        snapshot, _ = await scrape_metrics(client)
        timeline.append({"elapsed_s": elapsed, "completed": completed, "failed": len(results) - completed,
                         "resident_memory_bytes": snapshot.resident_memory_bytes if snapshot else None,
                         "kv_cache_usage_perc": snapshot.kv_cache_usage_perc if snapshot else None})
        if stopping:
            return
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


def settings_record(settings: ServeBenchSettings, url: str, model: str, prompts: int) -> dict:
    """The settings as the result reports them: JSON-able (an infinite rate is "inf"), without the API key."""
    record = asdict(settings)
    record.pop("api_key")
    record.update(url=url, model=model, api_key_given=settings.api_key is not None, prompts=prompts,
                  request_rate="inf" if math.isinf(settings.request_rate) else settings.request_rate,
                  datasets=list(settings.datasets) if settings.datasets is not None else None)
    return record


async def run_serve_bench_async(settings: ServeBenchSettings, prompts: Sequence[str] | None = None,
                                progress: Callable[[str], None] | None = None) -> dict:
    """`run_serve_bench` inside a running event loop."""
    check_settings(settings)
    url = normalize_url(settings.url)
    log = progress or (lambda line: None)
    prompts = list(prompts) if prompts is not None else load_prompts(settings, progress)
    if not prompts:
        raise ConfigError("no prompts to send")
    in_flight = settings.max_concurrency or max(settings.num_prompts, settings.warmup_prompts)
    connections = in_flight + 1  # + the /metrics scrapes
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key is not None else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(settings.timeout_s),
                                 limits=httpx.Limits(max_connections=connections,
                                                     max_keepalive_connections=connections)) as client:
        model = await resolve_model(client, settings, url)
        log(f"dspark bench serve: {settings.num_prompts} requests to {url}{ENDPOINTS[settings.endpoint]} "
            f"(model {model}, {len(prompts)} prompts, {settings.warmup_prompts} warm-up)")
        warmup = []
        if settings.warmup_prompts:
            warmup, _ = await run_load(client, settings, model, prompts,
                                       range(settings.num_prompts, settings.num_prompts + settings.warmup_prompts),
                                       np.random.default_rng([settings.generator_seed, 1]))
        before, note = await scrape_metrics(client)
        finished: list[RequestResult] = []
        report_every = max(1, settings.num_prompts // 10)

        def on_done(result: RequestResult) -> None:
            finished.append(result)
            if len(finished) % report_every == 0 or len(finished) == settings.num_prompts:
                log(f"dspark bench serve: {len(finished)}/{settings.num_prompts} done "
                    f"({sum(not r.ok for r in finished)} failed)")

        timeline: list[dict] = []
        stop = asyncio.Event()
        start = time.perf_counter()
        sampler = None
        if settings.sample_interval_s > 0:
            sampler = asyncio.create_task(sample_timeline(client, start, settings.sample_interval_s, finished, stop,
                                                          timeline))
        try:
            results, duration = await run_load(client, settings, model, prompts, range(settings.num_prompts),
                                               np.random.default_rng([settings.generator_seed, 0]), on_done)
        finally:
            stop.set()
            if sampler is not None:
                await sampler
        after, after_note = await scrape_metrics(client)
    result = summarize(results, duration)
    result["speculative"] = speculative_delta(before, after)
    if result["speculative"] is None:
        result["speculative_note"] = (note or after_note or "/metrics has no spec_decode_num_drafts, _num_draft_tokens "
                                      "and _num_accepted_tokens counters (dspark: or vllm:)")
    result["timeline"] = timeline if sampler is not None else None
    result["warmup"] = {"requests": len(warmup), "failed": sum(not r.ok for r in warmup)}
    result["settings"] = settings_record(settings, url, model, len(prompts))
    return result


def run_serve_bench(settings: ServeBenchSettings, prompts: Sequence[str] | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """One benchmark run against settings.url → the JSON-able result: completed, failed, errors, duration_s,
    request_throughput (requests/s), output_throughput and total_token_throughput (tokens/s, from usage),
    total_input_tokens, total_output_tokens; ttft_ms, tpot_ms, itl_ms, e2el_ms (mean, median, p90, p99, std);
    latencies_ms (every value); speculative (acceptance over the run, or None with speculative_note); timeline
    (None when sample_interval_s is 0); warmup; settings. `prompts` default to load_prompts(settings).
    ConfigError (naming the flag or the URL) before any request for bad settings or an unreachable server."""
    return asyncio.run(run_serve_bench_async(settings, prompts, progress))


# ------------------------------------------------------------------------------------------- table and plots


def results_table(result: dict) -> str:
    """The result as `vllm bench serve` prints it: counts, throughputs, latency statistics (ms), acceptance."""
    width = 50

    def title(text: str) -> str:
        return f"{' ' + text + ' ':-^{width}}"

    def row(label: str, value, fmt: str = ".2f") -> str:
        shown = "n/a" if value is None else (f"{value:{fmt}}" if isinstance(value, float) else str(value))
        return f"{label:<40}{shown:>10}"

    settings = result["settings"]
    lines = [f"{' Serving Benchmark Result ':=^{width}}", f"Model: {settings['model']} at {settings['url']}",
             row("Successful requests:", result["completed"]),
             row("Failed requests:", result["failed"]),
             row("Maximum request concurrency:", settings["max_concurrency"]),
             row("Request rate (req/s):", settings["request_rate"]),
             row("Benchmark duration (s):", result["duration_s"]),
             row("Total input tokens:", result["total_input_tokens"]),
             row("Total generated tokens:", result["total_output_tokens"]),
             row("Request throughput (req/s):", result["request_throughput"]),
             row("Output token throughput (tok/s):", result["output_throughput"]),
             row("Total token throughput (tok/s):", result["total_token_throughput"])]
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        stats = result[f"{name}_ms"]
        lines.append(title(label))
        for key, shown in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            lines.append(row(f"{shown} {name.upper()} (ms):", stats[key]))
    lines.append(title("Speculative Decoding"))
    spec = result["speculative"]
    if spec is None:
        lines.append(f"not reported: {result['speculative_note']}")
    else:
        lines += [row("Acceptance rate (%):", None if spec["acceptance_rate"] is None else 100 * spec["acceptance_rate"]),
                  row("Acceptance length:", spec["mean_acceptance_length"]), row("Drafts:", spec["drafts"]),
                  row("Draft tokens:", spec["draft_tokens"]), row("Accepted tokens:", spec["accepted_tokens"])]
        if spec["acceptance_rate_per_position"]:
            lines.append("Per-position acceptance (%): "
                         + ", ".join(f"{100 * rate:.1f}" for rate in spec["acceptance_rate_per_position"]))
    for error in result["errors"]:
        lines.append(f"error ×{error['count']}: {error['message']}")
    lines.append("=" * width)
    return "\n".join(lines)


def plot_latency_cdfs(result: dict, path: str | Path) -> Path:
    """Empirical CDFs of TTFT, ITL and E2EL (ms), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dspark.evaluation.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, label) in zip(axes, (("ttft", "time to first token"), ("itl", "inter-token latency"),
                                        ("e2el", "end-to-end latency"))):
        values = np.sort(np.asarray(result["latencies_ms"][name], dtype=float))
        if len(values):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of values ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    settings = result["settings"]
    fig.suptitle(f"dspark bench serve: {settings['model']}, {result['completed']} requests, "
                 f"concurrency {settings['max_concurrency'] or 'unlimited'}, rate {settings['request_rate']} req/s",
                 fontsize=10)
    return save_figure(fig, path)


def plot_timeline(result: dict, path: str | Path) -> Path:
    """Resident memory (MiB), KV cache usage (%) and requests completed against the run's elapsed seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dspark.evaluation.report import save_figure

    points = result["timeline"]
    elapsed = [p["elapsed_s"] for p in points]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    panels = (("resident_memory_bytes", 1 / 2**20, "server resident memory (MiB)"),
              ("kv_cache_usage_perc", 100, "KV cache usage (%)"), ("completed", 1, "requests completed"))
    for ax, (key, scale, label) in zip(axes, panels):
        pairs = [(t, p[key] * scale) for t, p in zip(elapsed, points) if p[key] is not None]
        if pairs:
            ax.plot(*zip(*pairs), marker=".", lw=1.2)
        else:
            ax.text(0.5, 0.5, "not reported by /metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("elapsed (s)")
    fig.suptitle(f"dspark bench serve: server state during the run ({result['settings']['url']})", fontsize=10)
    return save_figure(fig, path)


def plot(result: dict, out_dir: str | Path) -> list[Path]:
    """latency_cdf.png, and timeline.png when the run has a timeline, in `out_dir`."""
    out = Path(out_dir)
    paths = [plot_latency_cdfs(result, out / "latency_cdf.png")]
    if result.get("timeline"):
        paths.append(plot_timeline(result, out / "timeline.png"))
    return paths
