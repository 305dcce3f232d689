"""Bad input for model loading (each failure names its culprit), sharded checkpoints, and the typed
configuration helpers of `dspark.config`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.config import apply_overrides, from_dict, load_yaml, to_dict
from dspark.errors import CheckpointError, ConfigError, DSparkError, UnsupportedModelError
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

WEIGHTS = "model.safetensors"
PROBE = [5, 17, 300, 2, 99, 41, 7]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("ckpt") / "m", "tiny-qwen3", with_tokenizer=False)


@pytest.fixture
def model_dir(pristine, tmp_path) -> Path:
    """A fresh, writable copy of the valid model folder."""
    return Path(shutil.copytree(pristine, tmp_path / "m"))


def load(folder: Path) -> TargetRunner:
    return TargetRunner.from_pretrained(folder, dtype="float32")


def probe_logits(folder: Path) -> torch.Tensor:
    runner = load(folder)
    return runner.forward([runner.new_sequence()], [PROBE]).logits


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DELETE = object()


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / WEIGHTS
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_valid_folder_loads(model_dir):
    runner = load(model_dir)
    assert runner.config.family == "qwen3" and runner.config.num_layers == 4
    assert runner.config.tie_word_embeddings
    logits = runner.forward([runner.new_sequence()], [PROBE]).logits
    assert logits.shape == (len(PROBE), 320) and torch.isfinite(logits).all()


# -- folder and config.json -----------------------------------------------------------------------
def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no-such-model") as info:
        load(missing)
    assert "not found" in str(info.value)


def test_path_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load(path)


def test_folder_without_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load(model_dir)


@pytest.mark.parametrize("text", ['{"hidden_size": 128,', "not json at all", "\xff\xfe garbage"])
def test_malformed_config(model_dir, text):
    (model_dir / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="config.json") as info:
        load(model_dir)
    assert "JSON" in str(info.value)


def test_config_top_level_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="config.json"):
        load(model_dir)


def test_unsupported_architecture(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        load(model_dir)
    assert isinstance(info.value, CheckpointError)  # callers catching CheckpointError see it too
    assert "Qwen3ForCausalLM" in str(info.value)  # lists what is supported


def test_model_type_alone_selects_family(model_dir):
    edit_config(model_dir, architectures=_DELETE)
    assert load(model_dir).config.family == "qwen3"


@pytest.mark.parametrize(
    "key", ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers",
            "max_position_embeddings"],
)
def test_missing_required_field(model_dir, key):
    edit_config(model_dir, **{key: _DELETE})
    with pytest.raises(CheckpointError, match=f"'{key}'") as info:
        load(model_dir)
    assert "missing" in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("value", ["128", 12.5, True, -128, 0])
def test_ill_typed_required_field(model_dir, value):
    edit_config(model_dir, hidden_size=value)
    with pytest.raises(CheckpointError, match="hidden_size"):
        load(model_dir)


def test_kv_heads_must_divide_heads(model_dir):
    edit_config(model_dir, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        load(model_dir)


def test_odd_head_dim(model_dir):
    edit_config(model_dir, head_dim=31)
    with pytest.raises(CheckpointError, match="head_dim"):
        load(model_dir)


@pytest.mark.parametrize(
    "changes,culprit",
    [
        (dict(hidden_act="gelu"), "gelu"),
        (dict(use_sliding_window=True, sliding_window=64), "sliding"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "dynamic"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
    ],
)
def test_unsupported_features(model_dir, changes, culprit):
    edit_config(model_dir, **changes)
    with pytest.raises(UnsupportedModelError, match=culprit):
        load(model_dir)


def test_rope_scaling_missing_parameter(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                            "low_freq_factor": 1.0})
    with pytest.raises(CheckpointError, match="high_freq_factor"):
        load(model_dir)


# -- weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,tensor",
    [
        (dict(intermediate_size=256), r"model\.layers\.\d+\.mlp\.(down|gate|up)_proj\.weight"),
        (dict(vocab_size=300), r"model\.embed_tokens\.weight"),
        (dict(hidden_size=96), r"model\.(embed_tokens|layers\.\d+\.[a-z_.]+)\.weight"),
        (dict(num_key_value_heads=4), r"model\.layers\.\d+\.self_attn\.[kv]_proj\.weight"),
    ],
)
def test_weight_shape_mismatch(model_dir, changes, tensor):
    edit_config(model_dir, **changes)
    with pytest.raises(CheckpointError, match=tensor) as info:
        load(model_dir)
    message = str(info.value)
    assert WEIGHTS in message and "shape" in message


def test_more_layers_in_config_than_in_file(model_dir):
    edit_config(model_dir, num_hidden_layers=5)
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.") as info:
        load(model_dir)
    assert "missing" in str(info.value)


def test_fewer_layers_in_config_than_in_file(model_dir):
    edit_config(model_dir, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.3\."):
        load(model_dir)


@pytest.mark.parametrize(
    "corrupt",
    ["truncate", "garbage", "empty", "bad-header"],
)
def test_corrupt_safetensors(model_dir, corrupt):
    path = model_dir / WEIGHTS
    data = path.read_bytes()
    if corrupt == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif corrupt == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif corrupt == "empty":
        path.write_bytes(b"")
    else:  # valid length prefix, broken JSON header
        header_len = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len:])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load(model_dir)


def test_missing_tensor(model_dir):
    victim = "model.layers.2.self_attn.q_norm.weight"
    rewrite_weights(model_dir, lambda state: state.pop(victim))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")) as info:
        load(model_dir)
    assert "missing" in str(info.value)


def test_many_missing_tensors_are_summarised(model_dir):
    rewrite_weights(model_dir, lambda state: [state.pop(k) for k in list(state) if k.startswith("model.layers.1.")])
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.") as info:
        load(model_dir)
    assert "more" in str(info.value)  # 11 missing: five named, the rest counted


def test_untied_config_needs_lm_head(model_dir):
    edit_config(model_dir, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load(model_dir)


def test_unexpected_extra_tensor(model_dir):
    extra = "model.layers.0.mlp.extra_proj.weight"
    rewrite_weights(model_dir, lambda state: state.update({extra: torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")) as info:
        load(model_dir)
    assert "unexpected" in str(info.value) and WEIGHTS in str(info.value)


def test_ignored_and_optional_extra_tensors(model_dir, pristine):
    """`rotary_emb.inv_freq` (recomputed) is skipped; a tied model may still ship `lm_head.weight`."""
    reference = probe_logits(pristine)

    def add(state):
        state["model.rotary_emb.inv_freq"] = torch.ones(16)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()

    rewrite_weights(model_dir, add)
    assert torch.equal(probe_logits(model_dir), reference)


def test_integer_tensor_where_float_expected(model_dir):
    victim = "model.norm.weight"
    rewrite_weights(model_dir, lambda state: state.update({victim: torch.ones(128, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load(model_dir)


def test_half_precision_file_loads_as_float32(model_dir, pristine):
    rewrite_weights(model_dir, lambda state: state.update({k: v.to(torch.bfloat16) for k, v in state.items()}))
    runner = load(model_dir)
    assert runner.dtype == torch.float32
    ours = runner.forward([runner.new_sequence()], [PROBE]).logits
    reference = probe_logits(pristine)
    assert not torch.equal(ours, reference)  # the bf16 rounding did happen...
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()  # ...and nothing else


def test_unknown_dtype_is_rejected(model_dir):
    with pytest.raises(ConfigError, match="float8"):
        TargetRunner.from_pretrained(model_dir, dtype="float8")


def test_pickle_checkpoint_is_never_loaded(model_dir):
    state = load_file(str(model_dir / WEIGHTS))
    (model_dir / WEIGHTS).unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load(model_dir)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_folder_without_any_weights(model_dir):
    (model_dir / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="safetensors") as info:
        load(model_dir)
    assert str(model_dir) in str(info.value)


# -- sharded checkpoints --------------------------------------------------------------------------
def shard(folder: Path, num_shards: int = 3, with_index: bool = True) -> dict[str, str]:
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::num_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if with_index:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint_equals_single_file(model_dir, pristine, with_index):
    shard(model_dir, with_index=with_index)
    assert not (model_dir / WEIGHTS).exists()
    assert len(list(model_dir.glob("*.safetensors"))) == 3
    assert torch.equal(probe_logits(model_dir), probe_logits(pristine))


def test_index_is_authoritative_over_stray_files(model_dir, pristine):
    shard(model_dir)
    # A leftover file with junk tensors is not listed in the index, so it is never read.
    save_file({"junk": torch.zeros(3)}, str(model_dir / "stale.safetensors"))
    assert torch.equal(probe_logits(model_dir), probe_logits(pristine))


def test_index_listing_a_missing_shard(model_dir):
    weight_map = shard(model_dir)
    missing = sorted(set(weight_map.values()))[1]
    (model_dir / missing).unlink()
    with pytest.raises(CheckpointError, match=missing) as info:
        load(model_dir)
    assert "model.safetensors.index.json" in str(info.value)


@pytest.mark.parametrize(
    "index_text",
    [b"{not json", b"[]", b'{"metadata": {}}', b'{"weight_map": 5}', b'{"weight_map": ["a.safetensors"]}',
     b'{"weight_map": {"model.norm.weight": null}}', b'{"weight_map": {"\xff": 1}}', b"\xff\xfe\x00"],
)
def test_malformed_index(model_dir, index_text):
    shard(model_dir)
    (model_dir / "model.safetensors.index.json").write_bytes(index_text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load(model_dir)


def test_corrupt_shard_is_named(model_dir):
    weight_map = shard(model_dir)
    victim = sorted(set(weight_map.values()))[2]
    path = model_dir / victim
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=victim):
        load(model_dir)


def test_shape_error_names_the_shard(model_dir):
    weight_map = shard(model_dir)
    victim = "model.layers.1.mlp.up_proj.weight"
    path = model_dir / weight_map[victim]
    state = load_file(str(path))
    state[victim] = state[victim][:-1]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")) as info:
        load(model_dir)
    assert weight_map[victim] in str(info.value)


# -- dspark.config --------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    mode: Literal["greedy", "sample"] = "sample"


@dataclass
class Run:
    name: str
    steps: int = 10
    verbose: bool = False
    layers: tuple[int, ...] = ()
    tags: list[str] = field(default_factory=list)
    output: Path | None = None
    extra: dict[str, int] = field(default_factory=dict)
    sampling: Sampling = field(default_factory=Sampling)


def test_from_dict_builds_nested_dataclasses():
    run = from_dict(Run, {
        "name": "x", "steps": 3, "verbose": True, "layers": [1, 2, 3], "tags": ["a"], "output": "out/dir",
        "extra": {"k": 1}, "sampling": {"temperature": 0, "top_k": 5, "mode": "greedy"},
    })
    assert run == Run(name="x", steps=3, verbose=True, layers=(1, 2, 3), tags=["a"], output=Path("out/dir"),
                      extra={"k": 1}, sampling=Sampling(temperature=0.0, top_k=5, mode="greedy"))
    assert isinstance(run.layers, tuple) and isinstance(run.output, Path)
    assert isinstance(run.sampling.temperature, float)  # int accepted for a float field, stored as float
    defaults = from_dict(Run, {"name": "y"})
    assert defaults.sampling == Sampling() and defaults.output is None
    assert from_dict(Run, {"name": "z", "output": None, "sampling": {"top_k": None}}).sampling.top_k is None


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="stpes") as info:
        from_dict(Run, {"name": "x", "stpes": 3})
    assert "steps" in str(info.value)  # the valid keys are listed
    with pytest.raises(ConfigError, match="sampling") as info:
        from_dict(Run, {"name": "x", "sampling": {"temprature": 0.5}})
    assert "temprature" in str(info.value)


@pytest.mark.parametrize(
    "data,culprit",
    [
        ({"name": "x", "steps": "3"}, "steps"),
        ({"name": "x", "steps": 2.5}, "steps"),
        ({"name": "x", "steps": True}, "steps"),  # bool is not an int here
        ({"name": "x", "verbose": "yes"}, "verbose"),
        ({"name": 5}, "name"),
        ({"name": "x", "layers": 3}, "layers"),
        ({"name": "x", "layers": [1, "two"]}, r"layers\[1\]"),
        ({"name": "x", "output": 5}, "output"),
        ({"name": "x", "extra": [1]}, "extra"),
        ({"name": "x", "sampling": {"temperature": "hot"}}, r"sampling\.temperature"),
        ({"name": "x", "sampling": {"top_k": 1.5}}, r"sampling\.top_k"),
        ({"name": "x", "sampling": {"mode": "beam"}}, r"sampling\.mode"),
        ({"name": "x", "sampling": 0.5}, "sampling"),
    ],
)
def test_from_dict_rejects_wrong_types(data, culprit):
    with pytest.raises(ConfigError, match=culprit):
        from_dict(Run, data)


def test_from_dict_missing_required_field_and_non_mapping():
    with pytest.raises(ConfigError, match="name"):
        from_dict(Run, {"steps": 1})
    with pytest.raises(ConfigError, match="Run"):
        from_dict(Run, ["name", "x"])
    assert issubclass(ConfigError, DSparkError)


def test_apply_overrides():
    data = {"name": "x", "sampling": {"temperature": 1.0}}
    result = apply_overrides(data, [
        "sampling.temperature=0.25", "sampling.top_k=8", "layers=[1, 2]", "verbose=true", "output=/tmp/o",
        "name=with=equals",
    ])
    assert result is data
    assert data == {
        "name": "with=equals", "sampling": {"temperature": 0.25, "top_k": 8}, "layers": [1, 2],
        "verbose": True, "output": "/tmp/o",
    }
    run = from_dict(Run, data)
    assert run.sampling == Sampling(temperature=0.25, top_k=8) and run.layers == (1, 2) and run.verbose
    # A section that does not exist yet is created.
    assert apply_overrides({}, ["sampling.mode=greedy"]) == {"sampling": {"mode": "greedy"}}
    # An override cannot sneak an unknown key past from_dict.
    with pytest.raises(ConfigError, match="top_p"):
        from_dict(Run, apply_overrides({"name": "x"}, ["sampling.top_p=0.9"]))


@pytest.mark.parametrize("override,culprit", [("sampling.temperature", "sampling.temperature"),
                                              ("name.inner=3", "name"),
                                              ("steps=[1, 2", "steps")])
def test_apply_overrides_errors(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        apply_overrides({"name": "x"}, [override])


def test_load_yaml_and_to_dict(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nsampling:\n  temperature: 0.5\noutput: out\n")
    run = from_dict(Run, load_yaml(path))
    assert run.sampling.temperature == 0.5
    plain = to_dict(run)
    assert plain["output"] == "out" and plain["layers"] == [] and plain["sampling"]["mode"] == "sample"
    assert from_dict(Run, {**plain, "layers": tuple(plain["layers"])}) == run
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_yaml(tmp_path / "list.yaml")


def test_saved_model_folder_follows_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = build_random_model(tmp_path / "perm", "tiny-qwen3", with_tokenizer=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
