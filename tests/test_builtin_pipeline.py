"""The built-in model's recipe at toy scale: corpus builder, BPE tokenizer, `dspark pretrain` (export,
resume), and `dspark eval`'s protocol (JSON fields, averages, missing / unknown sets, the plot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.cli import main
from dspark.pipeline.corpus import CODE_INSTRUCTION, CorpusError, build_corpus, locate_docs, read_documents

from figures import check_png

MODULE_TEXT = '''"""Module {i}."""

import os


def function_{i}(value):
    """Return value plus {i}."""
    total = value + {i}
    for step in range(3):
        total += step
    return total


class Thing{i}:
    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)
        return len(self.items)
'''
DOC_TEXT = """Section {i}
==========

The :mod:`thing{i}` module provides helpers. Each helper returns a value and
raises :exc:`ValueError` when the input is not valid.

.. function:: helper{i}(value)

   Return *value* converted to a string, or raise :exc:`TypeError`.

"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    stdlib, docs = root / "stdlib", root / "docs"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    (stdlib / "os.py").write_text(MODULE_TEXT.format(i=0) * 3)
    for i in range(1, 60):
        (stdlib / ("pkg" if i % 2 else "") / f"mod{i}.py").write_text(MODULE_TEXT.format(i=i) * 3)
    (stdlib / "test" / "test_skipped.py").write_text("SKIPPED = True\n" * 40)
    (docs / "library").mkdir(parents=True)
    for i in range(40):
        (docs / "library" / f"thing{i}.rst.txt").write_text(DOC_TEXT.format(i=i) * 4)
    return stdlib, docs


@pytest.fixture(scope="module")
def corpus(sources, tmp_path_factory):
    stdlib, docs = sources
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    build_corpus(out, stdlib_dir=stdlib, docs_dir=docs, heldout_percent=10, prompts_per_set=6, train_prompts=30)
    return out


def test_corpus_is_deterministic_and_holds_out_whole_files(corpus, sources, tmp_path):
    stdlib, docs = sources
    again = build_corpus(tmp_path / "again", stdlib_dir=stdlib, docs_dir=docs, heldout_percent=10,
                         prompts_per_set=6, train_prompts=30)
    assert again["sha256"] == json.loads((corpus / "manifest.json").read_text())["sha256"]
    train = {(d.source, d.path) for d in read_documents(corpus / "train.jsonl")}
    held = {(d.source, d.path) for d in read_documents(corpus / "heldout.jsonl")}
    assert held and train and not (train & held)
    assert not any("test/" in path for _, path in train | held)  # test suites excluded
    assert {s for s, _ in held} == {"stdlib", "docs"}
    code_prompts = [json.loads(line) for line in (corpus / "prompts-code.jsonl").open()]
    assert len(code_prompts) == 6
    for prompt in code_prompts:
        assert prompt["turns"][0].startswith(CODE_INSTRUCTION)
        assert (prompt["source"].split("/", 1)[0], prompt["source"].split("/", 1)[1]) in held


def test_missing_documentation_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg
    with pytest.raises(CorpusError, match="python3.11-doc"):
        locate_docs(tmp_path / "cache")
    with pytest.raises(CorpusError, match="os.py"):
        build_corpus(tmp_path / "c", stdlib_dir=tmp_path, docs_dir=tmp_path)  # no os.py: not a stdlib
    code = main(["data", "corpus", "--out", str(tmp_path / "c"), "--docs", str(tmp_path / "empty")])
    assert code == 2


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    from dspark.pipeline.tokenizer_training import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=512)


def test_tokenizer_has_chat_tokens_mask_row_and_round_trips(tokenizer_dir):
    from dspark.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([0, 1, 2, 511]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    assert tok.eos_token_id == 2
    text = "def function_7(value):\n    return value + 7  # ünïcode\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 1.5  # merges learned
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def pretrain_overrides(corpus, tokenizer_dir, out, steps):
    return [
        f"data.corpus={corpus}", f"data.tokenizer={tokenizer_dir}", f"train.output_dir={out}",
        "model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
        "model.max_position_embeddings=128", "data.seq_len=32", "data.heldout_tokens=256", "optim.lr=3e-3",
        f"train.max_steps={steps}", "train.batch_size=4", "train.checkpoint_every=3", "train.eval_every=100",
        "train.export_dtype=float32", "train.progress=false", "train.log_every=1",
    ]


def test_pretrain_exports_a_folder_transformers_and_the_runner_agree_on(corpus, tokenizer_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dspark.models.target_runner import TargetRunner

    assert main(["pretrain", "--json", *pretrain_overrides(corpus, tokenizer_dir, tmp_path / "run", 12)]) == 0
    summary = json.loads(capsys.readouterr().out)
    folder = Path(summary["model"])
    report = json.loads((folder / "pretrain_report.json").read_text())
    losses = [h["loss"] for h in report["history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.5  # it learned something
    assert report["heldout_loss_nats"] == pytest.approx(summary["heldout_loss_nats"])
    hf = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    tokens = [1, 40, 41, 42, 43, 44, 45]
    seq = runner.new_sequence()
    ours = runner.forward([seq], [tokens], all_logits=True).logits
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0]
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4, rtol=1e-4)


def test_pretrain_kill_and_resume_equals_an_uninterrupted_run(corpus, tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    from dspark.pipeline.pretrain import Pretrainer, load_pretrain_config

    full = Pretrainer(load_pretrain_config(None, pretrain_overrides(corpus, tokenizer_dir, tmp_path / "full", 6)))
    full.fit()
    cut = load_pretrain_config(None, pretrain_overrides(corpus, tokenizer_dir, tmp_path / "cut", 6))
    first = Pretrainer(cut)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()  # then "killed"
    second = Pretrainer(cut)
    second.fit()
    assert second.step == 6
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_rejects_a_vocabulary_mismatch(corpus, tokenizer_dir, tmp_path, capsys):
    overrides = pretrain_overrides(corpus, tokenizer_dir, tmp_path / "bad", 2)
    overrides[3] = "model.vocab_size=1024"
    assert main(["pretrain", *overrides]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert main(["pretrain", *overrides, "model.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


# -- dspark eval ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_target(tmp_path_factory):
    from dspark.models.random_init import build_random_model

    return build_random_model(tmp_path_factory.mktemp("evalt") / "tiny", "tiny-qwen3", seed=3, init_std=0.08)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaldata")
    rows = [{"turns": [f"for i in range({i}):\n    print(i, i, i)"]} for i in range(7)]
    (folder / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return folder


def run_eval(capsys, eval_target, eval_data, *extra):
    argv = ["eval", "--target", str(eval_target), "--data-dir", str(eval_data), "--datasets", "gsm8k,mbpp,alpaca",
            "--max-new-tokens", "12", "--no-progress", "--json", *extra]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_eval_reports_the_paper_protocol_fields(eval_target, eval_data, capsys, tmp_path):
    report, err = run_eval(capsys, eval_target, eval_data, "--drafter", "ngram", "--limit", "5",
                           "--temperature", "0", "--out", str(tmp_path / "out"))
    assert "alpaca" in err and report["missing_datasets"][0]["name"] == "alpaca"
    gsm, mbpp = report["datasets"]["gsm8k"], report["datasets"]["mbpp"]
    assert gsm["samples"] == 5 and mbpp["samples"] == 3  # --limit after the seeded shuffle
    for r in (gsm, mbpp):
        assert r["tau"] == pytest.approx(r["emitted_tokens"] / r["rounds"])
        assert r["accepted_tokens"] <= r["verified_tokens"] <= r["drafted_tokens"]
        assert 1 <= len(r["conditional_acceptance"]) == len(r["prefix_survival"]) <= 7  # n-gram drafts ≤ 7
        survival = r["prefix_survival"]
        assert all(a >= b for a, b in zip(survival, survival[1:]))
    assert report["macro_tau"] == pytest.approx((gsm["tau"] + mbpp["tau"]) / 2)
    assert report["domains"] == {"math": pytest.approx(gsm["tau"]), "code": pytest.approx(mbpp["tau"])}
    assert (tmp_path / "out" / "eval.json").is_file() and (tmp_path / "out" / "table.md").is_file()


def test_eval_compares_drafters_with_a_plot(eval_target, eval_data, capsys, tmp_path, saved_figures):
    # greedy: the random target repeats itself, so the n-gram drafter finds matches and drafts in every set
    report, _ = run_eval(capsys, eval_target, eval_data, "--drafter", "ngram", "--drafter", "ngram", "--temperature", "0",
                         "--block-size", "3", "--limit", "2", "--out", str(tmp_path / "out"))
    assert list(report["drafters"]) == ["ngram", "ngram'"]
    first, second = report["drafters"].values()
    assert first["datasets"]["gsm8k"]["tau"] == second["datasets"]["gsm8k"]["tau"]  # same prompts, same seeds
    assert report["gains"]["ngram"]["ngram'"] == pytest.approx(0.0)
    png = tmp_path / "out" / "conditional_acceptance.png"
    assert report["plot"] == str(png)
    # Fig. 2: one panel per domain (one set each here), one line per drafter with its per-position values.
    figure = saved_figures[png]
    check_png(png, figure)
    assert [ax.get_title() for ax in figure.axes] == ["math", "code"]
    for ax, name in zip(figure.axes, ("gsm8k", "mbpp")):
        assert [line.get_label() for line in ax.get_lines()] == ["ngram", "ngram'"]
        for line, result in zip(ax.get_lines(), report["drafters"].values()):
            values = result["datasets"][name]["conditional_acceptance"]
            assert len(values) >= 1
            assert list(line.get_xdata()) == list(range(1, len(values) + 1))
            assert list(line.get_ydata()) == pytest.approx(values)
    assert figure.get_suptitle() == f"conditional acceptance per position (T = {report['settings']['temperature']})"


def test_conditional_acceptance_plot_pools_each_domain_by_hand(tmp_path, saved_figures):
    """Fig. 2 from a hand-made report: a domain's line pools its sets' counts (accepted / reached per slot),
    a drafter without rounds in a domain has no line there."""
    from dspark.evaluation.report import plot_conditional_acceptance

    def counts(domain, accepted, reached):
        return {"domain": domain, "rounds": reached[0], "verified_per_position": list(reached),
                "accepted_per_position": list(accepted), "reached_per_position": list(reached)}

    report = {"settings": {"temperature": 0.0}, "drafters": {
        "a": {"domains": {"math": 1.0, "code": 1.0}, "datasets": {
            "gsm8k": counts("math", [8, 4], [10, 8]), "math500": counts("math", [6, 3], [10, 6]),
            "mbpp": counts("code", [9, 6, 2], [10, 9, 6])}},
        "b": {"domains": {"math": 1.0}, "datasets": {"gsm8k": counts("math", [4, 1, 0], [10, 4, 1])}},
    }}
    path = plot_conditional_acceptance(report, tmp_path / "fig2.png")
    figure = saved_figures[path]
    assert [ax.get_title() for ax in figure.axes] == ["math", "code"]
    math, code = figure.axes
    assert [line.get_label() for line in math.get_lines()] == ["a", "b"]
    expected = {"a": [14 / 20, 7 / 14], "b": [0.4, 0.25, 0.0]}  # a pools gsm8k and math500
    for line in math.get_lines():
        values = expected[line.get_label()]
        assert list(line.get_xdata()) == list(range(1, len(values) + 1))
        assert list(line.get_ydata()) == pytest.approx(values)
    (line,) = code.get_lines()
    assert line.get_label() == "a" and list(line.get_ydata()) == pytest.approx([0.9, 6 / 9, 2 / 6])
    assert [t.get_text() for t in math.get_legend().get_texts()] == ["a", "b"]
    assert figure.get_suptitle() == "conditional acceptance per position (T = 0.0)"


def test_eval_rejects_unknown_sets_and_reports_when_none_can_be_read(eval_target, eval_data, capsys, tmp_path):
    assert main(["eval", "--target", str(eval_target), "--drafter", "ngram", "--datasets", "nosuchset"]) == 2
    assert "unknown data set 'nosuchset'" in capsys.readouterr().err
    assert main(["eval", "--target", str(eval_target), "--drafter", "ngram", "--data-dir", str(tmp_path),
                 "--datasets", "gsm8k"]) == 2
    assert "no data set could be read" in capsys.readouterr().err


def test_eval_command_runs_as_a_subprocess_with_json(eval_target, eval_data):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "dspark", "eval", "--target", str(eval_target), "--drafter", "ngram", "--data-dir",
         str(eval_data), "--datasets", "mbpp", "--max-new-tokens", "8", "--no-progress", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["datasets"]["mbpp"]["rounds"] > 0


def test_shipped_pretrain_config_is_the_zoo_recipe():
    from dspark.pipeline.pretrain import load_pretrain_config
    from dspark.pipeline.zoo_build import PRETRAIN_OVERRIDES

    path = Path(__file__).resolve().parents[1] / "configs" / "pretrain_builtin.yaml"
    shipped = load_pretrain_config(path, ["data.corpus=c", "data.tokenizer=t"])
    recipe = load_pretrain_config(None, PRETRAIN_OVERRIDES + ["data.corpus=c", "data.tokenizer=t"])
    assert shipped == recipe


def test_bpe_conversations_tokenise_prompt_and_response_separately(tokenizer_dir):
    """Byte-level BPE merges the assistant header's newline with a response's leading indentation when the
    whole conversation is tokenised at once; the training sample must instead start with exactly the ids
    inference feeds the target (the rendered prompt alone) and supervise the response."""
    from dspark.data.chat import render_sample_prompt, tokenize_conversation
    from dspark.data.samples import Sample
    from dspark.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    messages = ({"role": "user", "content": "Continue this Python code:\n\ndef f(x):"},
                {"role": "assistant", "content": "    total = x + 1\n    return total"})
    whole = tok(tok.apply_chat_template(list(messages), tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = render_sample_prompt(tok, Sample(0, 0, messages, "t"))
    assert whole[: len(prompt)] != prompt  # the merge this test is about really happens with this tokenizer
    out = tokenize_conversation(tok, messages)
    assert out.input_ids[: len(prompt)].tolist() == prompt
    assert not out.loss_mask[: len(prompt)].any() and out.loss_mask[len(prompt):].all()
    assert tok.decode(out.input_ids[len(prompt):].tolist()) == messages[1]["content"] + "<|im_end|>\n"


def test_zoo_rebuild_end_to_end_at_toy_scale(corpus, tokenizer_dir, tmp_path, monkeypatch):
    """`dspark zoo rebuild`'s whole chain (pretrain → regenerate → feature cache → drafters → calibrate →
    install) with a toy recipe: drafters reading the shared layers train from the one feature cache, MTP-1 from
    the regenerated JSONL, and the installed folder loads as a target with its drafters. A second rebuild
    reuses every finished step."""
    import shutil

    from dspark.calibration.calibration_file import regimes_for
    from dspark.models.drafters import load_drafter
    from dspark.models.target_runner import TargetRunner
    from dspark.pipeline import zoo_build

    work, out = tmp_path / "work", tmp_path / "builtin"
    shutil.copytree(corpus, work / "corpus")
    shutil.copytree(tokenizer_dir, work / "tokenizer")
    toy_target = [o.replace("model.max_position_embeddings=128", "model.max_position_embeddings=2048")
                  for o in pretrain_overrides("", "", "", 8)[3:] if not o.startswith("train.progress")]
    monkeypatch.setattr(zoo_build, "PRETRAIN_OVERRIDES", toy_target)
    monkeypatch.setattr(zoo_build, "REGEN_PROMPTS", 6)
    monkeypatch.setattr(zoo_build, "REGEN_MAX_NEW_TOKENS", 8)
    monkeypatch.setattr(zoo_build, "CALIBRATION_PROMPTS", 20)
    monkeypatch.setattr(zoo_build, "CALIBRATION_MAX_NEW_TOKENS", 16)
    monkeypatch.setattr(zoo_build, "DRAFTER_OVERRIDES", [
        "model.draft_layers=1", "model.block_size=3", "model.target_layer_ids=[0,1]", "data.max_length=1024",
        "data.num_anchors=4", "optim.lr=1e-3", "train.batch_size=2", "train.epochs=1", "train.max_steps=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.chunk_blocks=4",
    ])
    monkeypatch.setattr(zoo_build, "DRAFTER_KIND_OVERRIDES", {
        "dspark": ["model.markov_rank=4"], "mtp": ["model.block_size=1", "model.target_layer_ids=null"]})
    monkeypatch.setattr(zoo_build, "GROWN_DRAFT_LAYERS", 2)
    monkeypatch.setattr(zoo_build, "GROW_OVERRIDES", ["train.max_steps=2"])

    summary = zoo_build.rebuild(work, out, drafters=("dspark", "mtp"), progress=False)
    cache = json.loads((work / "features" / "manifest.json").read_text())
    assert cache["complete"] and cache["target_layer_ids"] == [0, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == summary["manifest"]
    assert "data.train=FEATURES" in manifest["drafters"]["dspark"]["recipe"]
    assert "data.train=DATA" in manifest["drafters"]["mtp"]["recipe"]
    assert "model.draft_layers=2" in manifest["drafters"]["dspark"]["grown"] and "grown" not in manifest["drafters"]["mtp"]
    assert list(manifest["calibration"]) == ["dspark"] and manifest["calibration"]["dspark"]["block_size"] == 3
    assert [r["sampling_temperature"] for r in manifest["calibration"]["dspark"]["regimes"]] == [0.0, 1.0]
    assert json.loads((out / "drafters" / "dspark" / "calibration.json").read_text()) == manifest["calibration"]["dspark"]
    target = TargetRunner.from_pretrained(out / "target", dtype="float32")
    for name, block in (("dspark", 3), ("mtp", 1)):
        drafter = load_drafter(str(out / "drafters" / name))
        drafter.check_target(target.config)
        assert drafter.block_size == block
    grown = load_drafter(str(out / "drafters" / "dspark")).model
    assert len(grown.layers) == 2 and grown.greedy_confidence_head is not None  # the grown run was installed
    assert regimes_for(load_drafter(str(out / "drafters" / "dspark"))) is not None  # "auto" finds its calibration
    stamp = (work / "features" / "manifest.json").stat().st_mtime_ns
    zoo_build.rebuild(work, out, drafters=("dspark", "mtp"), progress=False)
    assert (work / "features" / "manifest.json").stat().st_mtime_ns == stamp
