"""`dspark bench engine` end to end on a tiny random target and DSpark drafter: the JSON the issue specifies,
greedy identity across policies, open-loop rates, the plots, the goals' arithmetic, and bad input."""

from __future__ import annotations

import json

import pytest

from dspark.cli import main
from dspark.evaluation.engine_bench import goals, parse_bench_policies
from dspark.errors import ConfigError
from dspark.models.random_init import build_random_model

from drafters_for_tests import save_dspark_folder

KEYS = {"policy", "throughput_tok_s", "per_user_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
        "tau", "mean_verify_len"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.08)
    drafter = save_dspark_folder(target, root / "drafter", block_size=3)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [text]}) + "\n" for text in ("def f(x):", "Once upon a", "1 + 2 =")))
    profile = root / "profile.json"
    profile.write_text(json.dumps({"verify_ms_by_tokens": {"1": 10.0, "64": 30.0}, "draft_ms": {"1": 3.0, "8": 6.0}}))
    return dict(target=target, drafter=drafter, prompts=prompts, profile=profile, root=root)


def bench(setup, capsys, *extra):
    argv = ["bench", "engine", "--model", str(setup["target"]), "--drafter", str(setup["drafter"]), "--datasets",
            str(setup["prompts"]), "--profile", str(setup["profile"]), "--no-simulate", "--max-new-tokens", "6",
            "--num-requests", "4", "--warmup-requests", "1", "--no-progress", "--threads", "1", "--json", *extra]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_bench_json_and_greedy_identity(setup, capsys, saved_figures):
    out_dir = setup["root"] / "out"
    result = bench(setup, capsys, "--policies", "fixed-1,ar,fixed-3,causal-greedy,gated,async-topk",
                   "--concurrency", "1,2", "--request-rate", "50", "--temperature", "0,1", "--out", str(out_dir),
                   "--repeats", "3")
    points = result["results"]
    assert len(points) == 6 * 3 * 2  # policies × (2 concurrencies + 1 rate) × temperatures
    for p in points:
        assert KEYS <= p.keys() and ("concurrency" in p) != ("request_rate" in p)
        runs = sorted(p["throughput_runs"])
        assert len(runs) == 3 and p["throughput_tok_s"] == runs[1]  # the median of the repeats
        assert p["throughput_tok_s"] > 0 and p["ttft_ms_p99"] >= p["ttft_ms_p50"] > 0
        assert 4 <= p["output_tokens"] <= 4 * 6  # one token at least per request; EOS may end one early
        if p["policy"] == "ar":
            assert p["tau"] == 1.0 and p["mean_verify_len"] == 0.0
        if p["policy"] == "fixed-3":
            assert 0 < p["mean_verify_len"] <= 3
    assert result["greedy_identical"] is True
    assert any(g["goal"].startswith("adaptive") for g in result["goals"])
    assert (out_dir / "bench.json").is_file() and len(result["plots"]) == 4
    figure = saved_figures[out_dir / "budget_vs_concurrency_t0.png"]
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"ar", "fixed-1", "fixed-3", "causal-greedy", "gated", "async-topk"}
    assert bench(setup, capsys, "--policies", "ar", "--concurrency", "1", "--temperature", "0")["greedy_identical"] is True
    measured = [p["throughput_tok_s"] for p in points if p["policy"] == "ar" and p["temperature"] == 0 and "concurrency" in p]
    assert list(lines["ar"].get_ydata()) == pytest.approx(measured)


def test_warmup_requests_are_run_but_not_measured(setup):
    """At C = 1 and T = 0 a point's metrics are the same with and without a warm-up before it: every metric is
    a difference of the engine's counters over the measured requests only."""
    from dspark.decoding.sampling import SamplingParams
    from dspark.engine.engine import Engine, EngineConfig
    from dspark.evaluation.engine_bench import policy_setup, run_point
    from dspark.models.drafters import load_drafter
    from dspark.models.target_runner import TargetRunner
    from dspark.scheduling.sps import SPSProfile

    runner = TargetRunner.from_pretrained(str(setup["target"]), device="cpu")
    drafter = load_drafter(str(setup["drafter"]), device="cpu")
    profile = SPSProfile.load(setup["profile"])
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    points = {}
    for warmup in (0, 3):
        _, controller = policy_setup("gated", drafter, None, profile, None)
        engine = Engine(runner, drafter, controller, config=EngineConfig(max_num_seqs=1, kv_cache_tokens=256))
        points[warmup] = run_point(engine, prompts, sampling=SamplingParams(temperature=0.0),
                                   max_new_tokens=5, num_requests=2, concurrency=1, warmup_requests=warmup)
        engine.close()
    (cold, cold_tokens), (warm, warm_tokens) = points[0], points[3]
    assert warm_tokens == cold_tokens and warm["warmup_requests"] == 3
    for key in ("steps", "output_tokens", "tau", "mean_verify_len", "preemptions"):
        assert warm[key] == cold[key], key
    gate_steps = [p["gate"]["drafted_steps"] + p["gate"]["skipped_steps"] for p in (cold, warm)]
    assert gate_steps[0] == gate_steps[1] > 0


def test_goals_arithmetic():
    def point(policy, c, tput, user, t=1.0, overhead=0.1):
        return {"policy": policy, "concurrency": c, "temperature": t, "throughput_tok_s": tput, "per_user_tok_s": user,
                "engine_overhead_share": overhead}

    result = {"results": [point("ar", 1, 100, 100), point("causal-greedy", 1, 120, 120), point("gated", 1, 96, 96),
                          point("fixed-3", 1, 125, 125), point("ar", 16, 390, 24), point("causal-greedy", 16, 500, 30,
                                                                                            overhead=0.2)]}
    found = {(g["goal"], g.get("concurrency")): g for g in goals(result)}
    adaptive = found[("adaptive ≥ 0.97 × best baseline", 1)]
    assert adaptive["ratio"] == pytest.approx(120 / 125) and adaptive["met"] is False
    assert found[("per-user speed at C = 1 ≥ 1.15 × ar", None)]["ratio"] == pytest.approx(1.2)
    assert found[("ar throughput at C = 16 ≥ 4 × C = 1", None)]["met"] is False
    assert found[("engine overhead at C = 16 ≤ 15 %", None)]["met"] is False


@pytest.mark.parametrize("extra, message", [
    (["--policies", "ar,fixed-9"], "fixed-K"),
    (["--policies", "warp"], "unknown policy"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "", "--request-rate", "-1"], "--request-rate"),
    (["--temperature", "x"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup-requests", "-1"], "--warmup-requests"),
    (["--datasets", "nowhere.jsonl"], "none of"),
])
def test_bench_bad_input_is_a_clear_error(setup, capsys, extra, message):
    argv = ["bench", "engine", "--model", str(setup["target"]), "--drafter", str(setup["drafter"]), "--datasets",
            str(setup["prompts"]), "--profile", str(setup["profile"]), "--no-simulate", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parse_bench_policies():
    assert parse_bench_policies("ar,fixed,gated", 3) == ("ar", "fixed-1", "fixed-2", "fixed-3", "gated")
    with pytest.raises(ConfigError):
        parse_bench_policies(",", 3)
