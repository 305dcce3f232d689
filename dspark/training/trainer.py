"""The drafter training loop (SPEC §2.5–2.6), readable top to bottom.

One optimizer step = `batch_size` sequences over all processes, split into micro-batches of
`micro_batch_size` per process (gradient accumulation). For each micro-batch: target features come from
the frozen target in this process (online, no disk cache); anchors are drawn per sequence from a
generator seeded by (seed, epoch, sample index), so the draw does not depend on which process runs the
sample; the drafter runs all blocks in one masked pass and the chunked loss is a token-weighted mean
whose denominator is summed over the whole step (all micro-batches, all processes) first.

Precision: gradients accumulate in float32 master buffers; with `train.dtype: bfloat16` the parameters are
stored in bf16 and AdamW updates float32 master copies that are cast back after each step.
Data parallelism (torchrun): every process computes gradients for its share; the float32 accumulators
are all-reduced (summed) once per optimizer step with torch.distributed — the same reduction DDP does,
without bf16 gradient reductions, and independent of which model method produced the gradients.
Checkpoints (every `checkpoint_every` steps and at the end) are written atomically: a loadable drafter
folder plus `trainer_state.safetensors` / `trainer_state.json` (optimizer moments, master weights, RNG,
step); `latest` names the newest one and a restarted run resumes from it. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from dspark.config import to_dict
from dspark.errors import CheckpointError, ConfigError
from dspark.models.checkpoint import save_folder_atomically, save_safetensors
from dspark.models.drafters.dspark import DSparkModel, dspark_config_for_target, init_from_target
from dspark.models.target_runner import TargetRunner
from dspark.training.anchors import build_blocks, sample_anchor_positions
from dspark.training.config import TrainConfig, default_target_layer_ids
from dspark.training.losses import LossWeights, drafter_block_loss, position_weights

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # shared with the target, never trained (SPEC §2.2)


@dataclass
class Sample:
    input_ids: torch.Tensor  # [S] long
    loss_mask: torch.Tensor  # [S] bool, 1 on response tokens


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over ceil(warmup_ratio · total) steps, then cosine to min_lr_ratio · lr (step is 0-based)."""
    o = config.optim
    warmup = math.ceil(o.warmup_ratio * total_steps)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine)


class Trainer:
    def __init__(self, config: TrainConfig, samples: Sequence[Sample], target: TargetRunner | None = None):
        self.config = config
        t = config.train
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if t.batch_size % (t.micro_batch_size * self.world):
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size × processes "
                f"= {t.micro_batch_size} × {self.world}"
            )
        if len(samples) < t.batch_size:
            raise ConfigError(f"{len(samples)} training samples: fewer than one batch of {t.batch_size}")
        self.samples = samples
        self.device = torch.device(t.device)
        self.target = target or TargetRunner.from_pretrained(config.model.target, device=self.device)
        if not self.target.hf_config:
            raise ConfigError("the target must be loaded from a model folder: its config.json seeds the drafter's")
        self.model = self._build_model()
        if hasattr(samples, "validate"):  # a feature cache: it must match this target and these layers
            samples.validate(self.model.config.target_layer_ids, self.target.config.hidden_size, config.model.target)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if n not in FROZEN]
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in FROZEN)
        self.master = [p.detach().float().clone() for _, p in self.trainable]
        self.grads = [torch.zeros_like(m) for m in self.master]
        o = config.optim
        for m in self.master:
            m.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.master, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.steps_per_epoch = len(samples) // t.batch_size
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.step = 0
        self.output = Path(t.output_dir)
        self.weights = LossWeights(o.ce_weight, o.tv_weight, o.confidence_weight, o.position_decay)
        self.writer = None

    # -- setup ---------------------------------------------------------------------------------------
    def _build_model(self) -> DSparkModel:
        m, target = self.config.model, self.target
        layer_ids = m.target_layer_ids or default_target_layer_ids(target.config.num_layers)
        mask_id = target.config.vocab_size - 1 if m.mask_token_id is None else m.mask_token_id
        draft_config = dspark_config_for_target(
            target.hf_config, target_layer_ids=tuple(layer_ids), mask_token_id=mask_id,
            num_draft_layers=m.draft_layers, block_size=m.block_size, markov_rank=m.markov_rank,
            markov_head_type=m.markov_head_type, enable_confidence_head=m.confidence_head,
            num_anchors=self.config.data.num_anchors,
        )
        model = init_from_target(draft_config, target.model, seed=self.config.train.seed, std=m.init_std)
        dtype = torch.bfloat16 if self.config.train.dtype == "bfloat16" else torch.float32
        return model.to(device=self.device, dtype=dtype).train()

    # -- data ----------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.train.seed * 1000 + epoch)
        return torch.randperm(len(self.samples), generator=gen)

    def _my_samples(self, step: int) -> tuple[list[int], int]:
        """Sample indices this process handles at optimizer step `step` (contiguous share of the batch)."""
        t = self.config.train
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        batch = order[within * t.batch_size : (within + 1) * t.batch_size].tolist()
        share = t.batch_size // self.world
        return batch[self.rank * share : (self.rank + 1) * share], epoch

    def _prepare(self, indices: list[int], epoch: int) -> dict:
        """Target features and blocks of one micro-batch (padded to its longest sequence)."""
        t, d = self.config.train, self.config.data
        seqs = [self.samples[i] for i in indices]
        ids = [s.input_ids[: d.max_length] for s in seqs]
        masks = [s.loss_mask[: d.max_length].bool() for s in seqs]
        if all(hasattr(s, "features") for s in seqs):  # from the feature cache
            seq_feats = [s.features[: d.max_length].to(self.device) for s in seqs]
            seq_final = [s.final_hidden[: d.max_length].to(self.device) for s in seqs]
        else:  # online: the frozen target in this process
            handles = [self.target.new_sequence() for _ in seqs]
            try:
                out = self.target.forward(handles, ids, feature_layer_ids=self.model.config.target_layer_ids,
                                          return_final_hidden=True)
            finally:
                for h in handles:
                    self.target.free_sequence(h)
            seq_feats, seq_final = out.split(out.features), out.split(out.final_hidden)
        longest = max(len(x) for x in ids)
        n = len(seqs)
        feats = seq_feats[0].new_zeros(n, longest, seq_feats[0].shape[-1])
        final = seq_final[0].new_zeros(n, longest, seq_final[0].shape[-1])
        input_ids = torch.zeros(n, longest, dtype=torch.long)
        loss_mask = torch.zeros(n, longest, dtype=torch.bool)
        for row, (f, h, x, m) in enumerate(zip(seq_feats, seq_final, ids, masks)):
            feats[row, : len(x)], final[row, : len(x)] = f, h
            input_ids[row, : len(x)], loss_mask[row, : len(x)] = x, m
        positions, valid = [], []
        for row, index in enumerate(indices):
            gen = torch.Generator().manual_seed((t.seed * 1_000_003 + epoch) * 10_000_019 + index)
            p, v = sample_anchor_positions(loss_mask[row : row + 1], d.num_anchors, gen)
            positions.append(p)
            valid.append(v)
        positions, valid = torch.cat(positions), torch.cat(valid)
        blocks = build_blocks(input_ids, loss_mask, positions, valid, self.model.config.block_size)
        dtype = self.model.fc.weight.dtype
        hidden_size = final.shape[-1]
        target_hidden = final.gather(1, blocks.target_rows.view(n, -1, 1).expand(-1, -1, hidden_size))
        return dict(
            features=feats.clone().to(self.device, dtype), blocks=blocks,
            target_hidden=target_hidden.view(*blocks.labels.shape, hidden_size).clone().to(self.device, dtype),
        )

    # -- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        t = self.config.train
        indices, epoch = self._my_samples(self.step)
        micro = [self._prepare(indices[i : i + t.micro_batch_size], epoch) for i in range(0, len(indices), t.micro_batch_size)]
        denominator = sum(position_weights(mb["blocks"].supervised, self.weights.decay).sum() for mb in micro)
        denominator = self._all_reduce(denominator.clone().to(self.device))
        totals = {"loss": 0.0, "ce": 0.0, "tv": 0.0, "conf": 0.0}
        acceptance, taus = [], []
        for mb in micro:
            blocks = mb["blocks"]
            hidden = self.model.forward_train(mb["features"], blocks.anchor_positions.to(self.device),
                                              blocks.anchor_tokens.to(self.device), blocks.valid.to(self.device))
            flat = lambda x: x.flatten(0, 1).to(self.device)  # noqa: E731
            out = drafter_block_loss(
                self.model.heads, hidden.flatten(0, 1), flat(blocks.prev_tokens), flat(blocks.labels),
                flat(blocks.supervised), mb["target_hidden"].flatten(0, 1), self.model.lm_head.weight,
                weights=self.weights, denominator=denominator, chunk_blocks=t.chunk_blocks,
            )
            out.total.backward()
            for acc, (_, p) in zip(self.grads, self.trainable):
                if p.grad is not None:
                    acc += p.grad.float()
                    p.grad = None
            totals["loss"] += float(out.total.detach())
            for key, value in (("ce", out.ce), ("tv", out.tv), ("conf", out.conf)):
                totals[key] += float(value)
            acceptance.append(out.acceptance_per_position)
            if not math.isnan(float(out.expected_tau)):
                taus.append(float(out.expected_tau))
        for acc in self.grads:
            self._all_reduce(acc)
        stats = self._apply_gradients()
        self.step += 1
        for key in totals:
            totals[key] = float(self._all_reduce(torch.tensor(totals[key], device=self.device)))
        stats.update(totals)
        stats["acceptance_per_position"] = torch.stack(acceptance).mean(0).tolist()
        stats["expected_tau"] = sum(taus) / len(taus) if taus else float("nan")
        return stats

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _apply_gradients(self) -> dict:
        o = self.config.optim
        for master, acc in zip(self.master, self.grads):
            master.grad = acc
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, o.grad_clip if o.grad_clip > 0 else float("inf"))
        lr = lr_at(self.step, self.total_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for (_, p), master, acc in zip(self.trainable, self.master, self.grads):
                p.copy_(master.to(p.dtype))
                acc.zero_()
        return {"lr": lr, "grad_norm": float(grad_norm)}

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.config.train
        self.resume()
        progress = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(self.output / "tensorboard"))
            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not t.progress, unit="step")
        last = None
        while self.step < self.total_steps:
            stats = self.train_step()
            if self.rank == 0:
                progress.update(1)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", tau=f"{stats['expected_tau']:.2f}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log(stats)
            if self.step % t.checkpoint_every == 0 or self.step == self.total_steps:
                last = self.save_checkpoint()
        if self.rank == 0:
            progress.close()
            self.writer.close()
        return last or self.output / (self.output / "latest").read_text().strip()

    def _log(self, stats: dict) -> None:
        w = self.writer
        for key in ("loss", "ce", "tv", "conf", "lr", "grad_norm", "expected_tau"):
            w.add_scalar(f"train/{key}", stats[key], self.step)
        for k, value in enumerate(stats["acceptance_per_position"]):
            w.add_scalar(f"train/acceptance@{k}", value, self.step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Rank 0 writes `step_<N>/` (drafter folder + trainer state) atomically, then `latest`."""
        folder = self.output / f"step_{self.step}"
        if self.rank == 0:
            tensors = {}
            for i, (master, state) in enumerate(zip(self.master, (self.optimizer.state.get(m, {}) for m in self.master))):
                tensors[f"master.{i}"] = master.detach()
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        tensors[f"{key}.{i}"] = state[key]
            steps = [float(self.optimizer.state[m]["step"]) for m in self.master if m in self.optimizer.state]
            meta = {"step": self.step, "adam_step": steps[0] if steps else 0.0, "world_size": self.world,
                    "total_steps": self.total_steps, "config": to_dict(self.config), "time": time.time()}

            def write(tmp: Path) -> None:
                self.model.save_pretrained(tmp / "drafter")
                save_safetensors(tensors, tmp / "trainer_state.safetensors")
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")

            save_folder_atomically(folder, write)
            pointer = self.output / "latest.tmp"
            pointer.write_text(folder.name + "\n")
            os.replace(pointer, self.output / "latest")
        if self.world > 1:
            dist.barrier()
        return folder

    def resume(self) -> bool:
        """Continue from `output_dir/latest` if it exists. Returns whether a checkpoint was loaded."""
        pointer = self.output / "latest"
        if not pointer.is_file():
            return False
        folder = self.output / pointer.read_text().strip()
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / "trainer_state.json").read_text())
            tensors = load_file(str(folder / "trainer_state.safetensors"))
            drafter = DSparkModel.from_pretrained(folder / "drafter", device=self.device, dtype=self.model.fc.weight.dtype)
        except (OSError, json.JSONDecodeError, SafetensorError, CheckpointError) as exc:
            raise CheckpointError(f"{folder}: cannot resume from this checkpoint ({exc})") from None
        if drafter.config.to_hf_dict() != self.model.config.to_hf_dict():
            raise CheckpointError(f"{folder}: checkpoint drafter config differs from this run's config")
        with torch.no_grad():
            self.model.load_state_dict(drafter.state_dict())
            for i, master in enumerate(self.master):
                master.copy_(tensors[f"master.{i}"])
                if f"exp_avg.{i}" in tensors:
                    self.optimizer.state[master] = {
                        "step": torch.tensor(meta["adam_step"]),
                        "exp_avg": tensors[f"exp_avg.{i}"].clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].clone(),
                    }
        self.step = int(meta["step"])
        return True
