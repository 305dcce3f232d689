"""`dspark.serving.ray_app`: two Ray Serve replicas of `dspark serve` on a local Ray instance on loopback, driven
through Serve's HTTP proxy by the official `openai` client.

Checks that both replicas serve (each response names its replica in `x-dspark-replica`, and each replica's
own /metrics counts the requests it finished: together, every request sent), that greedy outputs of one
prompt are equal whichever replica answered (the target is the tiny random Qwen3 of tests/test_serve.py in
float64, so differently batched forwards have no argmax near-ties), that streaming, /health and /metrics pass
through the proxy, and that a bad body is a 400 with OpenAI's error body. Skipped, with the reason, when Ray
is not installed or cannot start here (all but the check of the error that says how to install it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dspark.engine.engine import EngineConfig
from dspark.errors import ConfigError
from dspark.models.random_init import build_random_model
from dspark.serving.app import ServeConfig
from dspark.serving.ray_app import INSTALL_HINT, REPLICA_HEADER, build_deployment, main
from dspark.serving.server import ModelOptions

from drafters_for_tests import save_dspark_folder

# Read by Ray when it is imported: the local instance's GCS, raylet and workers listen on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODEL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
NAME = "tiny"
APP = "dspark-test"
PROMPTS = ["def add(a, b):", "The quick brown fox"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    """Runs first: no Ray instance of this module is running while `ray` is hidden."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ConfigError, match=re.escape(INSTALL_HINT)):
        build_deployment(ModelOptions(), EngineConfig(), ServeConfig(), min_replicas=2, max_replicas=2)


@pytest.fixture(scope="module")
def ray_serve():
    """(ray, ray.serve), or the module's Ray tests skipped with the reason."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dspark[ray]')")
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'dspark[ray]')")
    return ray, serve


@pytest.fixture(scope="module")
def proxy(ray_serve, tmp_path_factory):
    """The base URL of Serve's HTTP proxy on 127.0.0.1, in front of exactly two replicas."""
    ray, serve = ray_serve
    root = tmp_path_factory.mktemp("ray_serve")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.2, **MODEL)
    drafter = save_dspark_folder(target, root / "drafter", block_size=4)
    profile = root / "sps.json"
    profile.write_text(json.dumps({"verify_ms_by_tokens": {"1": 10.0, "8": 11.0, "64": 20.0, "400": 80.0}}))
    app = build_deployment(
        ModelOptions(str(target), str(drafter), device="cpu", dtype="float64"),
        EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, kv_cache_tokens=16 * 256, page_size=16,
                     policy="causal-greedy-gated", profile=str(profile)),
        ServeConfig(served_model_name=NAME),
        min_replicas=2, max_replicas=2, num_cpus_per_replica=1, threads=1, drain_timeout_s=5)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False)
    except Exception as exc:  # no shared memory, no free ports, a sandbox refusing subprocesses...
        pytest.skip(f"ray cannot start here: {type(exc).__name__}: {exc}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def complete(base: str, prompt: str):
    """(status, replica id, parsed completion) of one greedy completion."""
    raw = client(base).completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    return raw.status_code, raw.headers.get(REPLICA_HEADER), raw.parse()


def finished_requests(metrics_text: str) -> float:
    """Σ dspark:request_success_total over finish reasons, from one replica's /metrics."""
    pattern = r'^dspark:request_success_total\{[^}]*model_name="' + NAME + r'"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics_text, flags=re.M))


def test_two_replicas_serve_equal_greedy_outputs(ray_serve, proxy):
    status = ray_serve[1].status().applications[APP]
    assert status.status == "RUNNING", status
    [deployment] = status.deployments.values()
    assert deployment.replica_states == {"RUNNING": 2}, deployment.replica_states

    prompts: list[str] = []
    answers: list = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(4):  # rounds of 8 concurrent requests, until each replica answered each prompt
            batch = [PROMPTS[i % 2] for i in range(8)]
            answers += pool.map(lambda p: complete(proxy, p), batch)
            prompts += batch
            if all(len({a[1] for p, a in zip(prompts, answers) if p == q}) == 2 for q in PROMPTS):
                break
    replicas = {replica for _, replica, _ in answers}
    assert len(replicas) == 2 and None not in replicas, replicas
    for prompt in PROMPTS:
        mine = [(replica, out) for p, (status_code, replica, out) in zip(prompts, answers) if p == prompt]
        assert {replica for replica, _ in mine} == replicas, f"{prompt!r} was answered by one replica only"
        texts = {out.choices[0].text for _, out in mine}
        assert len(texts) == 1, f"greedy outputs of {prompt!r} differ across replicas: {texts}"
        assert mine[0][1].choices[0].text, "empty completion"
    for status_code, _, out in answers:
        assert status_code == 200
        assert out.model == NAME
        assert out.usage is not None and out.usage.prompt_tokens > 0
        assert 0 < out.usage.completion_tokens <= 12
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # Each replica's own /metrics (the proxy picks a replica per scrape; the header names it): both engines
    # finished requests, and together every request sent.
    counts: dict[str, float] = {}
    with httpx.Client(base_url=proxy, timeout=30) as http:
        for _ in range(50):
            scrape = http.get("/metrics")
            assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
            counts[scrape.headers[REPLICA_HEADER]] = finished_requests(scrape.text)
            if len(counts) == 2:
                break
        assert set(counts) == replicas, counts
        assert all(count > 0 for count in counts.values()), counts
        assert sum(counts.values()) == len(answers), (counts, len(answers))

        health = http.get("/health")
        assert health.status_code == 200 and health.headers[REPLICA_HEADER] in replicas


def test_streaming_matches_and_errors_pass_through_the_proxy(proxy):
    _, _, expected = complete(proxy, PROMPTS[0])
    stream = client(proxy).completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens

    with httpx.Client(base_url=proxy, timeout=30) as http:
        for body in (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', b"{not json", b'{"model": "tiny"}'):
            response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (body, response.status_code, response.text)
            error = response.json()
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
            assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
            assert response.headers[REPLICA_HEADER]
        missing = http.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(proxy).completions.create(model=NAME, prompt="", max_tokens=4)


def test_command_line_errors_before_ray_starts(ray_serve, capsys):
    assert main(["--min-replicas", "3", "--max-replicas", "2", "--port", "0"]) == 2
    assert "max_replicas (2) must be ≥ min_replicas (3)" in capsys.readouterr().err
    assert main(["--profile", "/nonexistent/sps.json", "--port", "0"]) == 2
    assert "no such file" in capsys.readouterr().err
