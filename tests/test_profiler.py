"""SPS profiler (docs/design.md §5.5): profile format (the shared GPU tables' format), forced monotonicity, the
per-machine cache and --refresh, the model/device check, bad input, the drafter row. Tiny random models;
no assertion on absolute speed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.cli import main
from dspark.errors import ConfigError
from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.scheduling import profiler
from dspark.scheduling.profiler import (
    by_total_tokens, check_profile_matches, force_monotone, profile_table, load_or_profile, profile_with_cache,
)
from dspark.scheduling.sps import SPSProfile
from dspark.models.fingerprint import model_fingerprint

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
SIZES = ["--context", "16", "--requests", "1,2,3", "--lengths", "1,2,4", "--repeats", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiler")
    target = build_random_model(root / "target", "tiny-qwen3", seed=1, with_tokenizer=False, **TINY)
    runner = TargetRunner.from_pretrained(target)
    config = dspark_config_for_target(runner.hf_config, target_layer_ids=(0, 1), mask_token_id=63,
                                      num_draft_layers=1, block_size=3, markov_rank=4)
    drafter = init_from_target(config, runner.model, seed=0).save_pretrained(root / "drafter")
    return str(target), str(drafter)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run_cli(capsys, argv):
    code = main(["profile", "--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def counting_timer(monkeypatch, values=None):
    """Replace the timing function: run the step once (so the code path still executes) and return
    `values(call index)` (default: a decreasing, i.e. non-monotone, sequence). Returns the call log."""
    calls = []

    def fake(step, *, repeats, warmup, device, reset=None):
        step()
        if reset is not None:
            reset()
        calls.append(repeats)
        return values(len(calls)) if values else 100.0 - len(calls)

    monkeypatch.setattr(profiler, "_median_ms", fake)
    return calls


def grid(profile, key="verify_ms"):
    return {tuple(int(x) for x in k.split("x")): v for k, v in profile[key].items()}


def assert_monotone(profile):
    cells = grid(profile)
    rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
    for r in rows:
        assert [cells[(r, c)] for c in cols] == sorted(cells[(r, c)] for c in cols)
    for c in cols:
        assert [cells[(r, c)] for r in rows] == sorted(cells[(r, c)] for r in rows)
    totals = [profile["verify_ms_total_tokens"][k] for k in sorted(profile["verify_ms_total_tokens"], key=int)]
    assert totals == sorted(totals)
    draft = [profile["draft_ms"][k] for k in sorted(profile["draft_ms"], key=int)]
    assert draft == sorted(draft)


def test_json_format_and_monotone(models, capsys, tmp_path):
    target, drafter = models
    code, out, _ = run_cli(capsys, ["--target", target, "--drafter", drafter, *SIZES, "--json",
                                    "--out", str(tmp_path / "copy.json")])
    assert code == 0
    profile = json.loads(out)
    for key in ("device", "shape", "context", "gamma", "dtype", "verify_ms", "draft_ms", "model", "drafter",
                "repeats", "threads", "date", "verify_ms_total_tokens", "verify_ms_measured"):
        assert key in profile, key
    assert profile["monotone_forced"] is True
    assert (profile["context"], profile["gamma"], profile["dtype"], profile["repeats"]) == (16, 3, "fp32", 2)
    assert set(profile["verify_ms"]) == {f"{r}x{c}" for r in (1, 2, 3) for c in (1, 2, 4)}
    assert set(profile["draft_ms"]) == {"1", "2", "3"}
    assert set(profile["verify_ms_total_tokens"]) == {str(r * c) for r in (1, 2, 3) for c in (1, 2, 4)}
    assert all(v > 0 and math.isfinite(v) for v in profile["verify_ms"].values())
    assert profile["model"] == model_fingerprint(target) and profile["drafter"] == model_fingerprint(drafter)
    assert_monotone(profile)
    assert json.loads((tmp_path / "copy.json").read_text()) == profile
    loaded = SPSProfile.from_dict(profile)  # the loader of the shared GPU tables reads it too
    assert loaded.is_grid and loaded.has_draft_cost and loaded.verify_ms(4, 2) > 0


def test_monotone_forcing_of_noisy_measurements(models, monkeypatch):
    target, drafter = models
    counting_timer(monkeypatch)  # every later measurement is cheaper: maximally non-monotone raw data
    profile = load_or_profile(target, drafter, context=16, requests=[1, 2, 3], lengths=[1, 2, 4], repeats=2)
    assert_monotone(profile)
    raw = grid(profile, "verify_ms_measured")
    assert raw[(1, 1)] > raw[(3, 4)]  # the raw medians are kept as measured
    # Worked example of the rule: row running max, then column running max, then max per B.
    forced = force_monotone({(1, 1): 5.0, (1, 2): 4.0, (2, 1): 3.0, (2, 2): 6.0})
    assert forced == {(1, 1): 5.0, (1, 2): 5.0, (2, 1): 5.0, (2, 2): 6.0}
    assert by_total_tokens({(1, 1): 1.0, (1, 4): 3.0, (2, 2): 2.5, (4, 1): 2.0, (2, 1): 4.0}) == {
        1: 1.0, 2: 4.0, 4: 4.0}


def test_cache_reuse_and_refresh(models, monkeypatch, home, tmp_path):
    target, drafter = models
    calls = counting_timer(monkeypatch)
    kwargs = dict(context=16, requests="1,2", lengths="1,2", repeats=2)
    first, path, measured = profile_with_cache(target, drafter, **kwargs)
    assert measured and len(calls) == 4 + 2 and path.is_file() and path.parent == home / "profiles"
    mtime = path.stat().st_mtime_ns
    second, path2, measured2 = profile_with_cache(target, drafter, **kwargs)
    assert (second, path2, measured2) == (first, path, False) and len(calls) == 6
    assert path.stat().st_mtime_ns == mtime
    assert load_or_profile(target, drafter, context=16, requests=[1], repeats=2) == first  # a subset: cached
    assert len(calls) == 6
    load_or_profile(target, drafter, refresh=True, out=tmp_path / "copy.json", **kwargs)
    assert len(calls) == 12 and path.stat().st_mtime_ns != mtime
    assert json.loads((tmp_path / "copy.json").read_text()) == json.loads(path.read_text())
    load_or_profile(target, drafter, context=16, requests="1,2,4", lengths="1,2", repeats=2)  # new R: measured
    assert len(calls) == 12 + 6 + 3
    # Another context or no drafter is another cache entry.
    _, other, measured = profile_with_cache(target, "none", context=8, requests="1", lengths="1", repeats=2)
    assert measured and other != path and len(list((home / "profiles").glob("*.json"))) == 2


def test_cli_refresh_and_table(models, capsys, monkeypatch):
    target, drafter = models
    calls = counting_timer(monkeypatch, values=lambda i: 1.0 + i)
    argv = ["--target", target, "--drafter", drafter, *SIZES]
    code, out, _ = run_cli(capsys, argv)
    assert code == 0 and len(calls) == 9 + 3 and "measured now" in out
    assert "R \\ L" in out and "draft ms" in out and "block 3" in out
    lines = out.splitlines()
    assert lines[1].split()[-3:] == ["1", "2", "4"]  # columns L
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]  # rows R
    code, out, _ = run_cli(capsys, argv)
    assert code == 0 and len(calls) == 12 and "cached" in out
    code, out, _ = run_cli(capsys, [*argv, "--refresh"])
    assert code == 0 and len(calls) == 24 and "measured now" in out


def test_no_drafter_row_without_drafter(models, capsys):
    target, _ = models
    code, out, _ = run_cli(capsys, ["--target", target, "--drafter", "none", *SIZES, "--json"])
    profile = json.loads(out)
    assert code == 0 and "draft_ms" not in profile and profile["gamma"] is None and profile["drafter"] is None
    assert "no drafter" in profile_table(profile)
    assert not SPSProfile.from_dict(profile).has_draft_cost


def test_profile_mismatch_is_rejected(models, monkeypatch):
    target, drafter = models
    counting_timer(monkeypatch)
    profile = load_or_profile(target, drafter, context=16, requests="1", lengths="1,2", repeats=2)
    ident = model_fingerprint(target)
    check_profile_matches(profile, ident, "cpu", dtype="fp32", drafter_identity=model_fingerprint(drafter))
    check_profile_matches(profile, ident, profile["device"])
    with pytest.raises(ConfigError, match="measured for model"):
        check_profile_matches(profile, dict(ident, weights_sha256="0" * 64), "cpu")
    with pytest.raises(ConfigError, match="measured on"):
        check_profile_matches(profile, ident, "NVIDIA H100 80GB HBM3")
    with pytest.raises(ConfigError, match="bf16"):
        check_profile_matches(profile, ident, "cpu", dtype="bf16")
    with pytest.raises(ConfigError, match="drafter"):
        check_profile_matches(profile, ident, "cpu", drafter_identity=model_fingerprint(target))
    gpu_table = {"device": "NVIDIA H100 80GB HBM3", "shape": "Qwen3-4B", "verify_ms": {"1x1": 4.5}}
    with pytest.raises(ConfigError, match="no model identity"):
        check_profile_matches(gpu_table, ident, "cpu")


@pytest.mark.parametrize("argv, message", [
    (["--requests", "0"], "≥ 1"),
    (["--lengths", "1,x"], "not an integer"),
    (["--repeats", "0"], "--repeats"),
    (["--context", "-3"], "--context"),
    (["--context", "60", "--lengths", "8"], "context of 64"),
    (["--device", "tpu"], "unknown device"),
    (["--dtype", "int8"], "dtype"),
    (["--random-shape", "qwen3-4b"], "--force"),
    (["--random-shape", "nope"], "choose one of"),
])
def test_bad_input_exits_2(models, capsys, argv, message):
    target, drafter = models
    base = ["--target", target] if "--random-shape" not in argv else []
    code, out, err = run_cli(capsys, [*base, "--repeats", "2", "--requests", "1", "--lengths", "1", *argv])
    assert code == 2 and out == "" and message in err and err.startswith("dspark profile: error:")


def test_cuda_refused_without_gpu(models, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, ["--target", models[0], "--device", "cuda"])
    assert code == 2 and "CUDA is not available" in err


def test_random_shape_builds_once_with_a_random_drafter(monkeypatch, home):
    shape = dict(profiler.RANDOM_SHAPES["qwen3-4b"], preset="tiny-qwen3", overrides=TINY, label="tiny test shape",
                 drafter=dict(target_layer_ids=(0, 1), num_draft_layers=1, block_size=2, markov_rank=4), gpu_only=False)
    monkeypatch.setitem(profiler.RANDOM_SHAPES, "tiny-test", shape)
    counting_timer(monkeypatch)
    profile = load_or_profile(random_shape="tiny-test", context=8, requests="1,2", lengths="1,2", repeats=2)
    folder = home / "random-models" / "tiny-test-shape"
    assert profile["shape"] == "tiny test shape" and profile["model"] == model_fingerprint(folder)
    assert profile["gamma"] == 2 and set(profile["draft_ms"]) == {"1", "2"}
    assert profile["drafter"]["name"] == "random-dspark-tiny-test" and profile["markov_rank"] == 4
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_or_profile(random_shape="tiny-test", context=8, requests="1,2", lengths="1,2", repeats=2, refresh=True)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime and again["model"] == profile["model"]
