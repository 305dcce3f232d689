"""Every model input path validated: corrupt weights, ill-typed or out-of-range config fields, a tensor index
that contradicts its config, broken drafter config.json files, broken chat templates, prompts that are not
UTF-8, and misused --drafter / --calibration values. Each is refused with one line naming the culprit (exit
status 2 from the CLI), never a traceback or a silently wrong result."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.calibration.calibration_file import load_calibration, regimes_for
from dspark.cli import main
from dspark.errors import CheckpointError, ConfigError, RequestError
from dspark.models import checkpoint
from dspark.models.drafters import load_drafter
from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.data.chat import render_prompt
from dspark.models.tokenizer import load_tokenizer

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("hardening") / "target", "tiny-qwen3", seed=5)


@pytest.fixture
def target_dir(pristine, tmp_path) -> Path:
    """A fresh, writable copy of the valid target folder (with tokenizer)."""
    return Path(shutil.copytree(pristine, tmp_path / "target"))


@pytest.fixture(scope="module")
def drafters(pristine, tmp_path_factory) -> dict[str, Path]:
    """Valid DSpark (with confidence head) and DFlash drafter folders for `pristine`."""
    target = TargetRunner.from_pretrained(pristine, device="cpu", dtype="float32")
    root = tmp_path_factory.mktemp("drafters")
    variants = {"dspark": dict(markov_rank=8), "dflash": dict(markov_rank=0, enable_confidence_head=False,
                                                              confidence_head_with_markov=False)}
    folders = {}
    for name, extra in variants.items():
        config = dspark_config_for_target(target.hf_config, target_layer_ids=(0, 2), mask_token_id=319,
                                          num_draft_layers=1, block_size=3, num_anchors=8, **extra)
        folders[name] = init_from_target(config, target.model, seed=1).save_pretrained(root / name)
    return folders


@pytest.fixture
def drafter_dir(drafters, tmp_path) -> Path:
    return Path(shutil.copytree(drafters["dspark"], tmp_path / "drafter"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def poison(folder: Path, name: str, value: float) -> None:
    state = load_file(str(folder / WEIGHTS))
    state[name].view(-1)[3] = value
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and no traceback; return the last stderr line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def generate_args(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu", *extra]


# -- 1. non-finite weights ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_target_weight_is_refused(target_dir, capsys, value):
    victim = "model.layers.2.mlp.up_proj.weight"
    poison(target_dir, victim, value)
    line = cli_error(capsys, generate_args(target_dir, "--drafter", "none"))
    assert victim in line and str(target_dir / WEIGHTS) in line and "non-finite" in line


def test_the_chunked_finite_check_finds_a_bad_value_in_any_chunk():
    """`all_finite` checks a weight a chunk at a time (a bounded temporary on the device): a NaN or inf in the
    first, a middle or the last, partial chunk is found."""
    for position in (0, 5, 9):
        for value in (float("nan"), float("inf"), float("-inf")):
            weights = torch.zeros(2, 5)
            weights.view(-1)[position] = value
            assert not checkpoint.all_finite(weights, chunk=3)
    assert checkpoint.all_finite(torch.ones(2, 5), chunk=3) and checkpoint.all_finite(torch.ones(0), chunk=3)


def test_weight_check_can_be_skipped(target_dir, monkeypatch):
    poison(target_dir, "model.norm.weight", float("nan"))
    monkeypatch.setenv("DSPARK_SKIP_WEIGHT_CHECK", "1")
    runner = TargetRunner.from_pretrained(target_dir, device="cpu", dtype="float32")
    assert torch.isnan(runner.model.model.norm.weight).any()


def test_non_finite_drafter_weight_is_refused(pristine, drafter_dir, capsys):
    poison(drafter_dir, "fc.weight", float("nan"))
    line = cli_error(capsys, generate_args(pristine, "--drafter", str(drafter_dir)))
    assert "'fc.weight'" in line and str(drafter_dir / WEIGHTS) in line


def test_weight_that_overflows_the_load_dtype_is_refused(target_dir):
    poison(target_dir, "model.layers.0.mlp.down_proj.weight", 1e10)
    assert TargetRunner.from_pretrained(target_dir, device="cpu", dtype="float32")  # finite in float32
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*overflows float16"):
        TargetRunner.from_pretrained(target_dir, device="cpu", dtype="float16")


# -- 2. numeric ranges and JSON types of config fields ---------------------------------------------
@pytest.mark.parametrize(
    "changes, culprit",
    [
        (dict(rope_theta=-1), "rope_theta"),
        (dict(rope_theta="big"), "rope_theta"),
        (dict(rope_theta=float("nan")), "rope_theta"),
        (dict(rms_norm_eps=-1), "rms_norm_eps"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(tie_word_embeddings="no"), "tie_word_embeddings"),
        (dict(attention_bias="false"), "attention_bias"),
        (dict(architectures=5), "architectures"),
        (dict(architectures=[[1]]), "architectures"),
        (dict(model_type=["qwen3"]), "model_type"),
        (dict(num_key_value_heads=True), "num_key_value_heads"),
        (dict(head_dim=True), "head_dim"),
        (dict(eos_token_id="2"), "eos_token_id"),
        (dict(eos_token_id=[2, None]), "eos_token_id"),
        (dict(bos_token_id=1.5), "bos_token_id"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}), r"rope_parameters\.factor"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": "2"}), r"rope_parameters\.factor"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                               "high_freq_factor": 4.0}), "high_freq_factor"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
         r"rope_scaling\.original_max_position_embeddings"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "truncate": "yes"}), r"rope_scaling\.truncate"),
    ],
)
def test_bad_config_field_is_named(target_dir, capsys, changes, culprit):
    edit_json(target_dir / "config.json", **changes)
    line = cli_error(capsys, generate_args(target_dir, "--drafter", "none"))
    assert "config.json" in line
    assert re.search(culprit, line), line


# -- 3. tensor index checked against the config before any module is built --------------------------
@pytest.mark.parametrize("changes, culprit", [
    (dict(num_hidden_layers=10**9), r"model\.layers\.4\..*999999991 more layers"),
    (dict(head_dim=2**30), r"model\.layers\.0\.self_attn\.q_proj\.weight.*shape"),
])
def test_impossible_config_is_refused_before_building(target_dir, capsys, changes, culprit):
    edit_json(target_dir / "config.json", **changes)
    start = time.perf_counter()
    line = cli_error(capsys, generate_args(target_dir, "--drafter", "none"))
    assert time.perf_counter() - start < 2.0  # hang guard: it used to build 10⁹ layers
    assert re.search(culprit, line), line


def test_huge_drafter_layer_count_is_refused_before_building(drafter_dir):
    edit_json(drafter_dir / "config.json", num_hidden_layers=10**9)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.1\.\*.*num_hidden_layers=1000000000"):
        load_drafter(str(drafter_dir), device="cpu")
    assert time.perf_counter() - start < 2.0


def test_index_is_checked_before_any_tensor_data_is_read(target_dir, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data read before the index was checked")

    monkeypatch.setattr(checkpoint, "iter_tensors", no_reading)
    state = load_file(str(target_dir / WEIGHTS))
    state["model.layers.3.mlp.down_proj.weight"] = state["model.layers.3.mlp.down_proj.weight"][:, :-1].clone()
    save_file(state, str(target_dir / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.down_proj\.weight.*shape"):
        TargetRunner.from_pretrained(target_dir, device="cpu")


def test_tensor_in_two_shards_is_refused(target_dir):
    state = load_file(str(target_dir / WEIGHTS))
    save_file({"model.norm.weight": state["model.norm.weight"]}, str(target_dir / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        TargetRunner.from_pretrained(target_dir, device="cpu")


# -- 4. drafter (and target) config.json that is not a well-typed JSON object ----------------------
@pytest.mark.parametrize("content, culprit", [
    (b"[1, 2, 3]", "top level"),
    (b'{"architectures": 5}', "architectures"),
    (b'{"architectures": [["Qwen3DSparkModel"]]}', "architectures"),
    (b'{"architectures": ["Qwen3DSparkModel"], "model_type": "\xff\xfe"}', "JSON"),
])
def test_broken_drafter_config_json_is_named(pristine, drafter_dir, capsys, content, culprit):
    (drafter_dir / "config.json").write_bytes(content)
    line = cli_error(capsys, generate_args(pristine, "--drafter", str(drafter_dir)))
    assert str(drafter_dir / "config.json") in line and culprit in line


def test_non_utf8_target_config_is_named(target_dir, capsys):
    (target_dir / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}')
    line = cli_error(capsys, generate_args(target_dir, "--drafter", "none"))
    assert str(target_dir / "config.json") in line and "JSON" in line


@pytest.mark.parametrize("changes, culprit", [
    (dict(enable_confidence_head="yes"), "enable_confidence_head"),
    (dict(confidence_head_with_markov=1), "confidence_head_with_markov"),
    (dict(markov_rank="8"), "markov_rank"),
    (dict(num_anchors="x"), "num_anchors"),
    (dict(markov_head_type=["vanilla"]), "markov_head_type"),
    (dict(block_size=True), "block_size"),
    (dict(mask_token_id=False), "mask_token_id"),
    (dict(target_layer_ids=[0, True]), "target_layer_ids"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
])
def test_bad_drafter_config_field_is_named(drafter_dir, changes, culprit):
    edit_json(drafter_dir / "config.json", **changes)
    with pytest.raises(CheckpointError, match=culprit) as info:
        load_drafter(str(drafter_dir), device="cpu")
    assert str(drafter_dir / "config.json") in str(info.value)


# -- 5. tokenizer: chat template, prompt text -------------------------------------------------------
def test_broken_chat_template_is_named(target_dir, capsys):
    (target_dir / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(target_dir / "tokenizer_config.json", chat_template="{% if %}")
    line = cli_error(capsys, generate_args(target_dir, "--drafter", "none", "--chat"))
    assert str(target_dir) in line and "chat template" in line


def test_prompt_that_is_not_utf8_is_refused(pristine, capsys):
    bad = b"ab\xff".decode("utf-8", "surrogateescape")  # how argv delivers bytes that are not UTF-8
    argv = generate_args(pristine, "--drafter", "none")
    argv[argv.index("hi")] = bad
    line = cli_error(capsys, argv)
    assert "prompt" in line and "UTF-8" in line
    tokenizer = load_tokenizer(pristine)
    with pytest.raises(RequestError, match="prompt 3.*UTF-8"):
        render_prompt(tokenizer, bad, chat=True, what="prompt 3")


def test_unloadable_tokenizer_error_is_one_line(target_dir):
    (target_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer") as info:
        load_tokenizer(target_dir)
    assert "\n" not in str(info.value) and str(target_dir) in str(info.value)


# -- 6. --drafter and --calibration values, calibration file types --------------------------------
def test_unknown_drafter_lists_every_builtin_name(pristine, capsys):
    line = cli_error(capsys, generate_args(pristine, "--drafter", "no-such-thing"))
    assert "no-such-thing" in line
    for name in ("dspark", "dspark-rnn", "dflash", "eagle3", "mtp", "ngram", "none"):
        assert name in line


def test_calibration_file_for_a_drafter_without_confidence_head_is_refused(pristine, drafters, capsys, tmp_path):
    calibration = str(tmp_path / "calibration.json")
    line = cli_error(capsys, generate_args(pristine, "--drafter", "ngram", "--calibration", calibration))
    assert "--calibration" in line and "confidence head" in line
    dflash = load_drafter(str(drafters["dflash"]), device="cpu")
    with pytest.raises(ConfigError, match="confidence head"):
        regimes_for(dflash, calibration)
    for value in ("auto", "none", None):
        assert regimes_for(dflash, value) is None


def test_auto_calibration_is_the_drafter_folders_own_file_for_exactly_its_weights(drafter_dir, tmp_path):
    """"auto" applies DRAFTER/calibration.json when it was fitted for those weights; one left behind by other
    weights (a retrained drafter) is ignored rather than misapplied; "none" ignores even a matching one."""
    from dspark.calibration.calibration_file import save_calibration

    assert regimes_for(load_drafter(str(drafter_dir), device="cpu"), "auto") is None  # no file: the raw head
    save_calibration(drafter_dir / "calibration.json", [2.0, 1.0, 0.5], drafter_folder=drafter_dir)
    drafter = load_drafter(str(drafter_dir), device="cpu")
    regimes = regimes_for(drafter, "auto")
    assert list(regimes) == [1.0] and regimes[1.0].temperatures.tolist() == [2.0, 1.0, 0.5]
    assert regimes_for(drafter, "none") is None
    poison(drafter_dir, "fc.weight", 0.5)  # other weights, same file
    assert regimes_for(load_drafter(str(drafter_dir), device="cpu"), "auto") is None


@pytest.mark.parametrize("field, value", [("temperatures", ["1.0", 1.0]), ("temperatures", [True, 1.0]),
                                          ("biases", ["0", 0.0])])
def test_calibration_numbers_must_be_json_numbers(tmp_path, field, value):
    regime = {"sampling_temperature": 1.0, "temperatures": [1.0, 1.0], field: value}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": "dspark-calibration-v2", "block_size": 2, "regimes": [regime],
                                "drafter": {"name": "d", "config_sha256": "a", "weights_sha256": "b"}}))
    with pytest.raises(CheckpointError, match=field):
        load_calibration(path)
