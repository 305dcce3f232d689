"""`dspark serve` over real HTTP on loopback (dspark/serving/), driven by the official `openai` client and by raw
sockets: the API surface, greedy equality with `generate()` under 16 concurrent clients, seeded sampling
reproducible under concurrency, target logprobs, fuzzed bodies (4xx, never 5xx), client disconnects (KV back to
zero), API keys, the queue limit, timeouts, a dead engine, and SIGTERM draining a real `dspark serve` process.

The target is a tiny random Qwen3 with the byte-level test tokenizer, in float64 (no argmax near-ties between
differently batched forwards); the drafter is a random DSpark drafter (block 4) behind the engine's default
policy family (Algorithm 1 + lookahead behind the draft gate) on a fixed SPS profile.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig
from dspark.engine.generation import generate
from dspark.evaluation.serve_bench import wait_for_health
from dspark.models.drafters import load_drafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer, stop_token_ids
from dspark.serving.app import ServeConfig, build_app

from drafters_for_tests import save_dspark_folder

MODEL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
NAME = "tiny"
PROMPTS = ["def add(a, b):", "The quick brown fox", "import numpy as np\n", "Once upon a time", "x = [1, 2, 3]\nfor",
           "SELECT * FROM", "Hello, world", "# TODO:", "class Stack:", "while True:", "print(", "return None",
           "1 + 1 =", "lorem ipsum", "if __name__ ==", "fn main() {"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.2, **MODEL)
    drafter = save_dspark_folder(target, root / "drafter", block_size=4)
    profile = root / "sps.json"
    profile.write_text(json.dumps({"verify_ms_by_tokens": {"1": 10.0, "8": 11.0, "64": 20.0, "400": 80.0}}))
    return target, drafter, profile


def make_engine(folders, **config) -> Engine:
    target, drafter_dir, profile = folders
    runner = TargetRunner.from_pretrained(target, dtype="float64", cache_page_size=16)
    drafter = load_drafter(str(drafter_dir), dtype="float64")
    tokenizer = load_tokenizer(target)
    options = dict(max_num_seqs=16, max_num_batched_tokens=512, kv_cache_tokens=16 * 256, policy="causal-greedy-gated",
                   profile=str(profile))
    options.update(config)
    return Engine(runner, drafter, config=EngineConfig(**options), tokenizer=tokenizer,
                  eos_token_ids=stop_token_ids(target, tokenizer, runner.config.eos_token_ids))


class LiveServer:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.server

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, **kw)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, parsed JSON or text) of one request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data.decode("utf-8", "replace")
        return resp.status, dict(resp.getheaders()), parsed

    def post(self, path: str, obj, headers: dict | None = None):
        return self.raw("POST", path, json.dumps(obj).encode(), headers)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request and no KV page."""
        engine = self.state.engine
        deadline = time.time() + timeout
        while engine.requests or engine.blocks.used_pages:
            if time.time() > deadline:
                raise AssertionError(f"engine not idle: {len(engine.requests)} requests, {engine.blocks.used_pages} pages")
            time.sleep(0.01)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(folders):
    live = LiveServer(build_app(make_engine(folders), load_tokenizer(folders[0]), ServeConfig(served_model_name=NAME)))
    yield live
    live.close()


def check_error_body(status: int, body, expected: int | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    if expected is not None:
        assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- the API surface --------------------------------------------------------------------------------------------
def test_models_health_and_metrics_names(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.raw("GET", "/health")[0] == 200
    server.client().completions.create(model=NAME, prompt="abc", max_tokens=8, temperature=0)
    status, headers, text = server.raw("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("dspark:spec_decode_num_drafts_total", "dspark:spec_decode_num_draft_tokens_total",
                 "dspark:spec_decode_num_accepted_tokens_total", "dspark:spec_decode_num_accepted_tokens_per_pos_total",
                 "dspark:num_requests_running", "dspark:num_requests_waiting", "dspark:kv_cache_usage_perc",
                 "dspark:time_to_first_token_seconds_bucket", "dspark:inter_token_latency_seconds_bucket",
                 "dspark:e2e_request_latency_seconds_bucket", "dspark:request_queue_time_seconds_bucket",
                 "dspark:request_prompt_tokens_bucket", "dspark:request_generation_tokens_bucket",
                 "dspark:request_success_total", "dspark:verify_tokens_per_step_bucket",
                 "dspark:draft_gate_open_fraction", "dspark:calibration_drift",
                 "dspark:calibration_expected_accepted_tokens_per_pos_total", "process_resident_memory_bytes"):
        assert f"\n{name}" in text, name
    assert f'model_name="{NAME}"' in text


def test_completion_and_chat_streamed_and_not_agree(server):
    client = server.client()
    kw = dict(model=NAME, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(prompt="def add(a, b):", **kw)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 24 and plain.usage.total_tokens == plain.usage.prompt_tokens + 24
    chunks = list(client.completions.create(prompt="def add(a, b):", stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(messages=messages, model=NAME, max_completion_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 20
    stream = list(client.chat.completions.create(messages=messages, model=NAME, max_completion_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 20 and stream[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    # Without include_usage no usage chunk, and the stream ends with [DONE].
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 5, "stream": True}).encode(),
                 {"Content-Type": "application/json"})
    events = [line for line in conn.getresponse().read().decode().split("\n\n") if line]
    conn.close()
    assert events[-1] == "data: [DONE]" and all('"usage"' not in e for e in events)


def test_one_chunk_per_step_by_default_token_by_token_on_request(server):
    client = server.client()
    kw = dict(model=NAME, prompt="aaaa", max_tokens=40, temperature=0, stream=True,
              stream_options={"include_usage": True})
    per_step = list(client.completions.create(extra_body={"ignore_eos": True, "return_token_ids": True}, **kw))
    steps = [c for c in per_step if c.choices]
    tokens = [t for c in steps for t in c.choices[0].token_ids]
    assert len(tokens) == 40
    per_token = list(client.completions.create(
        extra_body={"ignore_eos": True, "return_token_ids": True},
        **dict(kw, stream_options={"include_usage": True, "token_by_token": True})))
    token_chunks = [c for c in per_token if c.choices]
    assert all(len(c.choices[0].token_ids) == 1 for c in token_chunks)
    assert [c.choices[0].token_ids[0] for c in token_chunks] == tokens
    assert "".join(c.choices[0].text for c in token_chunks) == "".join(c.choices[0].text for c in steps)


def test_stop_strings_cut_the_text(server):
    client = server.client()
    full = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:12]
    assert len(stop) == 2 and full.find(stop) >= 0
    cut = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=40, temperature=0, stop=[stop, "\x00"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=40, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_greedy_equals_generate_with_16_concurrent_clients(server, folders):
    tokenizer = load_tokenizer(folders[0])
    runner = TargetRunner.from_pretrained(folders[0], dtype="float64")
    stops = stop_token_ids(folders[0], tokenizer, runner.config.eos_token_ids)
    prompts = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    expected = generate(runner, prompts, sampling=SamplingParams(temperature=0.0), max_new_tokens=48,
                        stop_token_ids=stops).sequences
    client = server.client()

    def ask(text):
        out = client.completions.create(model=NAME, prompt=text, max_tokens=48, temperature=0,
                                        extra_body={"return_token_ids": True})
        return out.choices[0].token_ids, out.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, PROMPTS))
    for (ids, reason), seq in zip(got, expected):
        assert ids == seq.token_ids and reason == seq.finish_reason
    server.wait_idle()


def test_seeded_sampling_is_reproducible_under_concurrency(server):
    client = server.client()
    kw = dict(model=NAME, max_tokens=32, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True, "return_token_ids": True})
    alone = client.completions.create(prompt="Once upon a time", seed=1234, **kw).choices[0].token_ids
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(client.completions.create, prompt=p, seed=i, **kw) for i, p in enumerate(PROMPTS[:8])]
        time.sleep(0.05)  # the seeded request arrives while the others run
        crowded = client.completions.create(prompt="Once upon a time", seed=1234, **kw).choices[0].token_ids
        others = [f.result().choices[0].token_ids for f in futures]
    assert crowded == alone
    other = client.completions.create(prompt="Once upon a time", seed=99, **kw).choices[0].token_ids
    assert other != alone  # the seed matters (control)
    assert len({tuple(o) for o in others}) > 1


def test_n_choices_and_speculation_stats_and_opt_out(server):
    client = server.client()
    out = client.completions.create(model=NAME, prompt="abc", max_tokens=16, temperature=1.0, n=3, seed=5,
                                    extra_body={"ignore_eos": True, "spec_decode_stats": True})
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 48
    assert out.usage.prompt_tokens == 3  # a prompt counts once whatever n is ("abc": 3 byte tokens)
    two = client.completions.create(model=NAME, prompt=["abc", "de"], max_tokens=2, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.prompt_tokens == 5
    assert two.usage.completion_tokens == 8
    spec = out.model_extra["speculative_decoding"]
    assert spec["num_steps"] >= 3 and sum(spec["acceptance_histogram"]) == spec["num_steps"]
    assert spec["num_accepted_draft_tokens"] <= spec["num_draft_tokens"]
    off = client.completions.create(model=NAME, prompt="abc", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True, "spec_decode_stats": True, "speculative": False})
    assert off.model_extra["speculative_decoding"]["num_draft_tokens"] == 0
    # One token per decoding step without speculation (the prefill emits the first token).
    assert off.model_extra["speculative_decoding"]["num_steps"] == 15


def test_logprobs_are_the_targets(server, folders):
    client = server.client()
    out = client.completions.create(model=NAME, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0.7, seed=3, logprobs=3,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    runner = TargetRunner.from_pretrained(folders[0], dtype="float64")
    seq = runner.new_sequence()
    tokens = [5, 6, 7, 8] + choice.token_ids
    logits = runner.forward([seq], [tokens], logits_per_sequence=[len(tokens)]).logits
    reference = torch.log_softmax(logits.float(), -1)[3:-1]
    assert len(choice.logprobs.token_logprobs) == 12
    for k, token in enumerate(choice.token_ids):
        assert choice.logprobs.token_logprobs[k] == pytest.approx(float(reference[k, token]), abs=1e-4)
        assert 1 <= len(choice.logprobs.top_logprobs[k]) <= 3  # keyed by text: partial bytes all decode to U+FFFD
        assert max(choice.logprobs.top_logprobs[k].values()) == pytest.approx(float(reference[k].max()), abs=1e-4)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy: the top token


def test_bench_serve_against_the_server(server):
    from dspark.evaluation.serve_bench import ServeBenchSettings, run_serve_bench

    server.wait_idle()
    result = run_serve_bench(ServeBenchSettings(url=f"http://127.0.0.1:{server.port}", num_prompts=12, max_concurrency=4,
                                                max_tokens=16, ignore_eos=True, random_input_len=6, sample_interval_s=0.1))
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_output_tokens"] == 12 * 16  # from usage
    spec = result["speculative"]
    assert spec is not None and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert result["timeline"][-1]["kv_cache_usage_perc"] == 0.0
    assert result["timeline"][-1]["resident_memory_bytes"] > 0
    server.wait_idle()


# -- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, None),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "a", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "a", "tools": [{"type": "function"}]}, "tools"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "\ud800"}, None),
])
def test_invalid_completion_fields_are_400_naming_them(server, body, param):
    status, _, parsed = server.post("/v1/completions", body)
    check_error_body(status, parsed, 400)
    if param is not None:
        assert parsed["error"]["param"] == param and param in parsed["error"]["message"]


def test_other_client_errors(server):
    status, _, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"})
    check_error_body(status, body, 404)
    assert body["error"]["param"] == "model"
    status, _, body = server.post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
    check_error_body(status, body, 400)
    assert body["error"]["param"] == "messages.0.role"
    status, _, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    check_error_body(status, body, 400)
    status, _, body = server.raw("POST", "/v1/completions", b'{"prompt": "a",')
    check_error_body(status, body, 400)
    status, _, body = server.raw("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}')
    check_error_body(status, body, 400)
    status, _, body = server.raw("POST", "/v1/completions", b"[1, 2]")
    check_error_body(status, body, 400)
    status, _, body = server.raw("GET", "/v1/nothing")
    check_error_body(status, body, 404)
    status, _, body = server.raw("GET", "/v1/completions")
    check_error_body(status, body, 405)
    huge = json.dumps({"prompt": "a" * (server.state.config.max_body_bytes + 1)}).encode()
    status, _, body = server.raw("POST", "/v1/completions", huge)
    check_error_body(status, body, 413)
    status, _, body = server.post("/v1/completions", {"prompt": "a" * 300, "max_tokens": 1})
    check_error_body(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=NAME, prompt="a", max_tokens=-1)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "ignore_eos", "speculative", "tools",
          "unknown_field", "response_format", "stop_token_ids"]
BODY = st.fixed_dictionaries(
    {"max_tokens": st.one_of(st.integers(1, 3), JSON_VALUES)},
    optional={name: JSON_VALUES | st.sampled_from([1, 0, -1, 2**63, "x", [], {}, 0.5, True])
              for name in FIELDS if name != "max_tokens"},
)
RAW_BODIES = st.sampled_from([b"", b"{", b"null", b'"text"', b"\xff\xff", b'{"prompt": "\xc3\x28"}', b"{" * 5000,
                              b'{"prompt": NaN}', b'{"prompt": "a", "temperature": Infinity}', b'{"prompt": "a"}x'])


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODY, endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), stream=st.booleans())
def test_fuzzed_bodies_never_5xx(server, body, endpoint, stream):
    if isinstance(body.get("stream"), bool) or "stream" not in body:
        body["stream"] = stream
    status, _, parsed = server.post(endpoint, body)
    assert status < 500, (status, body, parsed)
    if status >= 400:
        check_error_body(status, parsed)
    elif body["stream"] is True:
        assert isinstance(parsed, str) and parsed.rstrip().endswith("data: [DONE]") or '"error"' in parsed
    else:
        assert parsed["choices"], parsed


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=RAW_BODIES | st.binary(max_size=64), endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_malformed_bytes_are_400(server, raw, endpoint):
    status, _, parsed = server.raw("POST", endpoint, raw)
    check_error_body(status, parsed, 400)


def test_server_healthy_after_the_fuzz(server):
    assert server.raw("GET", "/health")[0] == 200
    out = server.client().completions.create(model=NAME, prompt="still fine", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    server.wait_idle()


# -- disconnects, keys, limits ---------------------------------------------------------------------------------
def _aborted(server) -> float:
    text = server.raw("GET", "/metrics")[2]
    for line in text.splitlines():
        if line.startswith("dspark:request_success_total") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_disconnect_mid_stream_frees_the_kv(server):
    server.wait_idle()
    before = _aborted(server)
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "abc", "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"data: {" not in received:
        received += sock.recv(4096)
    assert server.state.engine.blocks.used_pages > 0
    sock.close()
    server.wait_idle(5)
    assert _aborted(server) == before + 1


def test_disconnect_while_waiting_for_a_whole_response_frees_the_kv(server):
    server.wait_idle()
    before = _aborted(server)
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"prompt": "abc", "max_tokens": 220, "ignore_eos": True, "temperature": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 10
    while not server.state.engine.requests:
        assert time.time() < deadline
        time.sleep(0.005)
    sock.close()
    server.wait_idle(5)
    assert _aborted(server) == before + 1


def test_api_key_is_required_except_on_health(server):
    config = server.state.config
    config.api_key = "s3cret"
    try:
        assert server.raw("GET", "/health")[0] == 200
        for path in ("/v1/models", "/metrics"):
            status, _, body = server.raw("GET", path)
            check_error_body(status, body, 401)
        status, _, body = server.post("/v1/completions", {"prompt": "a"}, {"Authorization": "Bearer wrong"})
        check_error_body(status, body, 401)
        with pytest.raises(openai.AuthenticationError):
            server.client("s3cre").completions.create(model=NAME, prompt="a", max_tokens=2)
        out = server.client("s3cret").completions.create(model=NAME, prompt="a", max_tokens=2)
        assert out.usage.completion_tokens >= 1
    finally:
        config.api_key = None


def test_full_queue_is_429_with_retry_after(server):
    loop = server.state.loop
    old = loop.max_open
    loop.max_open = 1
    try:
        first = threading.Thread(target=server.post, args=("/v1/completions", {"prompt": "a", "max_tokens": 200,
                                                                              "ignore_eos": True}))
        first.start()
        deadline = time.time() + 10
        while not loop.num_open:
            assert time.time() < deadline
            time.sleep(0.005)
        status, headers, body = server.post("/v1/completions", {"prompt": "b", "max_tokens": 2})
        check_error_body(status, body, 429)
        assert headers["retry-after"] == "1"
        first.join(30)
    finally:
        loop.max_open = old
    server.wait_idle()


def test_request_timeout_aborts(server):
    config = server.state.config
    config.request_timeout_s = 0.05
    try:
        status, _, body = server.post("/v1/completions", {"prompt": "a", "max_tokens": 220, "ignore_eos": True})
        check_error_body(status, body, 408)
        _, _, text = server.post("/v1/completions", {"prompt": "a", "max_tokens": 220, "ignore_eos": True, "stream": True})
        assert '"code":"request_timeout"' in text and "[DONE]" not in text
    finally:
        config.request_timeout_s = 600.0
    server.wait_idle(5)


def test_dead_engine_answers_503_and_ends_open_streams(folders):
    engine = make_engine(folders)
    live = LiveServer(build_app(engine, load_tokenizer(folders[0]), ServeConfig(served_model_name=NAME)))
    try:
        assert live.raw("GET", "/health")[0] == 200
        with torch.no_grad():
            for p in engine.runner.model.parameters():
                p.fill_(float("nan"))  # the next step's logits are NaN: the engine stops
        _, _, text = live.post("/v1/completions", {"prompt": "a", "max_tokens": 5, "stream": True})
        assert '"error"' in text and "non-finite" in text
        status, _, body = live.raw("GET", "/health")
        assert status == 503 and body["error"]["code"] == "engine_unavailable"
        status, _, body = live.post("/v1/completions", {"prompt": "a", "max_tokens": 5})
        assert status == 503
    finally:
        live.close()


# -- SIGTERM ----------------------------------------------------------------------------------------------------
def test_sigterm_drains_running_requests_and_exits_0(folders, tmp_path):
    target, drafter, profile = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "dspark", "serve", "--model", str(target), "--drafter", str(drafter),
                             "--profile", str(profile), "--port", str(port), "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", 120, proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({
            "prompt": "abc", "max_tokens": 150, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        assert first.startswith(b"data: {")
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        usage = json.loads([e for e in rest.split("\n\n") if '"usage"' in e][-1][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 150
        assert proc.wait(60) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
