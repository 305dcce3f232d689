"""`dspark bench serve`'s pieces without a server: the latency statistics, the /metrics deltas on text that
prometheus_client itself writes, SSE streams fed as the bytes a server sends (split anywhere), the Poisson
arrivals, the request bodies, and the flags refused before any request (the run against the real `dspark serve`
is tested with the server)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest

from dspark.cli import main
from dspark.evaluation.serve_bench import (CompletionStream, SSEDecoder, ServeBenchSettings, arrival_offsets,
                                           error_counts, http_error_text, latency_stats, normalize_url, parse_metrics,
                                           random_prompts, request_body, speculative_delta, stream_result, summarize,
                                           RequestResult)


# ------------------------------------------------------------------------------------------------- statistics


def test_latency_stats_of_known_numbers():
    stats = latency_stats([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])  # 1..10, unordered
    assert stats["mean"] == pytest.approx(5.5)
    assert stats["median"] == pytest.approx(5.5)
    assert stats["p90"] == pytest.approx(9.1)  # linear: 9 + 0.1 × (10 − 9)
    assert stats["p99"] == pytest.approx(9.91)
    assert stats["std"] == pytest.approx(math.sqrt(8.25))  # population std of 1..10
    assert latency_stats([4.0]) == {"mean": 4.0, "median": 4.0, "p90": 4.0, "p99": 4.0, "std": 0.0}
    assert latency_stats([]) == {"mean": None, "median": None, "p90": None, "p99": None, "std": None}


def test_summary_counts_tokens_from_usage_and_times_in_ms():
    results = [RequestResult(0, prompt_tokens=7, completion_tokens=5, ttft_s=0.1, e2el_s=0.5, itl_s=[0.2, 0.2]),
               RequestResult(1, prompt_tokens=3, completion_tokens=1, ttft_s=0.05, e2el_s=0.05),
               RequestResult(2, error="HTTP 400: bad"), RequestResult(3, error="no usage in the stream"),
               RequestResult(4, error="HTTP 400: bad")]
    summary = summarize(results, duration_s=2.0)
    assert (summary["completed"], summary["failed"]) == (2, 3)
    assert summary["errors"] == [{"message": "HTTP 400: bad", "count": 2}, {"message": "no usage in the stream", "count": 1}]
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (10, 6)
    assert summary["output_throughput"] == pytest.approx(3.0)
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx(100.0)  # (500 − 100) / (5 − 1); one token: no TPOT
    assert summary["latencies_ms"]["itl"] == pytest.approx([200.0, 200.0])
    assert summary["e2el_ms"]["median"] == pytest.approx(275.0)
    many = [RequestResult(i, error=f"error {i}") for i in range(15)]
    assert [e["message"] for e in error_counts(many)] == [f"error {i}" for i in range(10)]


# ---------------------------------------------------------------------------------------------------- metrics


def exposition(prefix: str, drafts: dict[str, int], draft_tokens: int, accepted: int, per_position: list[int],
               kv_usage: float | None = None, process: bool = False) -> str:
    """Prometheus text as a server using prometheus_client writes it; `drafts` per model_name label."""
    registry = CollectorRegistry()
    counters = {name: Counter(f"{prefix}spec_decode_num_{name}", "help", ["model_name"], registry=registry)
                for name in ("drafts", "draft_tokens", "accepted_tokens")}
    for model, count in drafts.items():
        counters["drafts"].labels(model).inc(count)
    counters["draft_tokens"].labels("m").inc(draft_tokens)
    counters["accepted_tokens"].labels("m").inc(accepted)
    by_position = Counter(f"{prefix}spec_decode_num_accepted_tokens_per_pos", "help", ["model_name", "position"],
                          registry=registry)
    for position, count in enumerate(per_position):
        by_position.labels("m", str(position)).inc(count)
    if kv_usage is not None:
        Gauge(f"{prefix}kv_cache_usage_perc", "help", ["model_name"], registry=registry).labels("m").set(kv_usage)
    if process:
        ProcessCollector(registry=registry)
    return generate_latest(registry).decode()


def test_speculative_delta_from_prometheus_text():
    before = parse_metrics(exposition("dspark:", {"a": 10, "b": 5}, 60, 30, [12, 8, 5], kv_usage=0.0))
    after = parse_metrics(exposition("dspark:", {"a": 30, "b": 25}, 260, 150, [52, 38, 25, 5], kv_usage=0.25))
    assert before.spec["drafts"] == 15 and after.kv_cache_usage_perc == pytest.approx(0.25)
    delta = speculative_delta(before, after)
    assert delta["metrics_prefix"] == "dspark:"
    assert (delta["drafts"], delta["draft_tokens"], delta["accepted_tokens"]) == (40, 200, 120)
    assert delta["acceptance_rate"] == pytest.approx(0.6)
    assert delta["mean_acceptance_length"] == pytest.approx(4.0)  # 1 + 120 / 40
    assert delta["accepted_per_position"] == [40, 30, 20, 5]  # position 3 is new: counted from 0
    assert delta["acceptance_rate_per_position"] == pytest.approx([1.0, 0.75, 0.5, 0.125])
    json.dumps(delta, allow_nan=False)


def test_vllm_prefix_and_the_absent_cases():
    vllm = parse_metrics(exposition("vllm:", {"m": 4}, 12, 6, [3, 2, 1]))
    assert vllm.spec["prefix"] == "vllm:" and vllm.spec["accepted_per_position"] == {0: 3, 1: 2, 2: 1}
    both = parse_metrics(exposition("dspark:", {"m": 1}, 2, 1, [1]) + exposition("vllm:", {"m": 9}, 9, 9, [9]))
    assert both.spec["prefix"] == "dspark:" and both.spec["drafts"] == 1  # one prefix, never their sum
    idle = parse_metrics(exposition("dspark:", {"m": 4}, 12, 6, [3]))
    assert speculative_delta(idle, idle)["acceptance_rate"] is None  # nothing drafted during the run
    plain = parse_metrics(exposition("other:", {"m": 4}, 12, 6, [3], process=Path("/proc/self/stat").exists()))
    assert plain.spec is None and speculative_delta(plain, plain) is None
    if Path("/proc/self/stat").exists():
        assert plain.resident_memory_bytes > 1 << 20
    assert speculative_delta(None, vllm) is None
    with pytest.raises(ValueError):
        parse_metrics("<html><body>not found</body></html>")
    with pytest.raises(ValueError):
        parse_metrics('{"detail": "Not Found"}')


# ------------------------------------------------------------------------------------------------ SSE streams


def sse(*events: object, newline: str = "\n") -> bytes:
    """The bytes of a stream: each event as `data: <json>` (strings as they are) and a blank line."""
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)}{newline}{newline}"
                   for e in events)
    return text.encode()


def completion(text: str) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


def usage(prompt: int, completion_tokens: int) -> dict:
    return {"id": "cmpl-1", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens}}


def feed(stream: CompletionStream, data: bytes, cuts: list[int], times: list[float]) -> CompletionStream:
    """Feed `data` split at `cuts`, chunk k arriving at times[k] (the last time for the chunks beyond)."""
    bounds = [0, *cuts, len(data)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        stream.feed(data[a:b], times[min(k, len(times) - 1)])
    stream.close()
    return stream


GOOD = sse(completion("Hé"), completion(" wörld ✓"), completion(""), completion("!"), usage(4, 6), "[DONE]")


def test_sse_split_anywhere_gives_the_same_events():
    whole = feed(CompletionStream("completions"), GOOD, [], [1.0])
    assert len(whole.text_times) == 3 and whole.done and whole.failure() is None
    assert whole.usage["completion_tokens"] == 6
    for cut in range(1, len(GOOD)):  # every split point, including inside "é", "✓" and "\n\n"
        stream = feed(CompletionStream("completions"), GOOD, [cut], [1.0, 2.0])
        assert len(stream.text_times) == 3 and stream.usage == whole.usage and stream.failure() is None, cut
    crlf = sse(completion("a"), completion("b"), usage(1, 2), "[DONE]", newline="\r\n")
    for cut in range(1, len(crlf)):  # "\r" and "\n" of one line end in different chunks
        stream = feed(CompletionStream("completions"), crlf, [cut], [1.0, 2.0])
        assert len(stream.text_times) == 2 and stream.usage["completion_tokens"] == 2, cut
    byte_by_byte = feed(CompletionStream("completions"), GOOD, list(range(1, len(GOOD))), [1.0])
    assert len(byte_by_byte.text_times) == 3


def test_sse_decoder_fields_comments_and_multiline_data():
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\nevent: message\nid: 7\ndata: one\ndata:two\n\nretry: 5\n") == ["one\ntwo"]
    decoder.close()
    assert not decoder.truncated
    crlf = b"data: one\r\ndata: two\r\n\r\n"
    for cut in range(1, len(crlf)):  # a "\r\n" split between chunks is one line end, not two
        decoder = SSEDecoder()
        assert decoder.feed(crlf[:cut]) + decoder.feed(crlf[cut:]) == ["one\ntwo"], cut
    decoder = SSEDecoder()
    assert decoder.feed(b"data: tail\n") == []
    decoder.close()
    assert decoder.truncated  # the stream ended before the event's blank line: the event is dropped


def test_stream_times_ttft_itl_and_tpot():
    data = sse(completion("a"), completion("bc"), completion("def"), usage(5, 7), "[DONE]")
    ends = [i + 2 for i in range(len(data)) if data[i:i + 2] == b"\n\n"]
    stream = feed(CompletionStream("completions"), data, ends[:-1], [10.25, 10.5, 11.0, 11.2, 11.3])
    result = stream_result(3, stream, sent=10.0, ended=11.5)
    assert result.ok and (result.prompt_tokens, result.completion_tokens) == (5, 7)
    assert result.ttft_s == pytest.approx(0.25)
    assert result.itl_s == pytest.approx([0.25, 0.5])  # between chunks, however many tokens each carried
    assert result.e2el_s == pytest.approx(1.5)
    assert result.tpot_s == pytest.approx((1.5 - 0.25) / 6)


def test_chat_role_chunk_is_not_the_first_token():
    data = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
               {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}, usage(3, 1), "[DONE]")
    ends = [i + 2 for i in range(len(data)) if data[i:i + 2] == b"\n\n"]
    stream = feed(CompletionStream("chat"), data, ends[:-1], [1.0, 2.0, 3.0, 3.0])
    result = stream_result(0, stream, sent=0.0, ended=3.0)
    assert result.ttft_s == pytest.approx(2.0) and result.tpot_s is None  # one token: no TPOT
    assert not feed(CompletionStream("completions"), data, [], [1.0]).text_times  # no "text" field in chat chunks


def test_mid_stream_error_and_missing_usage_fail_the_request():
    error = {"error": {"message": "The engine failed: CUDA out of memory", "type": "InternalServerError",
                       "param": None, "code": 500}}
    data = sse(completion("a"), completion("b"), error, completion("c"), usage(2, 3), "[DONE]")
    for cut in (0, 5, len(data) // 2, len(data) - 3):
        stream = feed(CompletionStream("completions"), data, [cut] if cut else [], [1.0, 2.0])
        assert stream.failure() == "The engine failed: CUDA out of memory", cut
        assert len(stream.text_times) == 2 and stream.usage is None  # nothing after the error is taken
    result = stream_result(0, stream, sent=0.0, ended=2.0)
    assert not result.ok and result.completion_tokens == 0
    no_usage = feed(CompletionStream("completions"), sse(completion("a"), completion("b"), "[DONE]"), [], [1.0])
    assert no_usage.failure() == "no usage in the stream"
    cut_off = feed(CompletionStream("completions"), sse(completion("a"))[:-5], [], [1.0])  # connection dropped
    assert cut_off.failure() == "no usage in the stream (it ended inside an event)"
    assert feed(CompletionStream("completions"), b"data: {not json\n\n", [], [1.0]).failure().startswith("malformed")
    bad_usage = feed(CompletionStream("completions"), sse({"choices": [], "usage": {"prompt_tokens": 1}}), [], [1.0])
    assert "completion_tokens" in bad_usage.failure()


def test_http_error_messages():
    body = json.dumps({"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError",
                                 "param": "max_tokens", "code": 400}}).encode()
    assert http_error_text(400, body) == "HTTP 400: max_tokens must be at least 1"
    assert http_error_text(422, b'{"detail": "Unprocessable"}') == "HTTP 422: Unprocessable"
    assert http_error_text(502, b"<html>\n Bad gateway\n</html>") == "HTTP 502: <html> Bad gateway </html>"
    assert http_error_text(500, b"") == "HTTP 500: (empty body)"


# ------------------------------------------------------------------------------------- arrivals and requests


def test_poisson_arrivals():
    rate, count = 5.0, 20_000
    offsets = arrival_offsets(count, rate, np.random.default_rng(7))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and len(offsets) == count and np.all(gaps >= 0)
    # mean gap 1/λ = 0.2 s: the standard error over 19 999 gaps is 0.2/√19999 ≈ 0.0014 s; 3 % is ≈ 4 of them
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential: coefficient of variation 1
    assert np.array_equal(offsets, arrival_offsets(count, rate, np.random.default_rng(7)))
    assert not np.array_equal(offsets, arrival_offsets(count, rate, np.random.default_rng(8)))
    assert np.array_equal(arrival_offsets(4, math.inf, np.random.default_rng(0)), np.zeros(4))
    assert len(arrival_offsets(1, rate, np.random.default_rng(0))) == 1


def test_random_prompts_are_seeded_words():
    prompts = random_prompts(3, 50, seed=1)
    assert prompts == random_prompts(3, 50, seed=1) and prompts != random_prompts(3, 50, seed=2)
    assert len(set(prompts)) == 3
    assert all(len(p.split(" ")) == 50 and all(w.isalpha() and 2 <= len(w) <= 8 for w in p.split(" ")) for p in prompts)


def test_request_bodies():
    plain = request_body(ServeBenchSettings(url="http://x", max_tokens=9), "m", "hello")
    assert plain == {"model": "m", "prompt": "hello", "max_tokens": 9, "temperature": 0.0, "stream": True,
                     "stream_options": {"include_usage": True}}
    chat = request_body(ServeBenchSettings(url="http://x", endpoint="chat", seed=5, ignore_eos=True, temperature=1.0),
                        "m", "hello")
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and chat["max_completion_tokens"] == 128
    assert (chat["seed"], chat["ignore_eos"], chat["temperature"]) == (5, True, 1.0) and "prompt" not in chat
    assert normalize_url("http://localhost:8000/v1/") == "http://localhost:8000"
    assert normalize_url("https://host/prefix/") == "https://host/prefix"


# ------------------------------------------------------------------------------------------------------- CLI


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, culprit", [
    (["--num-prompts", "0"], "--num-prompts"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--request-rate", "0"], "--request-rate"),
    (["--request-rate", "nan"], "--request-rate"),
    (["--warmup-prompts", "-1"], "--warmup-prompts"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--timeout", "0"], "--timeout"),
    (["--sample-interval", "-1"], "--sample-interval"),
    (["--random-input-len", "0"], "--random-input-len"),
    (["--limit", "3"], "--limit"),
    (["--datasets", "gsm8k"], "--datasets"),
    (["--dataset", "eval", "--random-input-len", "5"], "--random-input-len"),
    (["--dataset", "eval", "--limit", "0"], "--limit"),
    (["--dataset", "eval", "--datasets", "no-such-set"], "--datasets"),
    (["--model", " "], "--model"),
    (["--api-key", "two words"], "--api-key"),
    (["--endpoint", "embeddings"], "--endpoint"),
    (["--dataset", "sharegpt"], "--dataset"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_flags_are_refused_before_any_request(extra, culprit, capsys):
    url = f"http://127.0.0.1:{closed_port()}"  # a request would fail with the URL, not the flag
    try:
        code = main(["bench", "serve", "--url", url, "--no-progress", *extra])
    except SystemExit as exc:  # argparse's own refusals (choices, types)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert culprit in err.strip().splitlines()[-1]


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host/", "http://", "http://host/?q=1"])
def test_bad_url_is_refused(url, capsys):
    assert main(["bench", "serve", "--url", url, "--no-progress"]) == 2
    assert "--url" in capsys.readouterr().err


def test_unreachable_server_and_bad_output_folder(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["bench", "serve", "--url", url, "--no-progress", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--url {url}: cannot reach the server" in err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["bench", "serve", "--url", url, "--no-progress", "--out", str(a_file)]) == 2
    assert f"--out {a_file}" in capsys.readouterr().err  # checked before the server is asked
    assert a_file.read_text() == "x"


def test_api_key_from_the_environment_is_checked(monkeypatch, capsys):
    monkeypatch.delenv("DSPARK_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "bad key\n")
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{closed_port()}", "--no-progress"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
