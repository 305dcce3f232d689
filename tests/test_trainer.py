"""The training loop: it learns, it resumes exactly, and data parallelism equals one process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dspark.config import from_dict
from dspark.errors import ConfigError
from dspark.models.drafters.dspark import DSparkModel
from dspark.models.random_init import build_random_model
from dspark.training.config import TrainConfig, load_train_config
from dspark.training.trainer import Sample, Trainer, lr_at


@pytest.fixture(scope="module")
def target_dir(trainer_target):
    return trainer_target


def make_samples(count: int, seed: int = 0) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(12, 30, (1,), generator=gen))
        ids = torch.randint(0, 39, (length,), generator=gen)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 3 :] = True
        out.append(Sample(ids, mask))
    return out


def make_config(target_dir, output_dir, **train) -> TrainConfig:
    data = {
        "preset": None,
        "model": {"target": str(target_dir), "draft_layers": 1, "block_size": 4, "markov_rank": 8,
                  "target_layer_ids": [0, 2], "init_std": 0.05},
        "data": {"train": "unused.jsonl", "num_anchors": 6},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.2},
        "train": dict({"output_dir": str(output_dir), "batch_size": 4, "micro_batch_size": 2, "max_steps": 6,
                       "checkpoint_every": 2, "log_every": 1, "progress": False, "chunk_blocks": 5}, **train),
    }
    return from_dict(TrainConfig, data)


def test_lr_schedule_warms_up_then_decays(target_dir, tmp_path):
    config = make_config(target_dir, tmp_path, max_steps=10)
    lrs = [lr_at(s, 10, config) for s in range(10)]
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3)  # ceil(0.2 × 10) = 2 warmup steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 3e-4


def test_training_lowers_the_loss_on_a_fixed_batch(target_dir, tmp_path):
    config = make_config(target_dir, tmp_path, max_steps=12, batch_size=4, checkpoint_every=100)
    trainer = Trainer(config, make_samples(4))
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses
    # embeddings and LM head stay the target's
    assert torch.equal(trainer.model.embed_tokens.weight, trainer.target.model.model.embed_tokens.weight)
    assert torch.equal(trainer.model.lm_head.weight, trainer.target.model.output_embeddings())


class KilledAfter(Trainer):
    """Simulates a process killed right after optimizer step `kill_at` (and its checkpoint)."""

    kill_at = 4

    def train_step(self):
        if self.step == self.kill_at:
            raise KeyboardInterrupt
        return super().train_step()


def test_kill_and_resume_equals_an_uninterrupted_run(target_dir, tmp_path):
    samples = make_samples(8)
    straight = Trainer(make_config(target_dir, tmp_path / "straight"), samples)
    straight.fit()
    killed = KilledAfter(make_config(target_dir, tmp_path / "resumed"), samples)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert (tmp_path / "resumed" / "latest").read_text().strip() == "step_4"
    resumed = Trainer(make_config(target_dir, tmp_path / "resumed"), samples)
    resumed.fit()
    assert resumed.step == straight.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    final = DSparkModel.from_pretrained(tmp_path / "resumed" / "step_6" / "drafter")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, straight.model.state_dict()[name]), name
    assert not any(p.name.startswith(".") for p in (tmp_path / "resumed").iterdir())  # no half-written folder
    assert (tmp_path / "straight" / "tensorboard").is_dir()


def test_config_errors_are_named(target_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: dspark\nmodel:\n  target: x\n  bogus: 1\ndata:\n  train: y\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_train_config(cfg)
    cfg.write_text("preset: nope\nmodel:\n  target: x\ndata:\n  train: y\n")
    with pytest.raises(ConfigError, match="preset"):
        load_train_config(cfg)
    cfg.write_text("preset: dflash\nmodel:\n  target: x\ndata:\n  train: y\n")
    config = load_train_config(cfg, ["optim.lr=0.001", "train.batch_size=16"])
    assert config.model.markov_rank == 0 and config.optim.ce_weight == 1.0 and config.optim.lr == 0.001
    assert config.train.parallel == "ddp" and load_train_config(cfg, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel"):
        load_train_config(cfg, ["train.parallel=zero3"])
    with pytest.raises(ConfigError, match="multiple"):
        Trainer(make_config(target_dir, tmp_path / "o", batch_size=3, micro_batch_size=2), make_samples(4))


def write_tokenised(path, samples):
    with path.open("w") as handle:
        for s in samples:
            handle.write(json.dumps({"input_ids": s.input_ids.tolist(), "loss_mask": s.loss_mask.int().tolist()}) + "\n")


def write_yaml(path, target_dir, data_path):
    path.write_text(
        "preset: dspark\n"
        f"model:\n  target: {target_dir}\n  draft_layers: 1\n  block_size: 4\n  markov_rank: 8\n  target_layer_ids: [0, 2]\n"
        f"data:\n  train: {data_path}\n  num_anchors: 6\n"
        "optim:\n  lr: 0.003\n"
        "train:\n  batch_size: 4\n  micro_batch_size: 1\n  max_steps: 2\n  checkpoint_every: 2\n  progress: false\n"
        "  device: cpu\n"  # gloo processes (the default, auto, would pick CUDA where there is one)
    )


def torchrun_train(cfg, *overrides: str) -> None:
    """`dspark train` in two gloo processes under torchrun."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dspark", "train", "--config", str(cfg), *overrides],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]


def test_two_gloo_processes_under_torchrun_equal_one_process(target_dir, tmp_path):
    """DDP (the default): two processes, two micro-batches each, equal one process with four."""
    from dspark.cli import main

    data = tmp_path / "train.jsonl"
    write_tokenised(data, make_samples(8, seed=3))
    cfg = tmp_path / "train.yaml"
    write_yaml(cfg, target_dir, data)
    assert main(["train", "--config", str(cfg), f"train.output_dir={tmp_path / 'one'}"]) == 0
    torchrun_train(cfg, f"train.output_dir={tmp_path / 'two'}")
    one = DSparkModel.from_pretrained(tmp_path / "one" / "step_2" / "drafter")
    two = DSparkModel.from_pretrained(tmp_path / "two" / "step_2" / "drafter")
    meta = json.loads((tmp_path / "two" / "step_2" / "trainer_state.json").read_text())
    assert meta["world_size"] == 2
    start = DSparkModel.from_pretrained(tmp_path / "one" / "step_2" / "drafter")
    changed = False
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    trainer = Trainer(make_config(target_dir, tmp_path / "fresh"), make_samples(4))
    for name, tensor in trainer.model.state_dict().items():
        changed |= not torch.allclose(tensor, start.state_dict()[name])
    assert changed  # the two steps really moved the weights


def test_train_command_reports_bad_data(target_dir, tmp_path, capsys):
    from dspark.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}\n')
    cfg = tmp_path / "train.yaml"
    write_yaml(cfg, target_dir, data)
    assert main(["train", "--config", str(cfg), f"train.output_dir={tmp_path / 'out'}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bfloat16_parameters_keep_float32_master_weights(target_dir, tmp_path):
    trainer = Trainer(make_config(target_dir, tmp_path, dtype="bfloat16", max_steps=3), make_samples(4))
    first = trainer.train_step()
    second = trainer.train_step()
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    for (name, param), master in zip(trainer.trainable, trainer.master):
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(param, master.to(torch.bfloat16)), name
    # the masters carry updates finer than bf16 resolution
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in trainer.master)


def test_corrupted_checkpoint_is_reported_not_half_loaded(target_dir, tmp_path):
    from dspark.errors import CheckpointError

    samples = make_samples(4)
    Trainer(make_config(target_dir, tmp_path / "run", max_steps=2), samples).fit()
    (tmp_path / "run" / "step_2" / "trainer_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_2"):
        Trainer(make_config(target_dir, tmp_path / "run", max_steps=4), samples).fit()


def test_shipped_example_config_is_valid():
    from pathlib import Path

    from dspark.models.zoo import builtin_target

    path = Path(__file__).resolve().parents[1] / "configs" / "train_dspark.yaml"
    config = load_train_config(path, ["model.target=/some/target", "data.train=/some/data.jsonl"])
    assert config.model.markov_rank == 256 and config.optim.tv_weight == 0.9 and config.train.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="data.train"):
        load_train_config(path)  # the target defaults to the built-in one; the data has no default
    assert load_train_config(path, ["data.train=/d.jsonl"]).model.target == str(builtin_target())


def test_training_from_a_feature_cache_equals_online_features(tmp_path):
    """Conversations → (a) online target features, (b) `dspark data cache` (float32) → same trained weights.
    A cache built for other target layers is refused before training starts."""
    from dspark.cli import main

    target = build_random_model(tmp_path / "target", "tiny-qwen3", seed=2, init_std=0.1)
    data = tmp_path / "conv.jsonl"
    with data.open("w") as handle:
        for i in range(4):
            conv = [{"role": "user", "content": f"question {i}: what is {i} + {i}?"},
                    {"role": "assistant", "content": f"The answer is {2 * i}. " * (2 + i)}]
            handle.write(json.dumps({"conversations": conv}) + "\n")
    cache = tmp_path / "cache"
    assert main(["data", "cache", "--target", str(target), "--data", str(data), "--layers", "0,2",
                 "--output", str(cache), "--dtype", "float32", "--no-progress"]) == 0
    cfg = tmp_path / "train.yaml"
    write_yaml(cfg, target, data)
    common = ["model.target_layer_ids=[0, 2]", "train.max_steps=2"]
    assert main(["train", "--config", str(cfg), f"train.output_dir={tmp_path / 'online'}"] + common) == 0
    assert main(["train", "--config", str(cfg), f"data.train={cache}", f"train.output_dir={tmp_path / 'cached'}"] + common) == 0
    online = DSparkModel.from_pretrained(tmp_path / "online" / "step_2" / "drafter")
    cached = DSparkModel.from_pretrained(tmp_path / "cached" / "step_2" / "drafter")
    for name, tensor in online.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    other_layers = ["model.target_layer_ids=[1, 3]", "train.max_steps=2"]
    assert main(["train", "--config", str(cfg), f"data.train={cache}", f"train.output_dir={tmp_path / 'x'}"] + other_layers) == 2


@pytest.mark.parametrize("preset", ["dflash", "eagle3", "mtp"])
def test_every_drafter_kind_trains_and_its_checkpoint_drafts_losslessly(target_dir, tmp_path, preset):
    from dspark.engine.generation import generate
    from dspark.models.drafters import load_drafter
    from dspark.training.config import PRESETS

    config = make_config(target_dir, tmp_path / preset, max_steps=10, checkpoint_every=10)
    for section, values in PRESETS[preset].items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    if preset == "mtp":
        config.model.target_layer_ids = None
    trainer = Trainer(config, make_samples(4))
    losses = [trainer.train_step()["loss"] for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0], losses
    folder = trainer.save_checkpoint() / "drafter"
    drafter = load_drafter(str(folder), dtype="float32")
    prompts = [[1, 2, 3], [5, 6], [7]]
    plain = generate(trainer.target, prompts, max_new_tokens=12, seed=0)
    spec = generate(trainer.target, prompts, max_new_tokens=12, seed=0, drafter=drafter)
    assert [s.token_ids for s in spec.sequences] == [s.token_ids for s in plain.sequences]


def test_fsdp_under_torchrun_equals_one_process_writes_plain_checkpoints_and_resumes(target_dir, tmp_path):
    """train.parallel=fsdp: two gloo processes (sharded float32 masters, sharded AdamW state) equal one
    process (where fsdp means plain training); the checkpoint has the single-process layout and loads as a
    drafter; a run killed after step 2 and restarted ends bitwise equal to the uninterrupted one."""
    from safetensors.torch import load_file

    from dspark.cli import main
    from dspark.models.drafters import load_drafter

    data = tmp_path / "train.jsonl"
    write_tokenised(data, make_samples(8, seed=3))
    cfg = tmp_path / "train.yaml"
    write_yaml(cfg, target_dir, data)
    common = ["train.parallel=fsdp", "train.max_steps=4", "model.draft_layers=2"]
    assert main(["train", "--config", str(cfg), f"train.output_dir={tmp_path / 'one'}", *common]) == 0
    torchrun_train(cfg, f"train.output_dir={tmp_path / 'two'}", *common)
    one, two = tmp_path / "one" / "step_4", tmp_path / "two" / "step_4"
    assert json.loads((two / "trainer_state.json").read_text())["world_size"] == 2
    assert (two / "drafter" / "config.json").read_text() == (one / "drafter" / "config.json").read_text()
    for name in ("drafter/model.safetensors", "trainer_state.safetensors"):
        expected, got = load_file(str(one / name)), load_file(str(two / name))
        assert expected.keys() == got.keys(), name
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype == torch.float32 and got[key].shape == tensor.shape, key
            torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    final = load_file(str(two / "drafter" / "model.safetensors"))
    earlier = load_file(str(tmp_path / "one" / "step_2" / "drafter" / "model.safetensors"))
    assert not torch.allclose(earlier["layers.1.mlp.up_proj.weight"], final["layers.1.mlp.up_proj.weight"])  # it trains
    drafter = load_drafter(str(two / "drafter"), dtype="float32")  # what `--drafter DIR` does
    assert drafter.block_size == 4 and torch.equal(drafter.model.fc.weight, final["fc.weight"])

    straight = {name: load_file(str(two / name)) for name in ("drafter/model.safetensors", "trainer_state.safetensors")}
    shutil.rmtree(two)  # killed after the step-2 checkpoint
    (tmp_path / "two" / "latest").write_text("step_2\n")
    step_2 = (tmp_path / "two" / "step_2" / "trainer_state.json").read_text()
    torchrun_train(cfg, f"train.output_dir={tmp_path / 'two'}", *common)
    assert (tmp_path / "two" / "step_2" / "trainer_state.json").read_text() == step_2  # resumed, not redone
    for name, tensors in straight.items():
        resumed = load_file(str(two / name))
        for key, tensor in tensors.items():
            assert torch.equal(resumed[key], tensor), f"{name}: {key}"



def test_a_micro_batch_with_nothing_to_supervise_contributes_zero(target_dir, tmp_path):
    """A sample whose response is one token has no anchor position (token i and i+1 both supervised):
    its micro-batch has a loss without a graph; the step must neither crash nor change because of it."""
    samples = make_samples(4, seed=3)
    short = Sample(samples[0].input_ids[:10].clone(), torch.zeros(10, dtype=torch.bool))
    short.loss_mask[-1] = True
    with_empty = Trainer(make_config(target_dir, tmp_path / "a", micro_batch_size=1, batch_size=2, max_steps=1),
                         [samples[1], short])
    alone = Trainer(make_config(target_dir, tmp_path / "b", micro_batch_size=1, batch_size=1, max_steps=1), [samples[1]])
    with_empty.train_step()
    alone.train_step()
    for (name, a), (_, b) in zip(with_empty.model.named_parameters(), alone.model.named_parameters()):
        assert torch.equal(a, b), name


def test_train_can_save_drafters_without_the_target_tensors_and_resume_from_them(target_dir, tmp_path):
    """train.save_target_tensors=false: checkpoints' drafter folders leave out the embedding and LM head (the
    target's); a restarted run resumes from one (binding them from the target), and it loads with its target."""
    from safetensors.torch import load_file

    from dspark.cli import main
    from dspark.models.drafters import load_drafter
    from dspark.models.drafters.common import TARGET_TENSORS

    data = tmp_path / "train.jsonl"
    write_tokenised(data, make_samples(4, seed=5))
    cfg = tmp_path / "train.yaml"
    write_yaml(cfg, target_dir, data)
    common = [f"train.output_dir={tmp_path / 'out'}", "train.save_target_tensors=false", "train.checkpoint_every=1"]
    assert main(["train", "--config", str(cfg), "train.max_steps=2", *common]) == 0
    drafter_dir = tmp_path / "out" / "step_2" / "drafter"
    assert not set(TARGET_TENSORS) & set(load_file(str(drafter_dir / "model.safetensors")))
    step_2 = (tmp_path / "out" / "step_2" / "trainer_state.json").read_text()
    assert main(["train", "--config", str(cfg), "train.max_steps=3", *common]) == 0
    assert (tmp_path / "out" / "step_2" / "trainer_state.json").read_text() == step_2  # resumed, not redone
    final = tmp_path / "out" / "step_3" / "drafter"
    assert json.loads((tmp_path / "out" / "step_3" / "trainer_state.json").read_text())["step"] == 3
    drafter = load_drafter(str(final), device="cpu", dtype="float32", target=str(target_dir))
    assert drafter.block_size == 4
