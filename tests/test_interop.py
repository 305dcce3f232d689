"""Serving a dspark drafter in vLLM (`method: dspark`) and SGLang (`--speculative-algorithm DSPARK`), tested
without either engine (neither is installed here): the contract they rely on. A drafter written by `dspark train`
has the released checkpoint layout (docs/design.md §7) — the tensor list is test_dspark_drafter.py's
`spec_tensor_shapes`, written from that section alone, the one list of it in the code — and the side files SGLang
reads come out of `dspark profile --sglang-out` and `dspark calibrate --sglang-out` exactly as `dspark export
sglang` writes them; SGLang's STS file comes back in through `dspark calibrate --from-sglang`, bound to a drafter,
and calibrates exactly as the calibration it came from. docs/serving.md "Multi-GPU production"."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark.calibration.calibration_file import load_calibration, regimes_for
from dspark.cli import main
from dspark.decoding.sampling import SamplingParams
from dspark.errors import CheckpointError
from dspark.models.drafters import load_drafter
from dspark.models.drafters.dspark_config import DRAFT_FIELDS
from dspark.models.random_init import build_random_model
from dspark.scheduling.controller import SpeculationController
from dspark.scheduling.sps import SPSProfile
from dspark.serving.sglang import sps_table, sts_file

from drafters_for_tests import save_dspark_folder
from test_dspark_drafter import spec_tensor_shapes

DSPARK_OWN_FIELDS = ("enable_greedy_confidence_head",)  # not in released checkpoints; absent unless that output is trained
RELEASED_DRAFT_FIELDS = tuple(f for f in DRAFT_FIELDS if f not in DSPARK_OWN_FIELDS)
SET_BY_THE_DRAFTER = ("architectures", "num_hidden_layers", "tie_word_embeddings")  # the target's, replaced


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny target with a tokenizer, a block-4 DSpark drafter for it, a block-3 one, and a prompt file."""
    root = tmp_path_factory.mktemp("interop")
    target = build_random_model(root / "target", "tiny-qwen3", seed=3, init_std=0.08)
    drafter = save_dspark_folder(target, root / "drafter", seed=1, block_size=4, target_layer_ids=(0, 2), markov_rank=16)
    block3 = save_dspark_folder(target, root / "block3", seed=2, block_size=3, target_layer_ids=(0, 2), markov_rank=16)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"item {i}: " + "ab" * (i % 5 + 1)]}) + "\n" for i in range(24)))
    return target, drafter, block3, prompts


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))  # profiles are cached here, not in ~/.cache
    return tmp_path / "home"


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------
# The checkpoint: what vLLM's and SGLang's DSpark loaders read
# ------------------------------------------------------------------------------------------------

def test_a_drafter_trained_by_dspark_train_has_the_released_layout(trainer_target, tmp_path, capsys):
    """`dspark train` (the dspark preset, bfloat16) writes a folder with config.json and model.safetensors only:
    the target's config with the §7 draft fields set and nothing else changed, exactly the §7 tensors in
    bfloat16 as released, and none of dspark's own greedy confidence output (which SGLang's loader has no
    place for)."""
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input_ids": torch.randint(0, 39, (20,), generator=gen).tolist(),
                                        "loss_mask": [0] * 6 + [1] * 14}) + "\n" for _ in range(4)))
    config = tmp_path / "train.yaml"
    config.write_text(
        "preset: dspark\n"
        f"model:\n  target: {trainer_target}\n  draft_layers: 1\n  block_size: 4\n  markov_rank: 8\n"
        "  target_layer_ids: [0, 2]\n"
        f"data:\n  train: {data}\n  num_anchors: 6\n"
        "train:\n  batch_size: 2\n  micro_batch_size: 1\n  max_steps: 1\n  checkpoint_every: 1\n  progress: false\n"
        "  device: cpu\n  dtype: bfloat16\n")
    code, out, err = run(capsys, ["train", "--config", str(config), f"train.output_dir={tmp_path / 'run'}", "--json"])
    assert code == 0, err
    folder = tmp_path / "run" / "step_1" / "drafter"
    assert json.loads(out)["drafter"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    hf = json.loads((folder / "config.json").read_text())
    target_hf = json.loads((trainer_target / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3DSparkModel"] and hf["tie_word_embeddings"] is False
    assert hf["num_hidden_layers"] == 1 and hf["num_target_layers"] == target_hf["num_hidden_layers"]
    assert (hf["block_size"], hf["target_layer_ids"], hf["markov_rank"], hf["markov_head_type"]) == (4, [0, 2], 8, "vanilla")
    assert hf["enable_confidence_head"] is True and hf["confidence_head_with_markov"] is True
    assert 0 <= hf["mask_token_id"] < hf["vocab_size"]
    assert set(RELEASED_DRAFT_FIELDS) <= set(hf) and not set(DSPARK_OWN_FIELDS) & set(hf)
    changed = {k for k in set(hf) | set(target_hf) if hf.get(k) != target_hf.get(k)}
    assert changed <= set(SET_BY_THE_DRAFTER) | set(RELEASED_DRAFT_FIELDS)  # otherwise the target's config, as is

    tensors = load_file(str(folder / "model.safetensors"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == spec_tensor_shapes(hf)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert load_drafter(str(folder)).block_size == 4  # and dspark reads it back through the same loader


# ------------------------------------------------------------------------------------------------
# dspark profile --sglang-out
# ------------------------------------------------------------------------------------------------

SIZES = ["--context", "16", "--requests", "1,2", "--lengths", "1,2,4", "--repeats", "2"]


def test_profile_sglang_out_writes_what_export_writes(models, capsys, tmp_path):
    target, drafter, _, _ = models
    code, out, err = run(capsys, ["profile", "--quiet", "--target", str(target), "--drafter", str(drafter), *SIZES,
                                  "--out", str(tmp_path / "profile.json"), "--sglang-out", str(tmp_path / "sglang"),
                                  "--max-batch-tokens", "96"])
    assert code == 0, err
    written = tmp_path / "sglang" / "sps_table.json"
    assert f"SGLang SPS table: {written}" in out
    table = json.loads(written.read_text())
    profile = SPSProfile.load(tmp_path / "profile.json")
    # the drafter's block size (4, the profile's gamma) reads the grid's tokens as requests by default
    assert table == sps_table(profile, max_batch_tokens=96, block_size=4) != sps_table(profile, max_batch_tokens=96,
                                                                                        block_size=7)
    assert main(["export", "sglang", "--out", str(tmp_path / "export"), "--profile", str(tmp_path / "profile.json"),
                 "--max-batch-tokens", "96"]) == 0
    assert (tmp_path / "export" / "sps_table.json").read_text() == written.read_text()
    code, _, err = run(capsys, ["profile", "--quiet", "--target", str(target), "--drafter", str(drafter), *SIZES,
                                "--sglang-out", str(tmp_path / "sglang"), "--block-size", "2", "--json"])
    assert code == 0, err  # the cached profile, another block size
    assert json.loads(written.read_text()) == sps_table(profile, block_size=2)


@pytest.mark.parametrize("extra, message", [
    (["--sglang-out", "FILE"], "--sglang-out"),
    (["--sglang-out", "FILE/below"], "--sglang-out"),
    (["--sglang-out", "DIR", "--max-batch-tokens", "0"], "--max-batch-tokens must be an integer ≥ 1"),
    (["--sglang-out", "DIR", "--block-size", "-1"], "--block-size must be an integer ≥ 1"),
    (["--block-size", "4"], "give --sglang-out DIR too"),
])
def test_profile_sglang_out_is_checked_before_anything_is_measured(models, capsys, tmp_path, monkeypatch, home,
                                                                   extra, message):
    from dspark.scheduling import profiler

    def measure(*args, **kwargs):
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(profiler, "profile_with_cache", measure)
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / e) if e.startswith(("FILE", "DIR")) else e for e in extra]
    code, out, err = run(capsys, ["profile", "--quiet", "--target", str(models[0]), *SIZES, *extra])
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert not (tmp_path / "DIR").exists() and not home.exists()


# ------------------------------------------------------------------------------------------------
# dspark calibrate --sglang-out, and --from-sglang back
# ------------------------------------------------------------------------------------------------

def calibrated(drafter, calibration, temperature=1.0):
    """The drafter's calibrated confidences [3, γ] on fixed inputs, with `calibration` applied as inference does."""
    raw = load_drafter(str(drafter))
    hidden = torch.randn(3, raw.block_size, raw.model.config.layers.hidden_size, generator=torch.Generator().manual_seed(1))
    sampling = [SamplingParams(temperature=temperature)] * 3
    _, _, logits = raw.sample_block(hidden, torch.tensor([5, 6, 7]), sampling, torch.Generator().manual_seed(0))
    return SpeculationController(regimes=regimes_for(raw, str(calibration))).calibrate(logits, sampling)


def test_calibrate_sts_to_sglang_and_back_calibrates_the_same(models, capsys, tmp_path):
    """calibrate --method sts --sglang-out writes the temperature-1 regime as `dspark export sglang` would;
    --from-sglang reads that file back as a calibration bound to the drafter whose confidences, calibrated,
    equal the original's at sampling temperature 1; the imported file is refused for another drafter."""
    target, drafter, block3, prompts = models
    original, sglang = tmp_path / "calibration.json", tmp_path / "sglang"
    code, out, err = run(capsys, ["calibrate", "--target", str(target), "--drafter", str(drafter), "--datasets", str(prompts),
                                  "--max-new-tokens", "24", "--no-progress", "--out", str(original), "--json",
                                  "--method", "sts", "--sampling-temperatures", "1,0", "--sglang-out", str(sglang)])
    assert code == 0, err
    summary = json.loads(out)
    sts_path = sglang / "confidence_sts.json"
    assert summary["sglang_sts"] == str(sts_path)
    sts = json.loads(sts_path.read_text())
    assert sts == sts_file(load_calibration(original), 1.0)
    assert sts["temperatures"] == load_calibration(original).regime_for(1.0).temperatures != \
        load_calibration(original).regime_for(0.0).temperatures
    assert sts["num_samples"] > 0 and sts["dataset"] == "prompts" and len(sts["ece_after"]) == 4

    imported = tmp_path / "imported.json"
    # SGLang's own file has no "sampling_temperature": the regime's temperature is given (abbreviated flag)
    native = tmp_path / "native_sts.json"
    native.write_text(json.dumps({k: v for k, v in sts.items() if k != "sampling_temperature"}))
    code, out, err = run(capsys, ["calibrate", "--from-sglang", str(native), "--drafter", str(drafter),
                                  "--out", str(imported), "--sampling-temperature", "1", "--method", "sts"])
    assert code == 0, err
    assert f"written {imported}" in out
    loaded = load_calibration(imported, drafter_folder=drafter, block_size=4)
    (regime,) = loaded.regimes
    assert (regime.sampling_temperature, regime.method, regime.temperatures) == (1.0, "sts", sts["temperatures"])
    assert loaded.drafter == load_calibration(original).drafter  # bound to the same weights as the fitted file
    assert sts_file(loaded) == sts  # and exports back to the same SGLang file
    torch.testing.assert_close(calibrated(drafter, imported), calibrated(drafter, original), rtol=1e-6, atol=1e-7)
    with pytest.raises(CheckpointError, match="fitted for drafter"):
        load_calibration(imported, drafter_folder=block3)


def test_calibrate_sglang_out_refuses_another_method_before_any_work(models, capsys, tmp_path):
    target, drafter, _, prompts = models
    base = ["calibrate", "--target", str(target), "--datasets", str(prompts), "--out", str(tmp_path / "cal.json")]
    for extra in (["--drafter", str(tmp_path / "no-such-drafter")], ["--drafter", str(drafter), "--method", "platt"]):
        code, out, err = run(capsys, base + extra + ["--sglang-out", str(tmp_path / "sglang")])
        assert code == 2 and "pass --method sts" in err and "drafter" not in err.split("error:", 1)[1].lower()
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, base + ["--drafter", str(drafter), "--method", "sts", "--sglang-out", str(tmp_path / "file")])
    assert code == 2 and f"--sglang-out {tmp_path / 'file'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, the fit never ran


GOOD = {"temperatures": [1.5, 1.2, 1.0, 0.8], "dataset": "a,b", "num_samples": 100,
        "ece_before": [0.1, 0.08, None, 0.05], "ece_after": None}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    ("[1.5, 1.2]", "is a JSON object"),
    (dict(GOOD, temperature=[1.0]), "unknown key(s) 'temperature'"),
    ({k: v for k, v in GOOD.items() if k != "temperatures"}, "no 'temperatures'"),
    (dict(GOOD, temperatures=[1.5, 0.0, 1.0, 0.8]), "finite numbers > 0"),
    (dict(GOOD, temperatures=[1.5, -1.0, 1.0, 0.8]), "finite numbers > 0"),
    (dict(GOOD, temperatures=[1.5, "1.2", 1.0, 0.8]), "finite numbers > 0"),
    (dict(GOOD, temperatures=[1.5, True, 1.0, 0.8]), "finite numbers > 0"),
    ('{"temperatures": [1.5, NaN, 1.0, 0.8]}', "finite numbers > 0"),
    (dict(GOOD, temperatures=[]), "finite numbers > 0"),
    (dict(GOOD, temperatures=[1.5, 1.2, 1.0], ece_before=None), "3 temperatures, but the drafter's block size is 4"),
    (dict(GOOD, num_samples=-1), "'num_samples'"),
    (dict(GOOD, num_samples=2.5), "'num_samples'"),
    (dict(GOOD, dataset=["a"]), "'dataset'"),
    (dict(GOOD, ece_before=[0.1, 0.2]), "'ece_before'"),
    (dict(GOOD, ece_after=[0.1, -0.2, 0.0, 0.0]), "'ece_after'"),
    (dict(GOOD, sampling_temperature=-1), "'sampling_temperature'"),
])
def test_from_sglang_refuses_a_malformed_file_by_name(models, capsys, tmp_path, content, message):
    path = tmp_path / "sts.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "cal.json"
    code, stdout, err = run(capsys, ["calibrate", "--from-sglang", str(path), "--drafter", str(models[1]), "--out", str(out)])
    assert code == 2 and stdout == "" and message in err and str(path) in err
    assert err.startswith("dspark calibrate: error:") and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--out", "STS"], "is the --from-sglang file itself"),
    (["--traces", "t.json"], "--traces belong to fitting"),
    (["--sglang-out", "DIR"], "--sglang-out belong to fitting"),
    (["--method", "platt"], "not --method platt"),
    (["--sampling-temperatures", "1,0"], "one sampling temperature"),
    (["--drafter", None], "give --drafter DIR"),
])
def test_from_sglang_refuses_options_of_a_fit(models, capsys, tmp_path, extra, message):
    path = tmp_path / "sts.json"
    path.write_text(json.dumps(GOOD))
    argv = ["calibrate", "--from-sglang", str(path), "--out", str(tmp_path / "cal.json")]
    if extra != ["--drafter", None]:
        argv += ["--drafter", str(models[1]), *[str(path) if e == "STS" else e for e in extra]]
    code, _, err = run(capsys, argv)
    assert code == 2 and message in err and not (tmp_path / "cal.json").exists()
    assert json.loads(path.read_text()) == GOOD  # never overwritten
