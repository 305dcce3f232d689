"""Every input path of `dspark train` / `dspark pretrain` is checked: a bad device, output folder or training
set is refused with one line (exit 2) before any work, two runs never write one folder, and the checkpoint
folder survives kills, a lost `latest` pointer and `train.keep_last` pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.cli import main
from dspark.config import from_dict
from dspark.errors import ConfigError
from dspark.models.random_init import build_random_model
from dspark.training.checkpoints import CheckpointFolder
from dspark.training.config import TrainConfig, load_train_config
from dspark.training.data_loading import check_supervision
from dspark.pipeline.pretrain import CHECKPOINT_FILES as PRETRAIN_FILES
from dspark.pipeline.pretrain import load_pretrain_config
from dspark.training.trainer import Sample, Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random target with a tokenizer (259 tokens, vocab_size 320)."""
    return build_random_model(
        tmp_path_factory.mktemp("hardening") / "target", "tiny-qwen3", seed=4, init_std=0.3, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=256,
    )


def random_samples(count: int, seed: int = 0) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(12, 24, (1,), generator=gen))
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 3:] = True
        out.append(Sample(torch.randint(0, 250, (length,), generator=gen), mask))
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenised(samples: list[Sample]) -> list[dict]:
    return [{"input_ids": s.input_ids.tolist(), "loss_mask": s.loss_mask.int().tolist()} for s in samples]


def train_yaml(path: Path, target: Path, data: Path, output: Path, **train) -> Path:
    """A tiny DSpark run (JSON is YAML)."""
    config = {
        "preset": "dspark",
        "model": {"target": str(target), "draft_layers": 1, "block_size": 3, "markov_rank": 8, "target_layer_ids": [0, 2]},
        "data": {"train": str(data), "num_anchors": 4},
        "train": {"output_dir": str(output), "batch_size": 2, "micro_batch_size": 1, "max_steps": 2,
                  "checkpoint_every": 2, "progress": False, **train},
    }
    path.write_text(json.dumps(config))
    return path


def tiny_config(target: Path, output: Path, **train) -> TrainConfig:
    return from_dict(TrainConfig, {
        "model": {"target": str(target), "draft_layers": 1, "block_size": 3, "markov_rank": 8, "target_layer_ids": [0, 2]},
        "data": {"train": "unused.jsonl", "num_anchors": 4},
        "train": {"output_dir": str(output), "batch_size": 2, "micro_batch_size": 1, "checkpoint_every": 1,
                  "progress": False, **train},
    })


def refused(capsys, argv: list[str], *needles: str) -> str:
    """`dspark ARGV` exits 2 with no traceback; its last stderr line is the error and names every needle."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dspark {argv[0]}: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- item 1: the device ------------------------------------------------------------------------------


def test_train_device_auto_is_accepted_and_a_missing_cuda_is_refused(target, tmp_path, capsys):
    data = write_rows(tmp_path / "data.jsonl", tokenised(random_samples(2)))
    cfg = train_yaml(tmp_path / "train.yaml", target, data, tmp_path / "out")
    auto = load_train_config(cfg, ["train.device=auto"]).train.device
    assert auto == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert load_train_config(cfg).train.device == auto  # the default is auto
    refused(capsys, ["train", "--config", str(cfg), "train.device=tpu"], "train.device")
    pretrain = ["pretrain", "data.corpus=nowhere", "data.tokenizer=nowhere", f"train.output_dir={tmp_path / 'p'}"]
    assert load_pretrain_config(None, pretrain[1:]).train.device == auto
    if not torch.cuda.is_available():
        refused(capsys, ["train", "--config", str(cfg), "train.device=cuda"], "train.device", "CUDA")
        refused(capsys, pretrain + ["train.device=cuda:0"], "train.device", "CUDA")
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists()


def test_shipped_configs_use_device_auto():
    import yaml

    for name in ("train_dspark.yaml", "pretrain_builtin.yaml"):
        assert yaml.safe_load((REPO / "configs" / name).read_text())["train"]["device"] == "auto", name
    cpu_or_cuda = "cuda:0" if torch.cuda.is_available() else "cpu"
    train = load_train_config(REPO / "configs" / "train_dspark.yaml", ["model.target=/t", "data.train=/d.jsonl"])
    pretrain = load_pretrain_config(REPO / "configs" / "pretrain_builtin.yaml", ["data.corpus=c", "data.tokenizer=t"])
    assert train.train.device == pretrain.train.device == cpu_or_cuda


# -- item 2: the output folder -------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_refused_before_anything_is_read(tmp_path, capsys):
    """The target, data, corpus and tokenizer do not exist: the refusal names train.output_dir, so it came
    before any of them was opened."""
    blocker = tmp_path / "out"
    blocker.write_text("not a folder\n")
    cfg = train_yaml(tmp_path / "train.yaml", tmp_path / "no-target", tmp_path / "no-data.jsonl", blocker)
    refused(capsys, ["train", "--config", str(cfg)], "train.output_dir", str(blocker))
    refused(capsys, ["train", "--config", str(cfg), f"train.output_dir={blocker / 'below'}"], "train.output_dir")
    refused(capsys, ["pretrain", "data.corpus=no-corpus", "data.tokenizer=no-tokenizer", f"train.output_dir={blocker}"],
            "train.output_dir")
    assert blocker.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.yaml"]
    with pytest.raises(ConfigError, match="train.keep_last"):
        load_train_config(cfg, [f"train.output_dir={tmp_path / 'fine'}", "train.keep_last=0"])


def test_a_second_run_into_the_same_output_dir_is_refused_at_once(target, tmp_path, capsys):
    out = tmp_path / "out"
    data = write_rows(tmp_path / "data.jsonl", tokenised(random_samples(2)))
    cfg = train_yaml(tmp_path / "train.yaml", target, data, out)
    holder = subprocess.Popen(  # another process holding the output's lock, as a running `dspark train` does
        [sys.executable, "-c", "import sys\nfrom dspark.files import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'train.output_dir'):\n    print('locked', flush=True)\n    sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(capsys, ["train", "--config", str(cfg)], "train.output_dir", "another process", f"pid {holder.pid}")
        refused(capsys, ["pretrain", "data.corpus=c", "data.tokenizer=t", f"train.output_dir={out}"], "another process")
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(["train", "--config", str(cfg)]) == 0  # the lock goes with its process
    assert (out / "latest").read_text() == "step_2\n"


# -- item 3: the training data -------------------------------------------------------------------------


@pytest.mark.parametrize("row, needle", [
    ({"input_ids": [1.5, 2, 3], "loss_mask": [1, 1, 1]}, "input_ids[0] is 1.5"),
    ({"input_ids": [1, 2.0, 3], "loss_mask": [1, 1, 1]}, "input_ids[1] is 2.0"),
    ({"input_ids": [1, 2, "3"], "loss_mask": [1, 1, 1]}, "input_ids[2] is \"3\""),
    ({"input_ids": [1, -2, 3], "loss_mask": [1, 1, 1]}, "input_ids[1] is -2"),
    ({"input_ids": [1, 2, 320], "loss_mask": [1, 1, 1]}, "input_ids[2] is 320; token ids must be integers in [0, 320)"),
    ({"input_ids": [1, 2, 3], "loss_mask": [1, 2, 1]}, "loss_mask[1] is 2"),
    ({"input_ids": [1, 2, 3], "loss_mask": [1, 0.5, 1]}, "loss_mask[1] is 0.5"),
])
def test_ill_typed_tokenised_rows_are_refused_naming_file_and_line(target, tmp_path, capsys, row, needle):
    good = tokenised(random_samples(1))[0]
    data = write_rows(tmp_path / "rows.jsonl", [good, row])
    cfg = train_yaml(tmp_path / "train.yaml", target, data, tmp_path / "out")
    refused(capsys, ["train", "--config", str(cfg)], "rows.jsonl:2", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, counts", [
    ([{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 0, 0]}] * 3,
     "3 rows read, 3 with no supervised token (loss_mask all 0), 0 supervised tokens in total"),
    ([{"input_ids": [5, 6, 7, 8], "loss_mask": [1, 0, 1, 0]}] * 2,  # supervised tokens, but never two in a row
     "2 rows read, 0 with no supervised token (loss_mask all 0), 4 supervised tokens in total"),
    ([{"turns": ["hello there"]}, {"conversations": [{"role": "user", "content": "hi"}]}],
     "2 rows read, 2 with no supervised token (loss_mask all 0), 0 supervised tokens in total, "
     "2 conversations with no assistant content"),
    ([{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 2,
     "2 rows read, 0 with no supervised token (loss_mask all 0), 4 supervised tokens in total, "
     "2 conversations with no assistant content"),
])
def test_data_with_nothing_to_supervise_is_refused_with_counts(target, tmp_path, capsys, rows, counts):
    """Today's symptom: loss 0.0 and an untrained checkpoint. Refused before the target is loaded."""
    data = write_rows(tmp_path / "data.jsonl", rows)
    cfg = train_yaml(tmp_path / "train.yaml", target, data, tmp_path / "out", batch_size=1)
    last = refused(capsys, ["train", "--config", str(cfg)], "data.jsonl", "nothing to supervise for a dspark drafter", counts)
    assert "0 anchor positions" in last
    assert not (tmp_path / "out").exists()


def test_what_counts_as_supervised_follows_the_drafter_kind():
    pair_at_start = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)  # an anchor, but no label two ahead
    late_single = torch.tensor([0, 0, 0, 1, 0], dtype=torch.bool)  # a label two ahead, but no anchor
    for kind in ("dspark", "dflash"):
        check_supervision([(pair_at_start, True)], kind, "d")
        with pytest.raises(ConfigError, match="0 anchor positions"):
            check_supervision([(late_single, True)], kind, "d")
    for kind in ("eagle3", "mtp"):
        check_supervision([(late_single, True)], kind, "d")
        with pytest.raises(ConfigError, match=rf"nothing to supervise for a {kind} drafter: 1 rows read.* 0 supervised labels"):
            check_supervision([(pair_at_start, True)], kind, "d")


def test_a_feature_cache_with_nothing_to_supervise_is_refused(target, tmp_path, capsys):
    """Truncated right after the first response token: every cached sample has one supervised token and
    no anchor position."""
    conv = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok sure"}]}
    data = write_rows(tmp_path / "conv.jsonl", [conv, conv])
    cache = tmp_path / "cache"
    assert main(["data", "cache", "--target", str(target), "--data", str(data), "--layers", "0,2",
                 "--output", str(cache), "--max-length", "22", "--no-progress"]) == 0
    capsys.readouterr()
    cfg = train_yaml(tmp_path / "train.yaml", target, cache, tmp_path / "out", batch_size=1)
    refused(capsys, ["train", "--config", str(cfg)], str(cache), "2 rows read", "2 supervised tokens in total",
            "0 anchor positions")
    assert not (tmp_path / "out").exists()


# -- item 4: the checkpoint folder ---------------------------------------------------------------------


def test_leftovers_of_a_killed_run_are_removed_on_start(target, tmp_path, capsys):
    out = tmp_path / "out"
    samples = random_samples(2)
    Trainer(tiny_config(target, out, max_steps=1), samples).fit()
    stale = [out / ".step_2.tmp-x1y2", out / ".step_1.old-4242"]
    for folder in stale:
        (folder / "drafter").mkdir(parents=True)
        (folder / "drafter" / "model.safetensors").write_bytes(b"half written")
    (out / ".latest.abc123.tmp").write_text("step_")
    capsys.readouterr()
    trainer = Trainer(tiny_config(target, out, max_steps=2), samples)
    trainer.fit()
    notes = [line for line in capsys.readouterr().err.splitlines() if "left over from an interrupted run" in line]
    assert len(notes) == 3 and all(line.startswith("dspark train: note: removed ") for line in notes)
    assert trainer.step == 2 and sorted(p.name for p in out.iterdir()) == ["latest", "step_1", "step_2", "tensorboard"]


class KilledAfter(Trainer):
    """A run killed right after optimizer step 3 (and its checkpoint)."""

    def train_step(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return super().train_step()


def test_a_lost_latest_pointer_resumes_from_the_newest_complete_checkpoint(target, tmp_path, capsys):
    out = tmp_path / "out"
    samples = random_samples(2)
    straight = Trainer(tiny_config(target, tmp_path / "straight", max_steps=4), samples)
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        KilledAfter(tiny_config(target, out, max_steps=4), samples).fit()
    (out / "latest").unlink()
    first = (out / "step_1" / "trainer_state.json").read_text()
    capsys.readouterr()
    resumed = Trainer(tiny_config(target, out, max_steps=4), samples)
    assert resumed.resume() and resumed.step == 3  # not step 0
    assert "latest is missing: resuming from the newest complete checkpoint" in capsys.readouterr().err
    resumed.fit()
    assert resumed.step == 4 and (out / "latest").read_text() == "step_4\n"
    assert (out / "step_1" / "trainer_state.json").read_text() == first  # not redone
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    (out / "step_4" / "trainer_state.safetensors").unlink()  # `latest` names an incomplete checkpoint
    again = Trainer(tiny_config(target, out, max_steps=4), samples)
    assert again.resume() and again.step == 3
    assert "names step_4, which is incomplete (no trainer_state.safetensors)" in capsys.readouterr().err


def test_keep_last_prunes_older_checkpoints(target, tmp_path):
    out = tmp_path / "out"
    samples = random_samples(2)
    Trainer(tiny_config(target, out, max_steps=4, keep_last=2), samples).fit()
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_3", "step_4", "tensorboard"]
    Trainer(tiny_config(target, out, max_steps=5, keep_last=1), samples).fit()
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_5", "tensorboard"]
    Trainer(tiny_config(target, out, max_steps=7), samples).fit()  # keep_last null: every checkpoint stays
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_5", "step_6", "step_7", "tensorboard"]


def test_pretraining_checkpoints_share_the_same_rules(tmp_path):
    """`Pretrainer` keeps output_dir/checkpoints through the same `CheckpointFolder` (its own files)."""
    notes = []
    folder = CheckpointFolder(tmp_path / "checkpoints", PRETRAIN_FILES, keep_last=2, log=notes.append)

    def write(tmp: Path) -> None:
        for name in PRETRAIN_FILES:
            (tmp / name).write_text("x")

    for step in (10, 20, 30):
        folder.save(step, write)
    assert sorted(p.name for p in folder.root.iterdir()) == ["latest", "step_20", "step_30"]
    (folder.root / "step_30" / "state.json").unlink()
    assert folder.resume_point() == folder.root / "step_20"
    assert notes == [f"{folder.root / 'latest'} names step_30, which is incomplete (no state.json): resuming from "
                     f"the newest complete checkpoint, {folder.root / 'step_20'}"]
    (folder.root / ".step_40.tmp-abc").mkdir()
    assert folder.remove_stale() == [folder.root / ".step_40.tmp-abc"] and len(notes) == 2
