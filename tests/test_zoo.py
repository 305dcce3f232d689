"""The shipped built-in model: its files, its defaults, and that every built-in drafter is lossless on it."""

from __future__ import annotations

import json

import pytest

from dspark.cli import main
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.models.drafters import load_drafter
from dspark.models.target_runner import TargetRunner
from dspark.data.chat import render_prompt
from dspark.models.tokenizer import load_tokenizer, stop_token_ids
from dspark.models.zoo import BUILTIN_DIR, BUILTIN_DRAFTERS, builtin_drafter, builtin_target, resolve_drafter

PROMPTS = (
    "Continue this Python code:\n\nimport os\n\n\ndef list_files(root):\n    result = []\n    for name in os.listdir(root):",
    "Continue this passage from the Python documentation:\n\nThe :func:`open` function returns a file object whose type",
)


@pytest.fixture(scope="module")
def target():
    folder = builtin_target()
    return folder, TargetRunner.from_pretrained(folder, dtype="float32"), load_tokenizer(folder)


def run_json(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_zoo_list_prints_every_shipped_path_within_the_size_budget(capsys):
    info = run_json(capsys, ["zoo", "list", "--json"])
    assert info["installed"] is True
    assert set(info["drafters"]) == set(BUILTIN_DRAFTERS)
    assert set(info["prompts"]) == {"corpus-code", "corpus-prose"}
    assert info["total_bytes"] <= 60 * 2**20
    assert info["manifest"]["target"]["heldout_loss_nats"] > 0
    for path in [info["target"], *info["drafters"].values()]:
        assert (BUILTIN_DIR / path).joinpath("config.json").is_file()


def test_builtin_target_loads_in_transformers_too(target):
    from transformers import AutoConfig

    folder, runner, tokenizer = target
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    assert config.model_type == "qwen3" and config.vocab_size == runner.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("name", BUILTIN_DRAFTERS)
def test_every_builtin_drafter_is_greedy_lossless_on_the_builtin_target(name, target):
    folder, runner, tokenizer = target
    drafter = load_drafter(resolve_drafter(name), dtype="float32")
    prompts = [render_prompt(tokenizer, p, chat=True) for p in PROMPTS]
    stops = stop_token_ids(folder, tokenizer, runner.config.eos_token_ids)
    common = dict(sampling=SamplingParams(), max_new_tokens=40, stop_token_ids=stops, seed=0)
    plain = generate(runner, prompts, **common)
    spec = generate(runner, prompts, drafter=drafter, **common)
    assert [s.token_ids for s in spec.sequences] == [s.token_ids for s in plain.sequences]
    # A trained drafter on its own target's greedy text accepts much more than nothing.
    assert spec.stats.mean_accepted_length > 1.3


def test_demo_on_the_builtin_model_is_lossless_and_faster_in_rounds(capsys):
    out = run_json(capsys, ["demo", "--json", "--max-new-tokens", "32"])
    assert out["greedy_identical"] is True
    assert out["mean_accepted_length"] > 1.5
    assert out["ar_tokens_per_second"] > 0 and out["spec_tokens_per_second"] > 0
    assert out["drafter"] == str(builtin_drafter("dspark"))
    quality = out["text_quality"]
    assert quality["texts"] == len(out["spec_texts"]) and len(quality["per_text"]) == quality["texts"]
    assert all(0 < row["distinct_4"] <= 1 for row in quality["per_text"])


def test_distinct_n_counts_repeated_token_ngrams():
    from dspark.evaluation.text_quality import distinct_n, text_quality

    assert distinct_n([1, 2, 3, 4, 5], 2) == 1.0
    assert distinct_n([7, 8] * 10, 2) == 2 / 19  # (7, 8) and (8, 7) only
    assert distinct_n([7, 8] * 10, 1) == 2 / 20
    assert distinct_n([3], 4) == 1.0  # nothing to repeat
    report = text_quality([[7, 8] * 10, list(range(20))])
    assert report["degenerate_texts"] == 1 and report["mean"]["distinct_4"] == (2 / 17 + 1.0) / 2


def test_a_builtin_drafter_on_another_target_is_refused(tmp_path, capsys):
    from dspark.models.random_init import build_random_model

    other = build_random_model(tmp_path / "other", "tiny-qwen3")
    code = main(["generate", "--model", str(other), "--prompt", "x", "--drafter", "dspark", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and ("hidden" in err or "vocab" in err)
