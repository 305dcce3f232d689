"""The drafter training loop (docs/design.md §2.5–2.6), readable top to bottom.

One optimizer step = `batch_size` sequences over all processes, split into micro-batches of
`micro_batch_size` per process (gradient accumulation). For each micro-batch: target features come from
the frozen target in this process (online) or from a feature cache; the drafter kind's recipe
(`dspark.training.recipes`: DSpark / DFlash, EAGLE-3, MTP-1) derives its inputs — for DSpark, anchors drawn
per sequence from a generator seeded by (seed, epoch, sample index), so the draw does not depend on which
process runs the sample — and computes its loss as a mean whose denominator is summed over the whole step
(all micro-batches, all processes) first.

Precision: gradients accumulate in float32 master buffers; with `train.dtype: bfloat16` the parameters are
stored in bf16 and AdamW updates float32 master copies that are cast back after each step.
Data parallelism (torchrun), `train.parallel`:
- `ddp`: every process holds a replica wrapped in DistributedDataParallel; micro-batches but the last of a
  step run under `no_sync()`, so gradients cross processes once per step. A DDP communication hook makes
  that reduction a float32 *sum* into the float32 accumulators (the loss already divides by the global
  denominator; bf16 parameters never get bf16 gradient reductions).
- `fsdp`: FSDP2 (`fully_shard`) shards the trainable parameters (each DSpark / DFlash draft layer, then
  the rest) as float32 masters; bf16 compute copies are gathered per unit, gradients reduce-scattered
  (summed, float32) after every micro-batch and AdamW runs on the shards. The frozen embedding and LM head
  stay unsharded.
One process ignores `train.parallel` (nothing to distribute): it trains exactly as without torchrun.
Checkpoints (every `checkpoint_every` steps and at the end) are written atomically by
`dspark.training.checkpoints` as output_dir/step_N: a loadable drafter folder plus
`trainer_state.safetensors` / `trainer_state.json` (optimizer moments, master weights, RNG, step);
`latest` names the newest one and a restarted run resumes from it (or from the newest complete step_N when
`latest` is lost); `train.keep_last` bounds how many are kept. No pickle anywhere. They hold full
(unsharded) tensors whatever the parallelism, so any run, with any number of processes or either mode,
resumes from any of them.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dspark.config import to_dict
from dspark.devices import resolve_device
from dspark.errors import CheckpointError, ConfigError
from dspark.models.checkpoint import save_safetensors
from dspark.models.target_runner import TargetRunner
from dspark.training.checkpoints import CheckpointFolder, stderr_note
from dspark.training.config import TrainConfig

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # shared with the target, never trained (docs/design.md §2.2)
CHECKPOINT_FILES = ("drafter/config.json", "drafter/model.safetensors", "trainer_state.safetensors",
                    "trainer_state.json")  # what a complete step_N holds


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


class RecipeLoss(nn.Module):
    """A drafter kind's loss as one module `forward`: DDP and FSDP act around `forward` calls, while the
    recipes call several model methods (forward_train, heads, lm_head)."""

    def __init__(self, recipe, model: nn.Module):
        super().__init__()
        self.recipe = recipe
        self.model = model

    def forward(self, batch: dict, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.recipe.loss(self.model, batch, denominator)


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
        self.device = resolve_device(t.device, "train.device")
        self.target = target or TargetRunner.from_pretrained(config.model.target, device=self.device)
        if not self.target.hf_config:
            raise ConfigError("the target must be loaded from a model folder: its config.json seeds the drafter's")
        from dspark.training.recipes import RECIPES

        self.recipe = RECIPES[config.model.drafter](config)
        self.param_dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
        self.model = self.recipe.build(self.target, t.seed).to(device=self.device, dtype=self.param_dtype).train()
        if config.model.init_from:  # a resumed checkpoint, when there is one, replaces these weights in fit()
            from dspark.models.drafters.common import warm_start

            warm_start(self.model, config.model.init_from)
        if hasattr(samples, "validate"):  # a feature cache: it must match this target and these layers
            samples.validate(self.model.config.target_layer_ids, self.target.config.hidden_size, config.model.target)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in FROZEN)
        self.loss_fn: nn.Module = RecipeLoss(self.recipe, self.model)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.sharded = self.world > 1 and t.parallel == "fsdp"
        if self.sharded:
            self._fully_shard()
        elif self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.loss_fn)
            self.ddp.register_comm_hook(None, self._sum_bucket_into_accumulators)
            self.loss_fn = self.ddp
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if n not in FROZEN]
        if self.sharded:  # the float32 shards are the master weights; FSDP accumulates their gradients
            self.master, self.grads = [p for _, p in self.trainable], []
        else:
            self.master = [p.detach().float().clone() for _, p in self.trainable]
            self.grads = [torch.zeros_like(m) for m in self.master]
            self._accumulators = {p: acc for (_, p), acc in zip(self.trainable, self.grads)}
        o = config.optim
        for m in self.master:
            m.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.master, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.steps_per_epoch = len(samples) // t.batch_size
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.step = 0
        self.output = Path(t.output_dir)
        self.checkpoints = CheckpointFolder(self.output, CHECKPOINT_FILES, t.keep_last,
                                            stderr_note("dspark train") if self.rank == 0 else lambda _: None)
        self.resumed_from: Path | None = None
        self.writer = None

    # -- data parallelism ----------------------------------------------------------------------------
    def _fully_shard(self) -> None:
        """FSDP2 over all processes: every draft layer the training pass calls through `forward_dense`
        (DSpark / DFlash) is one unit, the remaining trainable parameters one root unit (EAGLE-3 and MTP:
        a single layer whose parts the training pass uses directly, so everything is in the root). The
        frozen embedding and LM head are left out (replicated, as the target itself is). Sharded parameters
        are float32 — they are the master weights —, computed in `train.dtype`, gradients summed in float32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name not in FROZEN:
                    param.data = param.data.float()
        mesh = init_device_mesh(self.device.type, (self.world,))
        compute = None if self.param_dtype == torch.float32 else self.param_dtype
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for layer in getattr(self.model, "layers", ()):
            if hasattr(layer, "forward_dense"):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
                register_fsdp_forward_method(layer, "forward_dense")
        frozen = {p for name, p in self.model.named_parameters() if name in FROZEN}
        fully_shard(self.loss_fn, mesh=mesh, mp_policy=policy, ignored_params=frozen)
        for module in self.loss_fn.modules():  # sum, not average: the loss already has the global denominator
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)

    def _sum_bucket_into_accumulators(self, _state, bucket):
        """DDP communication hook, run on the last micro-batch of a step: (float32 accumulator of the
        earlier micro-batches + this bucket's gradients) summed over processes, in float32, into the
        accumulators. The bucket itself comes back unchanged and is discarded by `train_step`."""
        accs = [self._accumulators[p] for p in bucket.parameters()]
        flat = torch.cat([(acc + grad.float()).flatten() for acc, grad in zip(accs, bucket.gradients())])

        def unpack(_future):
            for acc, summed in zip(accs, flat.split([acc.numel() for acc in accs])):
                acc.copy_(summed.view_as(acc))
            return bucket.buffer()

        return dist.all_reduce(flat, async_op=True).get_future().then(unpack)

    def _full(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor (on rank 0's CPU for a shard; None on other ranks). Collective for a shard."""
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
            return tensor.cpu() if self.rank == 0 else None
        return tensor.detach()

    @staticmethod
    def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`full` placed as `like` is: this process's shard of it for a DTensor (no communication)."""
        full = full.to(like.device)
        if isinstance(like, DTensor):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full.clone()

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
        """One micro-batch, padded to its longest sequence: input_ids, loss_mask [N, S], target features
        [N, S, L·H] and final hidden states [N, S, H] (from the feature cache or computed online), plus
        whatever the drafter's recipe derives from them (DSpark: anchors and blocks)."""
        d = self.config.data
        seqs = [self.samples[i] for i in indices]
        ids = [s.input_ids[: d.max_length] for s in seqs]
        masks = [s.loss_mask[: d.max_length].bool() for s in seqs]
        if all(hasattr(s, "features") for s in seqs):  # from the feature cache
            seq_feats = [s.features[: d.max_length].to(self.device) for s in seqs]
            seq_final = [s.final_hidden[: d.max_length].to(self.device) for s in seqs]
        else:  # online: the frozen target in this process
            handles = [self.target.new_sequence() for _ in seqs]
            try:
                out = self.target.forward(handles, ids, all_logits=False, return_final_hidden=True,
                                          feature_layer_ids=self.model.config.target_layer_ids)
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
        batch = dict(
            input_ids=input_ids, loss_mask=loss_mask, sample_indices=list(indices),
            features=feats.clone().to(self.device, self.param_dtype),
            final_hidden=final.clone().to(self.device, self.param_dtype),
        )
        self.recipe.prepare(batch, epoch)
        return batch

    # -- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        t = self.config.train
        indices, epoch = self._my_samples(self.step)
        micro = [self._prepare(indices[i : i + t.micro_batch_size], epoch) for i in range(0, len(indices), t.micro_batch_size)]
        denominator = sum(self.recipe.denominator(mb) for mb in micro)
        denominator = self._all_reduce(torch.as_tensor(denominator, dtype=torch.float32).clone().to(self.device))
        total = 0.0
        logged: dict[str, list] = {}
        for index, mb in enumerate(micro):
            synced = self.ddp is not None and index == len(micro) - 1  # DDP's hook sums into the accumulators
            with self.ddp.no_sync() if self.ddp is not None and not synced else nullcontext():
                loss, stats = self.loss_fn(mb, denominator)
                if not loss.requires_grad:  # nothing supervised in this micro-batch (e.g. no anchor position)
                    loss = loss + sum(p.sum() for _, p in self.trainable) * 0.0  # zero gradients, same collectives
                loss.backward()
            if not self.sharded:  # (FSDP accumulates the shards' float32 gradients itself)
                for acc, (_, p) in zip(self.grads, self.trainable):
                    if p.grad is not None:
                        if not synced:
                            acc += p.grad.float()
                        p.grad = None
            total += float(loss.detach())
            for key, value in stats.items():
                logged.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float64))
        result = self._apply_gradients()
        self.step += 1
        result["loss"] = float(self._all_reduce(torch.tensor(total, device=self.device)))
        for key, values in logged.items():  # per-micro-batch means, averaged over micro-batches and processes
            mean = self._all_reduce(torch.stack(values).mean(0).to(self.device)) / self.world
            result[key] = mean.tolist()
        return result

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _apply_gradients(self) -> dict:
        """Clip (global norm: over all shards under FSDP), AdamW step on the float32 masters, then refresh
        the replicas' parameters (FSDP: the shards are the parameters, only their gradients are dropped)."""
        o = self.config.optim
        if not self.sharded:
            for master, acc in zip(self.master, self.grads):
                master.grad = acc
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, o.grad_clip if o.grad_clip > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = lr_at(self.step, self.total_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.sharded:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                for (_, p), master, acc in zip(self.trainable, self.master, self.grads):
                    p.copy_(master.to(p.dtype))
                    acc.zero_()
        return {"lr": lr, "grad_norm": float(grad_norm)}

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.config.train
        if self.rank == 0:
            self.checkpoints.remove_stale()
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
                progress.set_postfix(loss=f"{stats['loss']:.4f}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log(stats)
            if self.step % t.checkpoint_every == 0 or self.step == self.total_steps:
                last = self.save_checkpoint()
        if self.rank == 0:
            progress.close()
            self.writer.close()
        return last or self.resumed_from

    def _log(self, stats: dict) -> None:
        """Scalars as train/<name>; per-position lists as train/<name>@k (e.g. teacher-forced acceptance)."""
        for key, value in stats.items():
            if isinstance(value, list):
                for k, item in enumerate(value):
                    self.writer.add_scalar(f"train/{key}@{k}", item, self.step)
            else:
                self.writer.add_scalar(f"train/{key}", value, self.step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Rank 0 writes `step_<N>/` (drafter folder + trainer state) atomically, then `latest`. Under FSDP
        every process first takes part in gathering each tensor whole (one at a time, onto rank 0's CPU),
        so the checkpoint has the same layout as a single-process one."""
        folder = self.checkpoints.folder(self.step)
        tensors = {}
        for i, (master, state) in enumerate(zip(self.master, (self.optimizer.state.get(m, {}) for m in self.master))):
            tensors[f"master.{i}"] = self._full(master)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"{key}.{i}"] = self._full(state[key])
        if self.rank == 0:
            steps = [float(self.optimizer.state[m]["step"]) for m in self.master if m in self.optimizer.state]
            meta = {"step": self.step, "adam_step": steps[0] if steps else 0.0, "world_size": self.world,
                    "total_steps": self.total_steps, "config": to_dict(self.config), "time": time.time()}

            def write(tmp: Path) -> None:
                if self.sharded:
                    self._save_gathered_drafter(tmp / "drafter", [tensors[f"master.{i}"] for i in range(len(self.master))])
                else:
                    self.model.save_pretrained(tmp / "drafter", with_target_tensors=self.config.train.save_target_tensors)
                save_safetensors(tensors, tmp / "trainer_state.safetensors")
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")

            self.checkpoints.save(self.step, write)
        if self.world > 1:
            dist.barrier()
        return folder

    def _save_gathered_drafter(self, folder: Path, masters: list[torch.Tensor]) -> None:
        """Rank 0 under FSDP: the drafter folder from the gathered masters (in `train.dtype`) and the
        unsharded frozen tensors, written by an unsharded copy of the drafter class."""
        state = dict(self.model.state_dict())
        for (name, _), master in zip(self.trainable, masters):
            state[name] = master.to(self.param_dtype)
        with torch.device("meta"):
            whole = type(self.model)(self.model.config)
        whole.load_state_dict(state, assign=True)
        whole.save_pretrained(folder, with_target_tensors=self.config.train.save_target_tensors)

    def resume(self) -> bool:
        """Continue from the checkpoint `CheckpointFolder.resume_point` picks. Returns whether one was loaded."""
        folder = self.checkpoints.resume_point()
        if folder is None:
            return False
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / "trainer_state.json").read_text())
            tensors = load_file(str(folder / "trainer_state.safetensors"))
            drafter = self.recipe.model_class.from_pretrained(folder / "drafter", device=self.device, dtype=self.param_dtype,
                                                              target=self.config.model.target)
        except (OSError, json.JSONDecodeError, SafetensorError, CheckpointError) as exc:
            raise CheckpointError(f"{folder}: cannot resume from this checkpoint ({exc})") from None
        if drafter.config.to_hf_dict() != self.model.config.to_hf_dict():
            raise CheckpointError(f"{folder}: checkpoint drafter config differs from this run's config")
        missing = [f"master.{i}" for i in range(len(self.master)) if f"master.{i}" not in tensors]
        if missing:
            raise CheckpointError(f"{folder}: trainer state lacks {', '.join(missing[:3])} (another drafter's checkpoint?)")
        with torch.no_grad():
            if self.sharded:  # the frozen tensors here; the sharded parameters are the masters below
                full = drafter.state_dict()
                for name, param in self.model.named_parameters():
                    if name in FROZEN:
                        param.copy_(full[name])
            else:
                self.model.load_state_dict(drafter.state_dict())
            for i, master in enumerate(self.master):
                master.copy_(self._like(tensors[f"master.{i}"], master))
                if f"exp_avg.{i}" in tensors:
                    self.optimizer.state[master] = {
                        "step": torch.tensor(meta["adam_step"]),
                        "exp_avg": self._like(tensors[f"exp_avg.{i}"], master),
                        "exp_avg_sq": self._like(tensors[f"exp_avg_sq.{i}"], master),
                    }
        self.step = int(meta["step"])
        self.resumed_from = folder
        return True
