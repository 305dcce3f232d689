"""The serving engine under continuous batching (dspark/engine/engine.py): requests arrive at random steps,
mix greedy and sampled decoding, opt out of speculation, get aborted, and — with a KV budget far smaller than
the load — are preempted and recomputed; prompts longer than the step's token budget are prefilled in chunks.

* Greedy requests must produce exactly the tokens of plain greedy decoding of the prompt alone.
* A seeded sampled request must produce the same tokens alone and in any batch, whenever it arrives.
* After any mix of finishes, aborts and preemptions every KV page is back (no leak).
* Streamed tokens and text add up to the request's final output; stop strings never leak partially.

The target is the tiny float64 random Qwen3 of test_greedy_lossless.py (V = 16, context 64): float64 makes an
argmax tie between differently batched forwards practically impossible.
"""

from __future__ import annotations

import json

import random
from collections import defaultdict

import pytest

from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine, EngineConfig
from dspark.engine.generation import generate
from dspark.errors import ConfigError, RequestError
from dspark.models.drafters import load_drafter
from dspark.models.drafters.dspark import load_dspark_drafter
from dspark.models.drafters.ngram import NgramDrafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import SpeculationController
from dspark.scheduling.policies import CausalGreedy
from dspark.scheduling.sps import SPSProfile

from drafters_for_tests import AlwaysWrongDrafter, RandomDrafter, save_dspark_folder

V = 16
MODEL = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)
GREEDY = SamplingParams(temperature=0.0)
# A step costs 10 ms + 2 ms per token: verifying a draft pays only when it survives often, and the more
# requests share the step, the fewer drafts Algorithm 1 admits — the batch changes ℓ.
COSTLY_TOKENS = SPSProfile.from_dict({"verify_ms_by_tokens": {"1": 12.0, "400": 810.0}})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_random_model(
        tmp_path_factory.mktemp("engine") / "tiny", "tiny-qwen3", seed=1, init_std=0.3, with_tokenizer=False, **MODEL
    )


@pytest.fixture(scope="module")
def runner(model_folder):
    return TargetRunner.from_pretrained(model_folder, dtype="float64", cache_page_size=4)


@pytest.fixture(scope="module")
def dspark_folder(model_folder, tmp_path_factory):
    return save_dspark_folder(model_folder, tmp_path_factory.mktemp("engine-drafter") / "dspark", block_size=4)


def make_drafter(kind: str, dspark_folder):
    if kind == "dspark":
        return load_dspark_drafter(dspark_folder, device="cpu", dtype="float64")
    if kind == "ngram":
        return NgramDrafter(num_draft_tokens=4, max_ngram=2)
    if kind == "random":
        return RandomDrafter(V, block_size=4)
    if kind == "always-wrong":
        return AlwaysWrongDrafter(V, block_size=3)
    return None


def plain_greedy(runner, prompt: list[int], max_new_tokens: int, stop_token_ids=()) -> list[int]:
    out = generate(runner, [prompt], sampling=GREEDY, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
    return out.sequences[0].token_ids


def run_schedule(engine: Engine, arrivals: list[tuple[int, str, list[int], dict]], aborts: dict[int, list[str]] = {}):
    """Feed `arrivals` (step, id, prompt, add_request kwargs) and `aborts` ({step: ids}) to the engine until
    it is idle. Returns ({id: streamed tokens}, {id: finish reason}, {id: Request}, per-step stats)."""
    pending = sorted(arrivals, key=lambda a: a[0])
    streamed, reasons, requests, steps = defaultdict(list), {}, {}, []
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, kwargs = pending.pop(0)
            requests[request_id] = engine.add_request(request_id, prompt, **kwargs)
        for request_id in aborts.get(step, []):
            if engine.abort(request_id):
                reasons[request_id] = "abort"
        for out in engine.step():
            streamed[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        steps.append(engine.stats())
        step += 1
        assert step < 5000, "the engine made no progress"
    return streamed, reasons, requests, steps


def random_workload(seed: int, count: int = 24):
    """Arrivals over ~30 steps: prompts of 1–20 tokens, budgets of 1–24, a quarter without speculation, a
    quarter sampled (T = 1, top-k 5 or top-p 0.9, some seeded), three aborted at random steps."""
    rng = random.Random(seed)
    arrivals, greedy_ids = [], []
    for i in range(count):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 20))]
        kwargs = dict(max_new_tokens=rng.randint(1, 24), speculate=rng.random() > 0.25)
        if rng.random() < 0.25:
            kwargs["sampling"] = rng.choice([SamplingParams(1.0, top_k=5), SamplingParams(0.8, top_p=0.9)])
            kwargs["seed"] = rng.choice([None, rng.randrange(1000)])
        else:
            kwargs["sampling"] = GREEDY
            greedy_ids.append(f"r{i}")
        arrivals.append((rng.randint(0, 30), f"r{i}", prompt, kwargs))
    aborted = rng.sample([a[1] for a in arrivals], 3)
    aborts = defaultdict(list)
    for request_id in aborted:
        aborts[rng.randint(0, 40)].append(request_id)
    return arrivals, greedy_ids, dict(aborts)


@pytest.mark.parametrize("kind", ["plain", "dspark", "ngram", "random", "always-wrong"])
def test_greedy_requests_equal_plain_decoding_under_continuous_batching(runner, dspark_folder, kind):
    drafter = make_drafter(kind, dspark_folder)
    controller = None
    if kind == "dspark":
        controller = SpeculationController(policy=CausalGreedy(COSTLY_TOKENS))
    stop = 5
    totals = defaultdict(int)
    for seed in range(3):
        arrivals, greedy_ids, aborts = random_workload(seed)
        for _, _, _, kwargs in arrivals:
            kwargs["stop_token_ids"] = [stop]
        # 96 KV tokens for ~24 requests of up to 44 tokens (+5 per step), 12 tokens per step.
        config = EngineConfig(kv_cache_tokens=96, max_num_batched_tokens=12, max_num_seqs=8, seed=seed)
        engine = Engine(runner, drafter, controller, config=config)
        streamed, reasons, requests, steps = run_schedule(engine, arrivals, aborts)
        for _, request_id, prompt, kwargs in arrivals:
            request = requests[request_id]
            if reasons[request_id] == "abort":
                totals["aborted"] += 1
                continue
            assert streamed[request_id] == request.output_ids, request_id
            assert len(request.output_ids) >= 1 and request.finish_reason == reasons[request_id]
            if request_id in greedy_ids:
                assert request.output_ids == plain_greedy(runner, prompt, kwargs["max_new_tokens"], [stop]), request_id
                totals["greedy"] += 1
        totals["preemptions"] += engine.scheduler.num_preemptions
        totals["chunked"] += sum(1 for s in steps if s.last_step.get("prefill_tokens", 0) and s.last_step.get("decoding", 0))
        totals["accepted"] += engine.spec.accepted_tokens
        assert engine.blocks.check_no_leak() == []
        assert engine.stats().running == engine.stats().waiting == 0
        assert max(s.kv_pages_used for s in steps) <= engine.blocks.num_pages
        engine.close()
    print(kind, dict(totals))
    assert totals["greedy"] >= 40 and totals["aborted"] >= 1
    assert totals["preemptions"] >= 3  # the tiny budget forced recomputation ...
    assert totals["chunked"] >= 10  # ... and prompt chunks shared steps with decoding rows
    if kind in ("dspark", "ngram", "random"):
        assert totals["accepted"] > 0


def seeded_run(runner, drafter_folder, arrivals, seeded, config):
    """({id: output} of the `seeded` ids, the engine) after running `arrivals` with a DSpark drafter whose
    verification lengths Algorithm 1 picks from the batch."""
    drafter = load_dspark_drafter(drafter_folder, device="cpu", dtype="float64")
    engine = Engine(runner, drafter, SpeculationController(policy=CausalGreedy(COSTLY_TOKENS)), config=config)
    streamed, reasons, requests, _ = run_schedule(engine, arrivals)
    assert engine.blocks.check_no_leak() == []
    engine.close()
    return {request_id: requests[request_id].output_ids for request_id in seeded}, engine


def test_a_seeded_sampled_request_is_the_same_in_any_batch(runner, dspark_folder, monkeypatch):
    rng = random.Random(5)
    seeded = [(f"s{i}", [rng.randrange(V) for _ in range(rng.randint(2, 12))], SamplingParams(1.0 if i % 2 else 0.7, top_k=8 * (i % 2)))
              for i in range(3)]
    def requests_at(step0: int):
        return [(step0 + 3 * i, sid, prompt, dict(sampling=s, max_new_tokens=30, seed=100 + i))
                for i, (sid, prompt, s) in enumerate(seeded)]
    alone = {}
    for sid, prompt, s in seeded:
        out, _ = seeded_run(runner, dspark_folder, [(0, sid, prompt, dict(sampling=s, max_new_tokens=30, seed=100 + int(sid[1])))],
                            [sid], EngineConfig(seed=1))
        alone.update(out)
    crowd = []
    for i in range(20):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 16))]
        sampling = rng.choice([GREEDY, SamplingParams(1.0), SamplingParams(0.5, top_p=0.8)])
        crowd.append((rng.randint(0, 25), f"c{i}", prompt, dict(sampling=sampling, max_new_tokens=rng.randint(5, 30))))
    for start, config in ((0, EngineConfig(seed=2, max_num_seqs=6)),
                          (9, EngineConfig(seed=3, kv_cache_tokens=100, max_num_batched_tokens=10))):
        out, engine = seeded_run(runner, dspark_folder, crowd + requests_at(start), list(alone), config)
        assert out == alone
    assert engine.scheduler.num_preemptions > 0  # the second crowd preempted and recomputed requests


def test_control_without_planning_alone_the_batch_changes_a_seeded_request(runner, dspark_folder, monkeypatch):
    """Control: the same seeded request planned with the batch (its `batch_invariant` flag off) does change
    with the crowd — so the test above could fail."""
    rng = random.Random(6)
    prompt = [rng.randrange(V) for _ in range(6)]
    mine = (0, "s", prompt, dict(sampling=SamplingParams(1.0), max_new_tokens=40, seed=11))
    crowd = [(rng.randint(0, 10), f"c{i}", [rng.randrange(V) for _ in range(5)], dict(sampling=GREEDY, max_new_tokens=40))
             for i in range(12)]
    monkeypatch.setattr("dspark.engine.request.Request.batch_invariant", property(lambda self: False))
    alone, _ = seeded_run(runner, dspark_folder, [mine], ["s"], EngineConfig(seed=1))
    crowded, _ = seeded_run(runner, dspark_folder, crowd + [mine], ["s"], EngineConfig(seed=1))
    assert alone != crowded


def test_no_page_leaks_after_finish_abort_and_preemption(runner, dspark_folder):
    drafter = make_drafter("dspark", dspark_folder)
    engine = Engine(runner, drafter, config=EngineConfig(kv_cache_tokens=64, max_num_batched_tokens=8, policy="verify-all"))
    rng = random.Random(3)
    for i in range(10):
        engine.add_request(i, [rng.randrange(V) for _ in range(rng.randint(3, 15))], max_new_tokens=20,
                           sampling=SamplingParams(1.0))
    for step in range(12):
        engine.step()
    assert engine.blocks.used_pages > 0 and engine.scheduler.num_preemptions > 0
    running = [r.request_id for r in engine.scheduler.running]
    waiting = [r.request_id for r in engine.scheduler.waiting]
    assert running and waiting
    assert engine.abort(running[0]) and engine.abort(waiting[-1])
    assert not engine.abort(running[0]) and not engine.abort("unknown")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.check_no_leak() == []
    assert runner.cache.num_free_pages == runner.cache.num_pages and drafter.cache.num_free_pages == drafter.cache.num_pages
    engine.close()
    # Closed, the caches grow on demand again for standalone use.
    seq = runner.new_sequence()
    runner.forward([seq], [[1] * 60], all_logits=False)
    runner.free_sequence(seq)


def test_engine_rejects_bad_requests_and_configs(runner):
    engine = Engine(runner, config=EngineConfig(kv_cache_tokens=32))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [])
    with pytest.raises(RequestError, match="out of range"):
        engine.add_request("a", [V])
    with pytest.raises(RequestError, match="must be integers"):
        engine.add_request("a", [1, 2.5])
    with pytest.raises(RequestError, match="not hashable"):
        engine.add_request(["a"], [1])
    with pytest.raises(RequestError, match="SamplingParams"):
        engine.add_request("a", [1], sampling={"temperature": 1.0})
    with pytest.raises(RequestError, match="context of 64"):
        engine.add_request("a", [1] * 10, max_new_tokens=60)
    with pytest.raises(RequestError, match="KV budget of 32 tokens"):
        engine.add_request("a", [1] * 20, max_new_tokens=20)
    with pytest.raises(RequestError, match="stop strings need"):
        engine.add_request("a", [1], max_new_tokens=8, stop=["x"])
    with pytest.raises(RequestError, match="seed"):
        engine.add_request("a", [1], max_new_tokens=8, seed=-1)
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.add_request("a", [1], max_new_tokens=0)
    engine.add_request("a", [1], max_new_tokens=8)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("a", [2], max_new_tokens=8)
    assert engine.stats().waiting == 1  # nothing else was queued
    engine.close()
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        Engine(runner, config=EngineConfig(kv_cache_tokens=2))
    with pytest.raises(ConfigError, match="memory_fraction"):
        Engine(runner, config=EngineConfig(kv_cache_memory_fraction=1.5))


def test_kv_budget_from_memory_fraction_is_fixed(runner):
    engine = Engine(runner, config=EngineConfig(kv_cache_memory_fraction=0.5, max_num_seqs=4))
    pages = engine.blocks.num_pages
    assert pages == -(-4 * (64 + 1) // 4)  # capped at what 4 sequences of the whole context could use
    assert runner.cache.num_pages == pages and runner.cache.max_pages == pages
    engine.add_request(0, [1, 2, 3], max_new_tokens=40)
    while engine.has_unfinished():
        engine.step()
    assert runner.cache.num_pages == pages  # never grew
    engine.close()
    assert runner.cache.max_pages is None


def test_default_controller_is_gated_algorithm_1_with_the_machines_profile(runner, dspark_folder, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text('{"verify_ms_by_tokens": {"1": 12.0, "400": 810.0}}')
    drafter = make_drafter("dspark", dspark_folder)
    engine = Engine(runner, drafter, config=EngineConfig(profile=str(profile)))
    policy = engine.controller.policy
    assert isinstance(policy, CausalGreedy) and policy.lookahead and engine.controller.gate is not None
    engine.close()
    ungated = Engine(runner, drafter, config=EngineConfig(profile=str(profile), policy="causal-greedy"))
    assert ungated.controller.gate is None and isinstance(ungated.controller.policy, CausalGreedy)
    ungated.close()
    plain = Engine(runner, make_drafter("ngram", dspark_folder))  # no confidence head: verify every draft
    assert type(plain.controller.policy).__name__ == "VerifyAll"
    plain.close()
    with pytest.raises(ConfigError, match="policy 'mtp-1'"):
        Engine(runner, drafter, config=EngineConfig(policy="mtp-1"))
    with pytest.raises(RequestError, match="confidences"):
        Engine(runner, make_drafter("ngram", dspark_folder), config=EngineConfig(policy="threshold-0.5"))


def test_default_controller_measures_and_caches_the_profile(runner, dspark_folder, tmp_path, monkeypatch):
    """Without EngineConfig.profile the engine profiles this machine once and caches it ($DSPARK_HOME)."""
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    drafter = load_drafter(str(dspark_folder), device="cpu", dtype="float64")  # knows its folder: profiled with it
    engine = Engine(runner, drafter)
    policy = engine.controller.policy
    cached = list((tmp_path / "profiles").glob("*.json"))
    assert isinstance(policy, CausalGreedy) and len(cached) == 1 and policy.profile.has_draft_cost
    measured = json.loads(cached[0].read_text())
    assert measured["context"] == runner.max_context // 2  # the CPU default (256) does not fit this model
    engine.close()
    stamp = cached[0].stat().st_mtime_ns
    Engine(runner, drafter).close()  # the second engine reads the cache
    assert cached[0].stat().st_mtime_ns == stamp


def test_engine_statistics(runner, dspark_folder):
    drafter = make_drafter("dspark", dspark_folder)
    engine = Engine(runner, drafter, SpeculationController(policy=CausalGreedy(COSTLY_TOKENS)))
    for i in range(4):
        engine.add_request(i, [1 + i, 2, 3], max_new_tokens=12, record_rounds=True)
    engine.step()
    stats = engine.stats()
    assert stats.running == 4 and stats.waiting == 0 and 0 < stats.kv_usage <= 1
    assert stats.last_step["prefill_tokens"] == 12 and stats.last_step["decoding"] == 0
    requests = dict(engine.requests)
    while engine.has_unfinished():
        engine.step()
    engine.close()
    stats = engine.stats()
    assert stats.finished_requests == 4 and stats.kv_usage == 0
    spec = stats.spec
    assert spec["rounds"] == sum(len(r.rounds) for r in requests.values())
    assert spec["drafts"] == sum(1 for r in requests.values() for x in r.rounds if x.verified > 0) > 0
    assert spec["accepted_tokens"] == sum(r.stats.accepted_tokens for r in requests.values())
    assert spec["emitted_tokens"] + 4 == sum(len(r.output_ids) for r in requests.values())  # + the prefill tokens
    assert stats.verify_budget_mean == pytest.approx(spec["verified_tokens"] / stats.steps)
    assert stats.controller["policy"].startswith("CausalGreedy")
    assert stats.times["steps"] == stats.steps and 0 <= stats.times["overhead_share"] < 1
    assert stats.times["target_s"] > 0 and stats.times["draft_s"] > 0
    for request in requests.values():
        assert request.first_token_time >= request.arrival_time and request.finish_time >= request.first_token_time
        assert request.arrival_time <= request.scheduled_time <= request.first_token_time
    # Live totals (a server's counters) agree with the finished requests'; the calibration monitor's prediction
    # is Σ over verified slots of the prefix survival of the confidences the plan used (here: the raw head's).
    live = stats.spec_live
    assert live["accepted_tokens"] == spec["accepted_tokens"] and live["verified_per_position"] == spec["verified_per_position"]
    expected = [0.0] * len(spec["verified_per_position"])
    for request in requests.values():
        for record in request.rounds:
            survival = 1.0
            for k in range(record.verified):
                survival *= record.confidences[k]
                expected[k] += survival
    monitored = stats.calibration["expected_accepted_per_position"]  # one entry per drafted slot, verified or not
    assert monitored == pytest.approx(expected + [0.0] * (len(monitored) - len(expected)))
    assert stats.calibration["drift"] == pytest.approx((sum(expected) - spec["accepted_tokens"]) / spec["verified_tokens"])


def test_stop_strings_and_text_through_the_engine():
    """On the built-in model and tokenizer: a stop string taken from a greedy continuation's text (spanning
    tokens) ends the request at the token that completes it, and the streamed text is that text cut before
    it; the same request without stop strings, in the same batch, streams the whole text."""
    from dspark.models.tokenizer import load_tokenizer
    from dspark.models.zoo import resolve_target

    folder = resolve_target(None)
    runner = TargetRunner.from_pretrained(folder, device="cpu", dtype="float32")
    tok = load_tokenizer(folder)
    prompt = tok.encode("The history of the city", add_special_tokens=False)

    def run(requests):
        engine = Engine(runner, NgramDrafter(num_draft_tokens=4, max_ngram=2), tokenizer=tok,
                        config=EngineConfig(kv_cache_tokens=1024))
        for request_id, stop in requests:
            engine.add_request(request_id, prompt, max_new_tokens=40, stop=stop)
        pieces, reasons = defaultdict(list), {}
        while engine.has_unfinished():
            for out in engine.step():
                pieces[out.request_id].append(out.new_text)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        engine.close()
        return {k: "".join(v) for k, v in pieces.items()}, reasons

    texts, _ = run([("y", None)])
    text = texts["y"]
    stop = next(text[i: i + 3] for i in range(len(text) // 2, len(text) - 3) if " " in text[i + 1: i + 3])
    texts, reasons = run([("x", [stop, "never-there"]), ("y", None)])
    assert texts["x"] == text[: text.find(stop)] and reasons["x"] == "stop"
    assert texts["y"] == text and reasons["y"] == "length"
