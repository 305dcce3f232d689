"""The training-data pipeline (docs/design.md §2.6): prompt files, chat rendering and the response loss mask,
resumable target regeneration, the target feature cache (exact size estimate, disk-space refusal,
validation, corruption) and its equality with online features, and the `dspark data` CLI.

Everything runs on CPU with a tiny random Qwen3 whose tokenizer is byte-level (one token per byte, plus
<|endoftext|>, <|im_start|>, <|im_end|>) and has a ChatML chat template.
"""

from __future__ import annotations

import collections
import json
import shutil

import pytest
import torch

from dspark.cli import main
from dspark.decoding.sampling import SamplingParams
from dspark.errors import CheckpointError, ConfigError
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer, stop_token_ids
from dspark.training import feature_cache as fc
from dspark.models.fingerprint import model_fingerprint
from dspark.training.feature_cache import FeatureCache, build_feature_cache, compute_features
from dspark.data.chat import (
    DEFAULT_TEMPLATE_KWARGS, chat_template_info, render_prompt, render_sample_prompt, tokenize_conversation, tokenize_sample,
)
from dspark.data.samples import read_samples
from dspark.training.regenerate import regenerate, scan_output, settings_path

LAYERS = [0, 2]
EOT = "<|im_end|>\n"



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("data") / "target", "tiny-qwen3", seed=3, init_std=0.08)


@pytest.fixture(scope="module")
def runner(model_dir):
    return TargetRunner.from_pretrained(model_dir)


@pytest.fixture()
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversation(i: int) -> dict:
    return {"id": f"s{i}", "conversations": [
        {"role": "user", "content": f"Question {i}: " + "why? " * (i % 4)},
        {"role": "assistant", "content": f"Answer {i} " + "because. " * (1 + i % 5)},
    ]}


# -- prompt files ------------------------------------------------------------------------------------


def test_reads_both_formats_with_stable_default_ids(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"turns": ["hello", "and then?"]},
        "",
        {"id": "abc", "conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "yo"}], "finish_reason": "stop"},
        {"conversations": [{"role": "user", "content": "q"}]},
    ])
    samples = read_samples(path)
    assert [s.id for s in samples] == [0, "abc", 2]
    assert [s.index for s in samples] == [0, 1, 2]
    assert samples[0].messages == ({"role": "user", "content": "hello"}, {"role": "user", "content": "and then?"})
    assert [m["role"] for m in samples[1].messages] == ["system", "user", "assistant"]
    assert samples[1].where.endswith("p.jsonl:3")
    assert [s.id for s in read_samples(path)] == [0, "abc", 2]


@pytest.mark.parametrize("lines, needle", [
    (['{"turns": ["a"]}', '{"turns": ["b"'], "p.jsonl:2: malformed JSON"),
    (['{"foo": 1}'], "p.jsonl:1: a sample needs exactly one of"),
    (['{"turns": ["a"], "conversations": []}'], "p.jsonl:1: a sample needs exactly one of"),
    (['{"turns": "a"}'], "p.jsonl:1: \"turns\" must be a non-empty list"),
    (['{"turns": ["a", 3]}'], "p.jsonl:1: \"turns\"[1] must be a string"),
    (['{"conversations": [{"role": "user"}]}'], "p.jsonl:1: \"conversations\"[0] has no \"content\""),
    (['{"conversations": [{"role": "human", "content": "x"}]}'], "role is 'human'"),
    (['{"conversations": [{"role": "user", "content": 5}]}'], "content must be a string, got int"),
    (['[1, 2]'], "p.jsonl:1: expected a JSON object"),
    (['{"id": 1.5, "turns": ["a"]}'], "\"id\" must be a string or an integer"),
    (['{"id": 7, "turns": ["a"]}', '{"id": 7, "turns": ["b"]}'], "p.jsonl:2: duplicate sample id 7 (first used on line 1)"),
    (["", "   "], "p.jsonl: no samples (the file is empty)"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        read_samples(path)
    assert needle in str(err.value)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_samples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_samples(tmp_path / "empty.jsonl")


# -- rendering and loss mask -------------------------------------------------------------------------

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, obviously."},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6 — é"},
]


def masked_spans(tokenizer, out) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    spans, current = [], []
    for tok, m in zip(out.input_ids.tolist(), out.loss_mask.tolist()):
        if m:
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def test_loss_mask_is_exactly_the_responses(tokenizer):
    out = tokenize_conversation(tokenizer, MULTI_TURN)
    text = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert out.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.input_ids.dtype == torch.long and out.loss_mask.dtype == torch.bool
    assert masked_spans(tokenizer, out) == ["4, obviously." + EOT, "6 — é" + EOT]
    unmasked = tokenizer.decode(out.input_ids[~out.loss_mask].tolist())
    assert unmasked.count("<|im_start|>assistant\n") == 2  # headers are not supervised


def test_truncation_and_regeneration_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": MULTI_TURN}])
    sample = read_samples(path)[0]
    full = tokenize_sample(tokenizer, sample)
    cut = tokenize_sample(tokenizer, sample, max_length=20)
    assert cut.input_ids.tolist() == full.input_ids[:20].tolist() and cut.loss_mask.tolist() == full.loss_mask[:20].tolist()
    prompt = tokenizer.decode(render_sample_prompt(tokenizer, sample))
    assert prompt == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_fallback_template_when_the_tokenizer_has_none(tokenizer, tmp_path):
    tokenizer.chat_template = None
    assert chat_template_info(tokenizer)["source"] == "fallback"
    out = tokenize_conversation(tokenizer, MULTI_TURN)
    assert tokenizer.decode(out.input_ids.tolist()).startswith("System:\nYou are terse.\n\nUser:\n2+2?\n\nAssistant:\n4,")
    assert masked_spans(tokenizer, out) == ["4, obviously.<|im_end|>\n\n", "6 — é<|im_end|>\n\n"]
    sample = read_samples(write_jsonl(tmp_path / "p.jsonl", [{"turns": ["hi"]}]))[0]
    assert tokenizer.decode(render_sample_prompt(tokenizer, sample)) == "User:\nhi\n\nAssistant:\n"


def test_one_user_turn_renders_alike_in_generate_and_eval(tokenizer, tmp_path):
    """`render_prompt(chat=True)` (generate --chat, the demo) and `render_sample_prompt` with
    DEFAULT_TEMPLATE_KWARGS (eval) give the same ids for the same user turn, with a template that reacts to
    enable_thinking (as Qwen3's does) and with the fallback template."""
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    sample = read_samples(write_jsonl(tmp_path / "p.jsonl", [{"turns": ["2+2?"]}]))[0]
    for template in (tokenizer.chat_template, None):
        tokenizer.chat_template = template
        via_generate = render_prompt(tokenizer, "2+2?", chat=True)
        via_eval = render_sample_prompt(tokenizer, sample, template_kwargs=dict(DEFAULT_TEMPLATE_KWARGS))
        assert via_generate == via_eval
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking is defined %}T{% endif %}"
    assert tokenizer.decode(render_prompt(tokenizer, "x", chat=True)) == "xT"  # the default kwargs reach the template
    assert tokenizer.decode(render_prompt(tokenizer, "x", chat=True, template_kwargs=None)) == "x"


def test_non_incremental_template_is_refused_not_mis_masked(tokenizer):
    # Like Qwen3's template: only the final assistant turn gets an (empty) think block.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigError, match="incrementally"):
        tokenize_conversation(tokenizer, MULTI_TURN, where="x.jsonl:1")
    single = tokenize_conversation(tokenizer, MULTI_TURN[1:3])
    assert masked_spans(tokenizer, single) == ["<think></think>4, obviously." + EOT]


# -- regeneration ------------------------------------------------------------------------------------

T1 = SamplingParams(temperature=1.0)


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"turns": [f"prompt number {i} " + "x" * i]} for i in range(8)]
    rows[5] = {"id": "five", "conversations": [{"role": "system", "content": "sys"}, {"role": "user", "content": "p5"},
                                               {"role": "assistant", "content": "old answer"}]}
    return read_samples(write_jsonl(tmp_path / "prompts.jsonl", rows))


def run_regen(runner, tokenizer, model_dir, samples, output, **kwargs):
    kwargs = {"sampling": T1, "max_new_tokens": 6, "batch_size": 3, "seed": 11, "progress": False, **kwargs}
    return regenerate(runner, tokenizer, samples, output, stop_token_ids=stop_token_ids(model_dir, tokenizer),
                      target_identity=model_fingerprint(model_dir), **kwargs)


def test_regenerate_rows(runner, tokenizer, model_dir, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_regen(runner, tokenizer, model_dir, prompts, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, "five", 6, 7]
    assert summary.num_written == 8 and summary.batches_run == 3
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 6
        assert r["conversations"][-1]["role"] == "assistant" and isinstance(r["conversations"][-1]["content"], str)
    assert rows[0]["conversations"][0] == {"role": "user", "content": "prompt number 0 "}
    assert [m["role"] for m in rows[5]["conversations"]] == ["system", "user", "assistant"]
    assert rows[5]["conversations"][-1]["content"] != "old answer"
    assert settings_path(out).is_file()


def test_regenerate_killed_then_resumed_equals_uninterrupted(runner, tokenizer, model_dir, prompts, tmp_path):
    whole = tmp_path / "whole.jsonl"
    run_regen(runner, tokenizer, model_dir, prompts, whole)
    reference = whole.read_bytes()

    class Killed(Exception):
        pass

    def kill_after_batch_1(b):
        if b == 1:
            raise Killed

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        run_regen(runner, tokenizer, model_dir, prompts, resumed, after_batch=kill_after_batch_1)
    assert len(resumed.read_text().splitlines()) == 6
    summary = run_regen(runner, tokenizer, model_dir, prompts, resumed)
    assert summary.num_already_done == 6 and summary.batches_skipped == 2 and summary.num_written == 2
    assert resumed.read_bytes() == reference

    # A kill in the middle of a write: batch 1 has one complete row and a torn one.
    lines = reference.decode().splitlines(keepends=True)
    torn_bytes = "".join(lines[:4]).encode() + lines[4].encode()[:25]
    probe = tmp_path / "probe.jsonl"
    probe.write_bytes(torn_bytes)
    assert scan_output(probe) == ([0, 1, 2, 3], 25)
    assert probe.read_bytes() == "".join(lines[:4]).encode()  # torn tail cut off in place
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(torn_bytes)
    shutil.copy(settings_path(whole), settings_path(torn))
    summary = run_regen(runner, tokenizer, model_dir, prompts, torn)
    assert summary.torn_bytes_dropped == 25 and summary.num_written == 4
    assert torn.read_bytes() == reference
    ids = [json.loads(line)["id"] for line in torn.read_text().splitlines()]
    assert not [i for i, n in collections.Counter(ids).items() if n > 1]

    assert run_regen(runner, tokenizer, model_dir, prompts, torn).num_written == 0  # complete: nothing to do


def test_regenerate_is_reproducible_per_seed(runner, tokenizer, model_dir, prompts, tmp_path):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    run_regen(runner, tokenizer, model_dir, prompts, a, seed=5)
    run_regen(runner, tokenizer, model_dir, prompts, b, seed=5)
    run_regen(runner, tokenizer, model_dir, prompts, c, seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_regenerate_split_over_processes_on_batch_boundaries_equals_one_run(runner, tokenizer, model_dir, prompts,
                                                                             tmp_path):
    whole, head, tail = (tmp_path / f"{n}.jsonl" for n in ("whole", "head", "tail"))
    run_regen(runner, tokenizer, model_dir, prompts, whole)
    run_regen(runner, tokenizer, model_dir, prompts[:6], head)
    run_regen(runner, tokenizer, model_dir, prompts[6:], tail, first_batch=2)  # batch size 3: samples 6.. = batch 2
    assert head.read_bytes() + tail.read_bytes() == whole.read_bytes()
    unseeded = tmp_path / "unseeded.jsonl"
    run_regen(runner, tokenizer, model_dir, prompts[6:], unseeded)  # batch 0's seed: other samples drawn
    assert unseeded.read_bytes() != tail.read_bytes()
    with pytest.raises(ConfigError, match="first_batch"):
        run_regen(runner, tokenizer, model_dir, prompts, tmp_path / "bad.jsonl", first_batch=-1)


def test_regenerate_refuses_other_settings_and_foreign_files(runner, tokenizer, model_dir, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    run_regen(runner, tokenizer, model_dir, prompts, out, limit=4)
    with pytest.raises(ConfigError, match="seed: stored 11, now 12"):
        run_regen(runner, tokenizer, model_dir, prompts, out, seed=12)
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"id": 0, "conversations": []}])
    with pytest.raises(ConfigError, match="unknown provenance"):
        run_regen(runner, tokenizer, model_dir, prompts, foreign)
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"id": 0}\nnot json\n{"id": 1}\n')
    with pytest.raises(ConfigError, match="damaged.jsonl:2"):
        run_regen(runner, tokenizer, model_dir, prompts, damaged)


def test_regenerate_skips_prompts_beyond_the_context(runner, tokenizer, model_dir, tmp_path):
    samples = read_samples(write_jsonl(tmp_path / "p.jsonl", [{"turns": ["short"]}, {"turns": ["y" * 2100]}]))
    out = tmp_path / "out.jsonl"
    summary = run_regen(runner, tokenizer, model_dir, samples, out)
    assert summary.num_skipped_too_long == 1 and summary.num_written == 1
    assert run_regen(runner, tokenizer, model_dir, samples, out).num_written == 0


# -- feature cache -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    rows = [conversation(i) for i in range(9)] + [{"turns": ["no response here"]}]
    return read_samples(write_jsonl(tmp_path_factory.mktemp("conv") / "conv.jsonl", rows))


@pytest.fixture(scope="module")
def built_cache(runner, model_dir, conversations, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    manifest = build_feature_cache(
        runner, load_tokenizer(model_dir), conversations, out, layer_ids=LAYERS, target_identity=model_fingerprint(model_dir),
        max_shard_bytes=40_000, batch_tokens=200, log=lambda msg: None,
    )
    return out, manifest


def test_cache_round_trip_equals_online_features(built_cache, runner, model_dir, conversations):
    out, manifest = built_cache
    tokenizer = load_tokenizer(model_dir)
    cache = FeatureCache(out)
    assert len(cache) == 9 and manifest["dropped"] == {"no_response": 1, "few_loss_tokens": 0}
    assert len(manifest["shards"]) > 1  # small max_shard_bytes: samples spread over several shards
    assert cache.sample_ids() == [f"s{i}" for i in range(9)]
    H = runner.config.hidden_size
    for i in range(9):
        item = cache[i]
        expected = tokenize_sample(tokenizer, conversations[i])
        assert torch.equal(item.input_ids, expected.input_ids) and torch.equal(item.loss_mask, expected.loss_mask)
        online = compute_features(runner, expected.input_ids, LAYERS)
        S = expected.num_tokens
        assert item.features.shape == (S, len(LAYERS) * H) and item.final_hidden.shape == (S, H)
        assert item.features.dtype == torch.bfloat16
        torch.testing.assert_close(item.features.float(), online.features.to(torch.bfloat16).float(), rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(item.final_hidden.float(), online.final_hidden.to(torch.bfloat16).float(), rtol=1.6e-2, atol=1e-3)
    last = cache[-1]
    assert torch.equal(last.input_ids, cache[8].input_ids)
    with pytest.raises(IndexError):
        cache[9]
    # The online final hidden state is the normalised output of the last layer; features are raw outputs.
    ids = cache[0].input_ids
    raw = compute_features(runner, ids, [runner.config.num_layers - 1])
    torch.testing.assert_close(raw.final_hidden, runner.model.model.norm(raw.features))


def test_float32_cache_matches_online_tightly(runner, model_dir, conversations, tmp_path):
    out = tmp_path / "c32"
    build_feature_cache(runner, load_tokenizer(model_dir), conversations[:3], out, layer_ids=[-1, 3], dtype="float32",
                        target_identity=model_fingerprint(model_dir), log=lambda msg: None)
    cache = FeatureCache(out)
    for i in range(3):
        online = compute_features(runner, cache[i].input_ids, [-1, 3])
        torch.testing.assert_close(cache[i].features, online.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[i].final_hidden, online.final_hidden, rtol=1e-5, atol=1e-5)


def test_size_estimate_equals_bytes_written(built_cache, runner, model_dir, conversations):
    out, manifest = built_cache
    data = fc.prepare_cache_samples(load_tokenizer(model_dir), conversations, max_length=runner.max_context)
    est = fc.estimate_cache_size(data.token_counts, [s.id for s, _ in data.samples], num_layers=len(LAYERS),
                                 hidden_size=runner.config.hidden_size, dtype="bfloat16", max_shard_bytes=40_000)
    H = runner.config.hidden_size
    assert est.bytes_per_token == (len(LAYERS) + 1) * H * 2 + 5
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.bin"))
    assert shard_bytes == est.data_bytes == manifest["num_tokens"] * est.bytes_per_token
    assert est.num_shards == len(manifest["shards"])
    index_bytes = (out / "index.bin").stat().st_size + (out / "sample_ids.json").stat().st_size
    assert index_bytes == est.index_bytes
    total = sum(p.stat().st_size for p in out.iterdir())
    assert 0 <= est.total_bytes - total <= est.manifest_allowance


def test_refuses_when_the_disk_is_too_small(runner, model_dir, conversations, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    messages = []
    out = tmp_path / "cache"
    with pytest.raises(fc.DiskSpaceError, match="1000 B free"):
        build_feature_cache(runner, load_tokenizer(model_dir), conversations, out, layer_ids=LAYERS,
                            target_identity=model_fingerprint(model_dir), log=messages.append)
    assert "B/token" in messages[0]  # the size was printed before refusing
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validate_reports_mismatches(built_cache, runner, model_dir, tmp_path):
    out, _ = built_cache
    cache = FeatureCache(out)
    cache.validate(LAYERS, runner.config.hidden_size, model_dir)
    cache.validate(LAYERS, runner.config.hidden_size, model_fingerprint(model_dir))
    with pytest.raises(ConfigError, match="target layers"):
        cache.validate([1, 2], runner.config.hidden_size, model_dir)
    with pytest.raises(ConfigError, match="hidden size"):
        cache.validate(LAYERS, 64, model_dir)
    other = build_random_model(tmp_path / "other", "tiny-qwen3", seed=4, init_std=0.08)
    with pytest.raises(CheckpointError, match="differs"):
        cache.validate(LAYERS, runner.config.hidden_size, other)  # same config, other weights


def test_corrupted_truncated_or_incomplete_cache_is_detected(built_cache, tmp_path, runner, model_dir, conversations, monkeypatch):
    out, _ = built_cache
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = broken / "shard-00001.features.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="shard-00001.features.bin.*truncated or corrupted"):
        FeatureCache(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        FeatureCache(broken)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        FeatureCache(tmp_path / "missing")

    calls = []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = fc.compute_features_batch
    monkeypatch.setattr(fc, "compute_features_batch", dies_on_second_batch)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(runner, load_tokenizer(model_dir), conversations, killed, layer_ids=LAYERS,
                            target_identity=model_fingerprint(model_dir), batch_tokens=100, log=lambda msg: None)
    assert not killed.exists()  # no valid-looking cache after an interrupted build
    assert not list(tmp_path.glob(".killed.tmp-*"))


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_regenerate_then_cache(model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"turns": [f"q{i}"]} for i in range(4)])
    out = tmp_path / "regen.jsonl"
    argv = ["data", "regenerate", "--target", str(model_dir), "--input", str(prompts), "--output", str(out),
            "--max-new-tokens", "5", "--batch-size", "2", "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_written"] == 4 and len(out.read_text().splitlines()) == 4
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["num_already_done"] == 4
    greedy = [tmp_path / "plain.jsonl", tmp_path / "ngram.jsonl"]
    for path, extra in zip(greedy, ([], ["--drafter", "ngram"])):
        assert main(argv[:7] + [str(path), "--temperature", "0", "--max-new-tokens", "12", "--no-progress"] + extra) == 0
    assert greedy[0].read_text() == greedy[1].read_text()  # speculative regeneration is lossless
    capsys.readouterr()

    cache_dir = tmp_path / "cache"
    base = ["data", "cache", "--target", str(model_dir), "--data", str(out), "--layers", "1,3", "--output", str(cache_dir),
            "--no-progress", "--json"]
    assert main(base + ["--dry-run"]) == 0
    captured = capsys.readouterr()
    dry = json.loads(captured.out)
    assert "B/token" in captured.err and dry["bytes_per_token"] == 3 * 128 * 2 + 5 and not cache_dir.exists()
    assert main(base) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["num_samples"] == 4
    cache = FeatureCache(cache_dir)
    cache.validate([1, 3], 128, model_dir)
    assert main(base) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0


@pytest.mark.parametrize("command, needle", [
    (["regenerate", "--input", "{bad}", "--output", "{tmp}/o.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["regenerate", "--input", "{empty}", "--output", "{tmp}/o.jsonl"], "empty"),
    (["regenerate", "--input", "{good}", "--output", "{tmp}/o.jsonl", "--batch-size", "0"], "--batch-size"),
    (["regenerate", "--input", "{good}", "--output", "{tmp}/o.jsonl", "--top-p", "0"], "top_p"),
    (["cache", "--data", "{good}", "--layers", "0,9", "--output", "{tmp}/c"], "layer id 9 out of range"),
    (["cache", "--data", "{good}", "--layers", "a,b", "--output", "{tmp}/c"], "comma-separated integers"),
    (["cache", "--data", "{good}", "--layers", "0", "--output", "{tmp}/c", "--dtype", "int8"], "--dtype"),
    (["cache", "--data", "{good}", "--layers", "0", "--output", "{tmp}/c", "--max-shard-bytes", "lots"], "--max-shard-bytes"),
    (["cache", "--data", "{good}", "--layers", "0", "--output", "{tmp}/c"], "regenerate responses first"),
])
def test_cli_bad_input_exits_2(model_dir, tmp_path, capsys, command, needle):
    files = {
        "bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl", "good": tmp_path / "good.jsonl", "tmp": tmp_path,
    }
    files["bad"].write_text('{"turns": ["a"]}\n{"turns": \n')
    files["empty"].write_text("\n")
    write_jsonl(files["good"], [{"turns": ["a"]}])
    argv = ["data", command[0], "--target", str(model_dir)] + [a.format(**files) for a in command[1:]] + ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "dspark data: error" in err
