"""`dspark generate` end to end (the demo on the built-in model: test_zoo.py): JSON fields, plain vs speculative agreement, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dspark.cli import main
from dspark.models.random_init import build_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("cli") / "tiny", "tiny-qwen3", seed=3, init_std=0.08)


def run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_generate_json_plain_and_ngram_agree(model_dir, capsys):
    base = ["generate", "--model", str(model_dir), "--prompt", "def f(x):", "--max-new-tokens", "24", "--json"]
    plain = run_json(capsys, base)
    spec = run_json(capsys, base + ["--drafter", "ngram"])
    for out in (plain, spec):
        assert {"text", "token_ids", "mean_accepted_length", "tokens_per_second"} <= out.keys()
        assert isinstance(out["text"], str) and out["tokens_per_second"] > 0
    assert plain["mean_accepted_length"] is None
    assert spec["mean_accepted_length"] >= 1.0
    assert plain["token_ids"] == spec["token_ids"]
    assert len(plain["token_ids"]) == 24 or plain["outputs"][0]["finish_reason"] == "stop"


def test_generate_sampling_is_seeded(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "abc", "--max-new-tokens", "16", "--json",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--drafter", "ngram"]
    first = run_json(capsys, argv + ["--seed", "7"])
    again = run_json(capsys, argv + ["--seed", "7"])
    other = run_json(capsys, argv + ["--seed", "8"])
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]


def test_generate_batch_of_prompts(model_dir, capsys):
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "a", "--prompt", "bcd efg",
                            "--max-new-tokens", "8", "--json", "--drafter", "ngram", "--chat"])
    assert len(out["outputs"]) == 2
    assert all(len(o["token_ids"]) <= 8 for o in out["outputs"])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--max-new-tokens", "5000"], "context"),
        (["--drafter", "no-such-drafter"], "no-such-drafter"),
        (["--drafter", "ngram", "--num-draft-tokens", "-1"], "num_draft_tokens"),
        (["--draft-gate"], "need a drafter"),
        (["--drafter", "ngram", "--draft-gate"], "confidence head"),
        (["--cuda-graph-max-bs", "0"], "--cuda-graph-max-bs"),
    ],
)
def test_generate_rejects_bad_input(model_dir, capsys, extra, needle):
    code = main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "error" in err


def test_generate_prompt_longer_than_context(tmp_path, capsys):
    folder = build_random_model(tmp_path / "short", "tiny-qwen3", max_position_embeddings=32)
    code = main(["generate", "--model", str(folder), "--prompt", "x" * 40, "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "context of 32" in err


def test_missing_model_folder_exits_nonzero_via_console(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dspark", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "not found" in proc.stderr
    assert proc.stdout == ""


def test_model_without_tokenizer_is_reported(tmp_path, capsys):
    folder = build_random_model(tmp_path / "notok", "tiny-qwen3", with_tokenizer=False)
    code = main(["generate", "--model", str(folder), "--prompt", "hi"])
    assert code == 2 and "tokenizer" in capsys.readouterr().err


def test_generate_with_draft_gate_on_the_builtin_model(tmp_path, capsys):
    """--draft-gate with the built-in DSpark drafter and a given profile: greedy output equals plain
    decoding's and the gate's counters are reported."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"verify_ms_by_tokens": {"1": 10.0, "64": 12.0}, "draft_ms": {"1": 3.0}}))
    base = ["generate", "--prompt", "def parse(line):", "--max-new-tokens", "24", "--temperature", "0", "--json"]
    plain = run_json(capsys, base + ["--drafter", "none"])
    gated = run_json(capsys, base + ["--scheduler", "causal-greedy", "--profile", str(profile), "--draft-gate"])
    assert gated["token_ids"] == plain["token_ids"]
    report = gated["draft_gate"]
    assert report["drafted_steps"] + report["skipped_steps"] >= 1 and report["rounds_observed"] >= 1


def test_serve_refuses_an_impossible_graph_batch_before_loading(capsys):
    code = main(["serve", "--cuda-graph-max-bs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graph-max-bs must be ≥ 1" in err
