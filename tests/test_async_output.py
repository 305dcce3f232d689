"""Async output processing (dspark/engine/engine.py, `EngineConfig.async_output`; issue 17's "CPU time hidden
behind GPU time"): each step's tokens are detokenized and returned by the next step, while its forward runs.
On this CPU nothing overlaps, but the bookkeeping is the same as on a GPU, so the guarantee is checked here:
every request's tokens, text, finish reason and logprobs are those of the synchronous engine — a stop string
found one step late included — and every KV page comes back.

The built-in model and tokenizer (float32) with the built-in DSpark drafter, every draft verified (no SPS
profile to measure): several tokens per step, so stop strings land inside accepted blocks.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig
from dspark.errors import ConfigError
from dspark.models.drafters import load_drafter
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer
from dspark.models.zoo import resolve_drafter, resolve_target
from dspark.serving.metrics import ServerMetrics

PROMPTS = ["The history of the city", "Once upon a time", "The river", "In the morning the market"]


@pytest.fixture(scope="module")
def models():
    folder = resolve_target(None)
    runner = TargetRunner.from_pretrained(folder, device="cpu", dtype="float32")
    drafter = load_drafter(resolve_drafter(None), device="cpu", dtype="float32", target=runner.model)
    return runner, drafter, load_tokenizer(folder)


def run(models, requests: list[dict], async_output: bool, abort_after: dict | None = None):
    """Per request: (token ids, text, finish reason, logprobs, number of outputs with finished set), from the
    streamed outputs; `abort_after` {request id: outputs seen before aborting it}. Also the engine, whose
    requests are all gone and whose KV pages are all back by the end."""
    runner, drafter, tok = models
    config = EngineConfig(kv_cache_tokens=2048, policy="verify-all", async_output=async_output)
    engine = Engine(runner, drafter, tokenizer=tok, config=config)
    added = {}
    for spec in requests:
        spec = dict(spec)
        request_id = spec.pop("id")
        added[request_id] = engine.add_request(request_id, tok.encode(spec.pop("prompt"), add_special_tokens=False), **spec)
    tokens, text, reasons, logprobs, ends, seen = (defaultdict(list), defaultdict(str), {}, defaultdict(list),
                                                  defaultdict(int), defaultdict(int))
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            text[out.request_id] += out.new_text
            logprobs[out.request_id] += out.logprobs or []
            seen[out.request_id] += 1
            if out.finished:
                reasons[out.request_id] = out.finish_reason
                ends[out.request_id] += 1
            if abort_after and seen[out.request_id] == abort_after.get(out.request_id):
                assert engine.abort(out.request_id)
    result = {rid: (tokens[rid], text[rid], reasons.get(rid), logprobs[rid], ends[rid]) for rid in seen}
    for rid, request in added.items():  # what `generate` reports: the request's own record agrees with its stream
        assert request.finish_reason == reasons.get(rid, "abort")
        if rid in reasons:
            assert request.output_ids == tokens[rid] and request.output_logprobs == logprobs[rid]
        else:  # aborted: its last step's tokens may not have been streamed yet
            assert request.output_ids[: len(tokens[rid])] == tokens[rid]
    assert not engine.requests and engine.blocks.used_pages == 0 and not engine.blocks.check_no_leak()  # pages back
    engine.close()
    return result, engine


def stop_strings(models) -> list[str]:
    """Three-character pieces of the greedy continuations' text, from their second half (a stop string that
    occurs after several steps, inside a block of accepted drafts or across two)."""
    result, _ = run(models, [dict(id=i, prompt=p, max_new_tokens=40) for i, p in enumerate(PROMPTS)], False)
    stops = []
    for i in range(len(PROMPTS)):
        text = result[i][1]
        stops.append(next(text[j: j + 3] for j in range(len(text) // 2, len(text) - 3) if text[j: j + 3].strip()))
    return stops


def test_async_outputs_equal_the_synchronous_engines(models):
    stops = stop_strings(models)
    requests = [dict(id=f"stop{i}", prompt=p, max_new_tokens=40, stop=[stops[i]]) for i, p in enumerate(PROMPTS)]
    requests += [
        dict(id="length", prompt=PROMPTS[0], max_new_tokens=9),
        dict(id="logprobs", prompt=PROMPTS[1], max_new_tokens=12, logprobs=2, text_per_token=True),
        dict(id="sampled", prompt=PROMPTS[2], max_new_tokens=30, sampling=SamplingParams(temperature=1.0, top_p=0.9),
             seed=11, stop=[stops[2]]),
    ]
    expected, sync_engine = run(models, requests, False)
    got, engine = run(models, requests, True)
    assert got == expected
    assert all(reason == "stop" for rid, (_, _, reason, _, _) in expected.items() if rid.startswith("stop"))
    assert expected["length"][2] == "length" and len(expected["logprobs"][3]) == 12
    assert all(ends == 1 for *_, ends in got.values())  # each request finished exactly once
    assert engine.async_output and not sync_engine.async_output
    assert engine.late_stops > 0 and sync_engine.late_stops == 0  # requests that ran a step past their stop string
    metrics = ServerMetrics("m")  # what /metrics shows
    metrics.snapshot = engine.stats().to_dict()
    late = next(f for f in metrics.collect() if f.name == "dspark:num_late_stops")
    assert late.samples[0].value == engine.late_stops


def test_an_aborted_request_gets_no_output_after_the_abort(models):
    requests = [dict(id=rid, prompt=p, max_new_tokens=30) for rid, p in zip("abc", PROMPTS)]
    expected, _ = run(models, requests, False)
    got, engine = run(models, requests, True, abort_after={"b": 2})
    assert got["a"] == expected["a"] and got["c"] == expected["c"]
    tokens, _, reason, _, ends = got["b"]
    assert reason is None and ends == 0 and tokens == expected["b"][0][: len(tokens)] and 0 < len(tokens) < 30
    assert engine.blocks.used_pages == 0 and not engine.blocks.check_no_leak()


def test_async_output_is_on_by_default_only_on_cuda(models):
    runner = models[0]
    assert not Engine(runner, config=EngineConfig(kv_cache_tokens=256)).async_output  # this machine's CPU
    with pytest.raises(ConfigError, match="async_output"):
        EngineConfig(async_output="yes")


def test_the_serve_flags_reach_the_engine_and_model_options():
    import argparse

    from dspark.commands.serve import add_server_args, configs_from_args

    parser = argparse.ArgumentParser()
    add_server_args(parser, "port")
    model, engine, _ = configs_from_args(parser.parse_args([]))
    assert engine.async_output is None and model.attention_backend == "auto"  # on CUDA only; SDPA
    model, engine, _ = configs_from_args(parser.parse_args(["--disable-async-output-proc", "--attention-backend", "flex"]))
    assert engine.async_output is False and model.attention_backend == "flex"
