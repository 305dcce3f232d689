"""Growing a drafter (`model.init_from`, docs/design.md §2.6) and the greedy confidence output (§2.4):
a grown drafter first computes exactly what its checkpoint did, bad checkpoints are refused by name, and
the trainer learns the greedy output from greedy acceptance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dspark.config import from_dict
from dspark.decoding.sampling import SamplingParams
from dspark.errors import CheckpointError, ConfigError
from dspark.models.drafters.base import DraftInput
from dspark.models.drafters.common import warm_start
from dspark.models.drafters.dspark import DSparkDrafter, DSparkModel, dspark_config_for_target, init_from_target
from dspark.models.drafters.eagle3 import eagle3_config_for_target, init_eagle3_from_target
from dspark.models.target_runner import TargetRunner
from dspark.training.config import TrainConfig, load_train_config
from dspark.training.trainer import Sample, Trainer


@pytest.fixture(scope="module")
def target_dir(trainer_target):
    return trainer_target


@pytest.fixture(scope="module")
def target(target_dir):
    return TargetRunner.from_pretrained(target_dir, dtype="float64")


def one_layer(target, **fields) -> DSparkModel:
    config = dspark_config_for_target(target.hf_config, target_layer_ids=(0, 2), mask_token_id=39, num_draft_layers=1,
                                      block_size=4, markov_rank=8, markov_head_type="rnn", **fields)
    return init_from_target(config, target.model, seed=1, std=0.3)


def grown_from(target, folder, layers: int = 3, **fields) -> DSparkModel:
    config = dspark_config_for_target(target.hf_config, target_layer_ids=(0, 2), mask_token_id=39,
                                      num_draft_layers=layers, block_size=4, markov_rank=8, markov_head_type="rnn",
                                      greedy_confidence_head=True, **fields)
    model = init_from_target(config, target.model, seed=2, std=0.3)
    warm_start(model, folder)
    return model


def proposals(model, target, tokens, samplings):
    """Draft one round for each sampling setting from the same context: (tokens, probs, confidence logits)."""
    seq = target.new_sequence()
    features = target.forward([seq], [tokens], feature_layer_ids=(0, 2)).features
    target.free_sequence(seq)
    drafter = DSparkDrafter(model)
    batch = [DraftInput(i, list(tokens) + [7], features, 4, s) for i, s in enumerate(samplings)]  # anchor 7
    out = drafter.propose(batch, torch.Generator().manual_seed(5))
    return out.tokens, out.probs, out.confidence_logits


def test_a_grown_drafter_starts_as_its_checkpoint(target, tmp_path):
    """Two more layers (identity at start) and a greedy output (a copy of the confidence head): the same
    drafts, the same q to float64 precision, the same confidences; the new layers are not dead (only their
    output projections are zero, so training moves them)."""
    small = one_layer(target)
    folder = small.save_pretrained(tmp_path / "one")
    big = grown_from(target, folder)
    assert len(big.layers) == 3
    tokens = torch.randint(0, 39, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    samplings = [SamplingParams(temperature=1.0), SamplingParams()]
    a, b = proposals(small, target, tokens, samplings), proposals(big, target, tokens, samplings)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-9)  # greedy row: the copied head
    for i in (1, 2):
        layer = big.layers[i]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.abs().sum() > 0 and layer.mlp.up_proj.weight.abs().sum() > 0
    # a perturbed new layer changes the output: the equality above is not vacuous
    with torch.no_grad():
        big.layers[2].mlp.down_proj.weight.normal_(0, 0.3)
    assert not torch.allclose(proposals(big, target, tokens, samplings)[1], b[1])


def test_warm_start_refuses_another_build(target, tmp_path):
    folder = one_layer(target).save_pretrained(tmp_path / "one")
    config = dspark_config_for_target(target.hf_config, target_layer_ids=(0, 2), mask_token_id=39, num_draft_layers=2,
                                      block_size=5, markov_rank=8, markov_head_type="rnn")
    with pytest.raises(CheckpointError, match="block_size 4 vs 5"):
        warm_start(init_from_target(config, target.model), folder)
    vanilla = dataclasses.replace(config, block_size=4, markov_head_type="vanilla")
    with pytest.raises(CheckpointError, match="markov_head_type 'rnn' vs 'vanilla'"):
        warm_start(init_from_target(vanilla, target.model), folder)
    eagle = init_eagle3_from_target(eagle3_config_for_target(target.hf_config, target_layer_ids=(0, 2)), target.model)
    eagle_folder = eagle.save_pretrained(tmp_path / "eagle")
    with pytest.raises(CheckpointError, match=r"architectures \['\w*Eagle\w*'\] vs \['Qwen3DSparkModel'\]"):
        warm_start(init_from_target(dataclasses.replace(config, block_size=4), target.model), eagle_folder)


def train_config(target_dir, output, **model) -> TrainConfig:
    data = {
        "preset": None,
        "model": dict({"target": str(target_dir), "draft_layers": 2, "block_size": 4, "markov_rank": 8,
                       "markov_head_type": "rnn", "target_layer_ids": [0, 2], "greedy_confidence_head": True}, **model),
        "data": {"train": "unused.jsonl", "num_anchors": 6},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.2, "ce_weight": 0.0, "tv_weight": 0.0, "confidence_weight": 0.0},
        "train": {"output_dir": str(output), "batch_size": 4, "micro_batch_size": 2, "max_steps": 30,
                  "checkpoint_every": 100, "log_every": 1, "progress": False, "chunk_blocks": 5, "device": "cpu"},
    }
    return from_dict(TrainConfig, data)


def samples(count: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 39, (24,), generator=gen)
        mask = torch.zeros(24, dtype=torch.bool)
        mask[6:] = True
        out.append(Sample(ids, mask))
    return out


def test_trainer_grows_from_a_checkpoint_and_learns_the_greedy_output(target, target_dir, tmp_path):
    """With only the greedy term on, its BCE falls: the output learns greedy acceptance; the grown run
    starts from the checkpoint's weights."""
    start = one_layer(target).save_pretrained(tmp_path / "one")
    trainer = Trainer(train_config(target_dir, tmp_path / "run", init_from=str(start)), samples(4))
    loaded = DSparkModel.from_pretrained(start, dtype="float32")
    assert torch.equal(trainer.model.layers[0].mlp.up_proj.weight, loaded.layers[0].mlp.up_proj.weight)
    assert torch.equal(trainer.model.greedy_confidence_head.proj.weight, loaded.confidence_head.proj.weight)
    losses = [trainer.train_step()["greedy_conf"] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(trainer.model.greedy_confidence_head.proj.weight, loaded.confidence_head.proj.weight)


def test_growth_options_are_checked_before_any_work(target_dir, tmp_path):
    base = [f"model.target={target_dir}", "data.train=unused.jsonl", f"train.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match="model.init_from: .* is not a drafter folder"):
        load_train_config(None, base + [f"model.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="greedy_confidence_head needs model.confidence_head"):
        load_train_config(None, base + ["model.greedy_confidence_head=true", "model.confidence_head=false",
                                        "model.markov_rank=0", "model.drafter=dflash"])
    with pytest.raises(ConfigError, match="_weight must be ≥ 0"):
        load_train_config(None, base + ["optim.greedy_confidence_weight=-1"])
