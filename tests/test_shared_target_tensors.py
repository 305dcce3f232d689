"""Drafter folders without the target's embedding and LM head (dspark/models/drafters/common.py, issue 17
item 5): saved with `with_target_tensors=False` (`train.save_target_tensors: false`), bound to the target's
own tensors at load, drafting exactly what the released layout (which carries copies) drafts; the released
layout still loads and saves as before, and a folder of the other kind is refused with its reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.errors import CheckpointError
from dspark.models.drafters import load_drafter
from dspark.models.drafters.common import SHARES_TARGET_FIELD, TARGET_TENSORS
from dspark.models.drafters.eagle3 import eagle3_config_for_target, init_eagle3_from_target
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import save_dspark_folder

MODEL = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("shared") / "target", "tiny-qwen3", seed=2, init_std=0.3,
                              with_tokenizer=False, **MODEL)


@pytest.fixture(scope="module")
def runner(target_dir):
    return TargetRunner.from_pretrained(target_dir, dtype="float32")


def released_folder(kind: str, target_dir, runner, out):
    if kind == "dspark":
        return save_dspark_folder(target_dir, out, block_size=4, target_layer_ids=(0, 2))
    config = eagle3_config_for_target(runner.hf_config, target_layer_ids=(0, 1, 2), block_size=4)
    return init_eagle3_from_target(config, runner.model, seed=3, std=0.3).save_pretrained(out)


def greedy_tokens(runner, drafter) -> list[list[int]]:
    prompts = [[1, 5, 9, 2, 7], [3, 3, 8]]
    out = generate(runner, prompts, sampling=SamplingParams(temperature=0.0), max_new_tokens=24, drafter=drafter)
    return [s.token_ids for s in out.sequences]


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_a_drafter_saved_without_the_target_tensors_binds_them_and_drafts_the_same(kind, target_dir, runner, tmp_path):
    released = released_folder(kind, target_dir, runner, tmp_path / "released")
    model = load_drafter(str(released), device="cpu", dtype="float32").model
    shared = model.save_pretrained(tmp_path / "shared", with_target_tensors=False)
    stored = load_file(str(shared / "model.safetensors"))
    assert not set(TARGET_TENSORS) & set(stored)
    assert json.loads((shared / "config.json").read_text())[SHARES_TARGET_FIELD] is True
    assert SHARES_TARGET_FIELD not in json.loads((released / "config.json").read_text())
    assert (shared / "model.safetensors").stat().st_size < (released / "model.safetensors").stat().st_size

    with pytest.raises(CheckpointError, match="saved without its target's embedding and LM head"):
        load_drafter(str(shared), device="cpu", dtype="float32")
    bound = load_drafter(str(shared), device="cpu", dtype="float32", target=runner.model)
    assert bound.model.embed_tokens.weight.data_ptr() == runner.model.model.embed_tokens.weight.data_ptr()
    assert bound.model.lm_head.weight.data_ptr() == runner.model.output_embeddings().data_ptr()
    from_folder = load_drafter(str(shared), device="cpu", dtype="float32", target=target_dir)
    assert torch.equal(from_folder.model.lm_head.weight, runner.model.output_embeddings())

    plain = greedy_tokens(runner, None)
    expected = greedy_tokens(runner, load_drafter(str(released), device="cpu", dtype="float32"))
    assert expected == plain
    assert greedy_tokens(runner, bound) == expected == greedy_tokens(runner, from_folder)

    again = bound.model.save_pretrained(tmp_path / "again")  # the released layout, from the bound drafter
    assert json.loads((again / "config.json").read_text()) == json.loads((released / "config.json").read_text())
    original, rewritten = load_file(str(released / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert original.keys() == rewritten.keys()
    assert all(torch.equal(original[k], rewritten[k]) for k in original)


def test_binding_refuses_a_target_that_does_not_fit(target_dir, runner, tmp_path):
    released = released_folder("dspark", target_dir, runner, tmp_path / "released")
    shared = load_drafter(str(released), device="cpu", dtype="float32").model.save_pretrained(
        tmp_path / "shared", with_target_tensors=False)
    other = build_random_model(tmp_path / "other", "tiny-qwen3", seed=5, with_tokenizer=False, **{**MODEL, "vocab_size": 64})
    with pytest.raises(CheckpointError, match=r"the target's embedding is \(64, 32\), the drafter needs \(48, 32\)"):
        load_drafter(str(shared), device="cpu", dtype="float32", target=TargetRunner.from_pretrained(other).model)
    with pytest.raises(CheckpointError, match="load both in the same dtype"):
        load_drafter(str(shared), device="cpu", dtype="float64", target=runner.model)
    config = json.loads((shared / "config.json").read_text())
    (shared / "config.json").write_text(json.dumps({**config, SHARES_TARGET_FIELD: "yes"}))
    with pytest.raises(CheckpointError, match=f"{SHARES_TARGET_FIELD} must be true or false"):
        load_drafter(str(shared), device="cpu", dtype="float32", target=runner.model)
    (shared / "config.json").write_text(json.dumps({**config, SHARES_TARGET_FIELD: False}))
    with pytest.raises(CheckpointError, match="embed_tokens.weight"):  # claims the released layout, lacks its tensors
        load_drafter(str(shared), device="cpu", dtype="float32", target=runner.model)
