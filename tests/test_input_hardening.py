"""Bad input at the command line: one device resolver, output paths checked before any work, one traces
reader, seeds in range, one writer per regenerated file, over-long evaluation prompts skipped and counted,
non-finite model outputs never emitted, invalid cached profiles measured again. Each case exits 2 with one
line naming the culprit, and leaves the output it was asked to write untouched."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dspark.cli import main
from dspark.decoding.sampling import SamplingParams
from dspark.devices import resolve_device
from dspark.engine.generation import generate
from dspark.errors import ConfigError, NumericalError
from dspark.files import exclusive_lock
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import save_dspark_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("hard") / "tiny", "tiny-qwen3", seed=3, init_std=0.08)


def run(capsys, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `dspark argv`; argparse refusals (SystemExit) count as exits."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error" in last
    for needle in needles:
        assert needle in last, (needle, last)


# -- devices ---------------------------------------------------------------------------------------------


def test_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("tpu", "cuda:x", "", "cpu:3", 7):
        with pytest.raises(ConfigError, match="unknown device|expected a device"):
            resolve_device(bad, "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0", "--device")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}", "--device")


COMMANDS_WITH_DEVICE = [
    ["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--threads", "1"],
    ["demo"],
    ["eval", "--datasets", "corpus-code", "--limit", "1", "--max-new-tokens", "4"],
    ["calibrate", "--limit", "1"],
    ["sweep", "--limit", "1"],
    ["simulate", "--limit", "1"],
    ["profile"],
    ["data", "regenerate", "--input", "in.jsonl", "--output", "out.jsonl"],
    ["data", "cache", "--data", "in.jsonl", "--layers", "1", "--output", "cache"],
    ["zoo", "rebuild", "--work", "work"],
]


@pytest.mark.parametrize("argv", COMMANDS_WITH_DEVICE, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_a_device_it_does_not_have_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    started = time.perf_counter()
    code, _, err = run(capsys, argv + ["--device", device])
    assert_refused(code, err, "--device", device)
    assert time.perf_counter() - started < 5  # refused before loading a model or recording anything
    assert list(tmp_path.iterdir()) == []  # nothing written
    code, _, err = run(capsys, argv + ["--device", "tpu"])
    assert_refused(code, err, "--device", "tpu")


def test_default_device_is_auto(capsys):
    from dspark.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.device == "auto"


# -- output paths checked before the work ----------------------------------------------------------------


@pytest.fixture()
def existing_file(tmp_path):
    path = tmp_path / "existing"
    path.write_text("keep me\n")
    return path


@pytest.mark.parametrize("make_argv, needle", [
    (lambda f, d: ["eval", "--datasets", "corpus-code", "--limit", "1", "--max-new-tokens", "4", "--out", f], "--out"),
    (lambda f, d: ["sweep", "--limit", "1", "--out", f], "--out"),
    (lambda f, d: ["simulate", "--limit", "1", "--out", f], "--out"),
    (lambda f, d: ["calibrate", "--limit", "1", "--out", d], "--out"),
    (lambda f, d: ["profile", "--out", d, "--refresh"], "--out"),
    (lambda f, d: ["calibrate", "--limit", "1", "--out", f + "/below"], "--out"),
    (lambda f, d: ["data", "corpus", "--out", f], "--out"),
    (lambda f, d: ["data", "tokenizer", "--corpus", d, "--out", f], "--out"),
    (lambda f, d: ["zoo", "rebuild", "--work", f], "--work"),
], ids=["eval", "sweep", "simulate", "calibrate-dir", "profile-dir", "calibrate-below-file", "corpus", "tokenizer",
        "zoo"])
def test_output_paths_are_refused_before_any_work(make_argv, needle, capsys, existing_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    started = time.perf_counter()
    code, _, err = run(capsys, make_argv(str(existing_file), str(folder)))
    assert_refused(code, err, needle)
    assert time.perf_counter() - started < 5  # refused before evaluating, recording or profiling
    assert existing_file.read_text() == "keep me\n" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_regenerate_output_is_checked_and_locked(model_dir, capsys, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"question {i}"]}) + "\n" for i in range(3)))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    base = ["data", "regenerate", "--target", str(model_dir), "--input", str(prompts), "--max-new-tokens", "3",
            "--no-progress"]
    code, _, err = run(capsys, base + ["--output", str(folder)])
    assert_refused(code, err, "--output", "folder")
    output = tmp_path / "out.jsonl"
    with exclusive_lock(output, "--output"):  # another writer holds the output
        code, _, err = run(capsys, base + ["--output", str(output)])
    assert_refused(code, err, "--output", "another process")
    assert not output.exists()
    code, _, err = run(capsys, base + ["--output", str(output)])
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3


def test_two_regenerate_processes_never_write_one_output_twice(model_dir, tmp_path):
    """The real race: two processes on one output, started together; one refuses (exit 2) or waits out the
    other's whole run, and every sample appears exactly once."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"question {i}"]}) + "\n" for i in range(6)))
    output = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "dspark", "data", "regenerate", "--target", str(model_dir), "--input", str(prompts),
            "--output", str(output), "--max-new-tokens", "24", "--batch-size", "2", "--no-progress", "--threads", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert "another process" in err.strip().splitlines()[-1]
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert sorted(ids) == list(range(6))


# -- seeds, prompts, scheduler names ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**63), str(2**64), "-1", "1e3"])
def test_seed_out_of_range_is_refused(seed, capsys, model_dir):
    code, _, err = run(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", seed])
    assert_refused(code, err, "--seed")
    code, _, err = run(capsys, ["eval", "--target", str(model_dir), "--seed", seed])
    assert_refused(code, err, "--seed")


def test_largest_seed_is_accepted(capsys, model_dir):
    code, out, err = run(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2",
                                  "--temperature", "1", "--seed", str(2**63 - 1), "--json"])
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 2


def test_generate_scheduler_errors_name_the_scheduler_flag_before_loading(capsys, tmp_path):
    started = time.perf_counter()
    code, _, err = run(capsys, ["generate", "--model", str(tmp_path / "absent"), "--prompt", "x", "--scheduler", "bogus"])
    assert_refused(code, err, "--scheduler", "bogus")
    assert "--policies" not in err
    assert time.perf_counter() - started < 5


def test_multi_line_library_errors_are_folded_onto_one_line(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  output_dir: [unclosed\n")
    code, _, err = run(capsys, ["train", "--config", str(config)])
    assert_refused(code, err, str(config))
    assert len(err.strip().splitlines()) == 1


# -- traces: one reader for calibrate, sweep and simulate --------------------------------------------------


def valid_traces(drafter: str = "dspark") -> dict:
    rounds = 30
    return {"dspark": {
        "drafter": drafter, "block_size": 3, "temperature": 1.0, "has_confidences": True,
        "confidence_temperatures": None, "confidence_biases": None,
        "datasets": {"gsm8k": {
            "domain": "math",
            "confidences": [[0.9, 0.6, 0.3]] * rounds,
            "drafted": [3] * rounds, "verified": [3] * rounds, "accepted": [i % 4 for i in range(rounds)],
            "emitted": [i % 4 + 1 for i in range(rounds)], "sample": [i // 5 for i in range(rounds)],
        }},
    }}


def break_traces(case: str, data: dict) -> dict:
    rounds = data["dspark"]["datasets"]["gsm8k"]
    if case == "missing-key":
        del rounds["accepted"]
    elif case == "mismatched-lengths":
        rounds["verified"] = rounds["verified"][:-2]
    elif case == "null-column":
        rounds["drafted"] = None
    elif case == "string-confidence":
        rounds["confidences"][4] = ["0.9", 0.5, 0.2]
    elif case == "string-count":
        rounds["accepted"][2] = "1"
    elif case == "boolean-count":
        rounds["verified"][1] = True
    elif case == "nested-confidence":
        rounds["confidences"][0] = [[0.5], 0.5, 0.5]
    elif case == "string-temperature":
        data["dspark"]["temperature"] = "1.0"
    return data


TRACE_CASES = ["missing-key", "mismatched-lengths", "null-column", "string-confidence", "string-count",
               "boolean-count", "nested-confidence", "string-temperature"]
PROFILE = {"verify_ms": {"1x1": 5.0, "1x4": 6.0, "4x1": 6.0, "4x4": 8.0}, "draft_ms": {"1": 1.0, "4": 1.5}}


@pytest.fixture(scope="module")
def confidence_drafter(model_dir, tmp_path_factory):
    """A DSpark drafter folder (block size 3, confidence head) for the tiny target."""
    return str(save_dspark_folder(model_dir, tmp_path_factory.mktemp("drafter") / "dspark"))


def trace_commands(drafter: str, traces, tmp_path) -> list[list[str]]:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    return [["calibrate", "--drafter", drafter, "--traces", str(traces), "--out", str(tmp_path / "calibration.json"),
             "--json"],
            ["sweep", "--traces", str(traces), "--json"],
            ["simulate", "--traces", str(traces), "--profile", str(profile), "--concurrency", "1,4", "--steps", "5",
             "--min-rounds", "0", "--json"]]


def test_the_same_valid_traces_are_read_by_calibrate_sweep_and_simulate(confidence_drafter, capsys, tmp_path):
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps(valid_traces(confidence_drafter)))
    for argv in trace_commands(confidence_drafter, traces, tmp_path):
        code, out, err = run(capsys, argv)
        assert code == 0, err
        assert json.loads(out)
    assert (tmp_path / "calibration.json").is_file()


@pytest.mark.parametrize("case", TRACE_CASES)
def test_one_traces_reader_refuses_bad_traces_for_calibrate_sweep_and_simulate(case, confidence_drafter, capsys,
                                                                                tmp_path):
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps(break_traces(case, valid_traces(confidence_drafter))))
    for argv in trace_commands(confidence_drafter, traces, tmp_path):
        code, _, err = run(capsys, argv)
        assert_refused(code, err, str(traces))
    assert not (tmp_path / "calibration.json").exists()


# -- evaluation: over-long prompts skipped and counted, or refused with --strict --------------------------


def test_eval_skips_prompts_beyond_the_context_and_counts_them(capsys, tmp_path):
    folder = build_random_model(tmp_path / "short", "tiny-qwen3", seed=3, init_std=0.08, max_position_embeddings=48)
    data = tmp_path / "long.jsonl"
    lines = [{"turns": ["short one"]}, {"turns": ["z " * 200]}, {"turns": ["another short"]}, {"turns": ["y " * 300]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    base = ["eval", "--target", str(folder), "--drafter", "ngram", "--datasets", str(data), "--max-new-tokens", "8",
            "--no-progress"]
    code, out, err = run(capsys, base + ["--json"])
    assert code == 0, err
    report = json.loads(out)
    entry = report["datasets"]["long"]
    assert entry["samples"] == 2 and entry["skipped_too_long"] == 2
    assert entry["skipped_lines"] == [f"{data}:2", f"{data}:4"]
    assert report["skipped_too_long"] == {"long": 2}
    code, out, err = run(capsys, base)
    assert code == 0 and "prompts skipped (beyond the target's context): long 2" in out
    code, _, err = run(capsys, base + ["--strict"])
    assert_refused(code, err, "'long'", f"{data}:2", "--strict")


def test_eval_with_every_prompt_too_long_is_refused(capsys, tmp_path):
    folder = build_random_model(tmp_path / "short", "tiny-qwen3", seed=3, init_std=0.08, max_position_embeddings=16)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"turns": ["z " * 100]}) + "\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, ["eval", "--target", str(folder), "--drafter", "ngram", "--datasets", str(data),
                                "--no-progress", "--out", str(out)])
    assert_refused(code, err, "beyond the target's context")
    assert not out.exists()


# -- non-finite values at run time ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_target_logits_are_an_error_naming_the_request(model_dir, temperature):
    runner = TargetRunner.from_pretrained(model_dir, dtype="float32")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    clean = generate(runner, prompts, sampling=SamplingParams(temperature=temperature), max_new_tokens=6, seed=0)
    assert all(len(s.token_ids) >= 1 for s in clean.sequences)
    with torch.no_grad():  # one NaN in the final norm's weight: every logit row becomes NaN
        runner.model.model.norm.weight[3] = float("nan")
    with pytest.raises(NumericalError, match="request 0: the target's prefill logits produced non-finite"):
        generate(runner, prompts, sampling=SamplingParams(temperature=temperature), max_new_tokens=6, seed=0)


def test_non_finite_logits_mid_generation_emit_nothing(model_dir):
    """An inf that appears after prefill, in one request's logits of a later round, stops generation with
    that request named; no result carrying tokens sampled from it is returned."""
    runner = TargetRunner.from_pretrained(model_dir, dtype="float32")
    calls = {"n": 0}
    forward = runner.forward

    def poisoned(seq_ids, new_tokens, **kwargs):
        out = forward(seq_ids, new_tokens, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            logits = out.logits.clone()
            logits[-1, 0] = float("inf")  # the last row belongs to the second request
            out.logits = logits
        return out

    runner.forward = poisoned
    with pytest.raises(NumericalError, match="request 1: the target's logits"):
        generate(runner, [[5, 6, 7], [8, 9]], sampling=SamplingParams(), max_new_tokens=8, seed=0)


def test_non_finite_draft_distribution_is_an_error(model_dir):
    from drafters_for_tests import RandomDrafter

    runner = TargetRunner.from_pretrained(model_dir, dtype="float32")
    drafter = RandomDrafter(runner.config.vocab_size, block_size=3)
    propose = drafter.propose

    def poisoned(inputs, generator):
        proposal = propose(inputs, generator)
        proposal.probs[0, 0, 1] = float("nan")
        return proposal

    drafter.propose = poisoned
    with pytest.raises(NumericalError, match="request 0: the drafter's proposal distribution"):
        generate(runner, [[5, 6, 7]], sampling=SamplingParams(temperature=1.0), max_new_tokens=8, drafter=drafter,
                 seed=0)


# -- cached SPS profiles ------------------------------------------------------------------------------------


def test_an_invalid_cached_profile_is_reported_by_path_and_measured_again(model_dir, tmp_path, monkeypatch):
    from dspark.scheduling.profiler import profile_with_cache

    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    sizes = dict(context=8, requests="1", lengths="1,2", repeats=2)
    first, path, measured = profile_with_cache(str(model_dir), "none", **sizes)
    assert measured
    data = json.loads(path.read_text())
    data["verify_ms"]["1x1"] = -3.0
    path.write_text(json.dumps(data))
    messages = []
    again, path2, measured2 = profile_with_cache(str(model_dir), "none", progress=messages.append, **sizes)
    assert path2 == path and measured2
    assert any(str(path) in m and "invalid" in m for m in messages)
    assert json.loads(path.read_text())["verify_ms"]["1x1"] > 0
