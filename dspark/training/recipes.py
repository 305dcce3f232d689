"""What the training loop needs to know about each drafter kind: how to build it for a target, how many
supervised units a micro-batch holds (the loss denominator, summed over the whole step before any loss
is computed), and its loss (docs/design.md §2.5 for DSpark / DFlash, §2.7 for EAGLE-3 and MTP-1).

`supervised_units(loss_mask)` counts what one sample gives its loss to learn from (DSpark / DFlash: anchor
positions; EAGLE-3 / MTP-1: labels two or more tokens ahead), so data with nothing to supervise is refused
before training (`dspark.training.data_loading.check_supervision`).

A micro-batch is a dict of padded tensors: input_ids [N, S], loss_mask [N, S], features [N, S, L·H],
final_hidden [N, S, H], plus `sample_indices` (to seed per-sample anchor draws).
"""

from __future__ import annotations

import math

import torch

from dspark.models.drafters.dspark import DSparkModel, dspark_config_for_target, init_from_target
from dspark.models.drafters.eagle3 import Eagle3Model, eagle3_config_for_target, eagle3_ttt_loss, init_eagle3_from_target, ttt_supervision
from dspark.models.drafters.mtp import MTPModel, init_mtp_from_target, mtp_config_for_target, mtp_loss
from dspark.training.anchors import anchor_candidates, build_blocks, sample_anchor_positions
from dspark.training.config import TrainConfig, default_target_layer_ids
from dspark.training.losses import LossWeights, drafter_block_loss, position_weights


class DSparkRecipe:
    """DSpark and DFlash: anchors → blocks → masked backbone pass → chunked three-term (or CE) loss."""

    model_class = DSparkModel
    unit = "anchor positions (loss_mask[i] = loss_mask[i+1] = 1)"

    @staticmethod
    def supervised_units(loss_mask: torch.Tensor) -> int:
        """loss_mask [S] → the number of positions that can anchor a block."""
        return int(anchor_candidates(loss_mask).sum())

    def __init__(self, config: TrainConfig):
        self.config = config
        o = config.optim
        greedy = o.greedy_confidence_weight if config.model.greedy_confidence_head else 0.0
        self.weights = LossWeights(o.ce_weight, o.tv_weight, o.confidence_weight, o.position_decay, greedy)

    def build(self, target, seed: int):
        m = self.config.model
        layer_ids = m.target_layer_ids or default_target_layer_ids(target.config.num_layers)
        mask_id = target.config.vocab_size - 1 if m.mask_token_id is None else m.mask_token_id
        draft_config = dspark_config_for_target(
            target.hf_config, target_layer_ids=tuple(layer_ids), mask_token_id=mask_id,
            num_draft_layers=m.draft_layers, block_size=m.block_size, markov_rank=m.markov_rank,
            markov_head_type=m.markov_head_type, enable_confidence_head=m.confidence_head,
            greedy_confidence_head=m.greedy_confidence_head, num_anchors=self.config.data.num_anchors,
        )
        return init_from_target(draft_config, target.model, seed=seed, std=m.init_std)

    def prepare(self, batch: dict, epoch: int) -> None:
        """Draw anchors per sample (seeded by seed, epoch and sample index) and build the blocks."""
        t, d = self.config.train, self.config.data
        positions, valid = [], []
        for row, index in enumerate(batch["sample_indices"]):
            gen = torch.Generator().manual_seed((t.seed * 1_000_003 + epoch) * 10_000_019 + index)
            p, v = sample_anchor_positions(batch["loss_mask"][row : row + 1], d.num_anchors, gen)
            positions.append(p)
            valid.append(v)
        blocks = build_blocks(batch["input_ids"], batch["loss_mask"], torch.cat(positions), torch.cat(valid),
                              self.config.model.block_size)
        final = batch["final_hidden"]
        n, hidden = final.shape[0], final.shape[-1]
        rows = blocks.target_rows.view(n, -1, 1).expand(-1, -1, hidden).to(final.device)
        batch["blocks"] = blocks
        batch["block_target_hidden"] = final.gather(1, rows).view(*blocks.labels.shape, hidden)

    def denominator(self, batch: dict) -> torch.Tensor:
        return position_weights(batch["blocks"].supervised, self.weights.decay).sum()

    def loss(self, model, batch: dict, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
        blocks, device = batch["blocks"], batch["features"].device
        hidden = model.forward_train(batch["features"], blocks.anchor_positions.to(device),
                                     blocks.anchor_tokens.to(device), blocks.valid.to(device))
        flat = lambda x: x.flatten(0, 1).to(device)  # noqa: E731
        out = drafter_block_loss(
            model.heads, hidden.flatten(0, 1), flat(blocks.prev_tokens), flat(blocks.labels), flat(blocks.supervised),
            batch["block_target_hidden"].flatten(0, 1), model.lm_head.weight, weights=self.weights,
            denominator=denominator, chunk_blocks=self.config.train.chunk_blocks,
        )
        local = float(self.denominator(batch))  # ce/tv/conf come as shares of the global mean: make them local means
        scale = float(denominator) / local if local > 0 else 0.0
        stats = {"ce": float(out.ce) * scale, "tv": float(out.tv) * scale, "conf": float(out.conf) * scale,
                 "acceptance": out.acceptance_per_position.tolist()}
        if self.weights.greedy_conf > 0:
            stats["greedy_conf"] = float(out.greedy_conf) * scale
        if not math.isnan(float(out.expected_tau)):
            stats["expected_tau"] = float(out.expected_tau)
        return out.total, stats


class Eagle3Recipe:
    """EAGLE-3: training-time test over `block_size` unrolled steps, soft CE against the target, 0.8^k."""

    model_class = Eagle3Model
    unit = "supervised labels of the first test-time step (loss_mask[t] = 1 at t ≥ 2)"

    @staticmethod
    def supervised_units(loss_mask: torch.Tensor) -> int:
        """loss_mask [S] → supervised rows of the first unrolled step (later steps supervise a subset)."""
        return int(ttt_supervision(loss_mask.bool().unsqueeze(0), 1).sum())

    def __init__(self, config: TrainConfig):
        self.config = config

    def build(self, target, seed: int):
        m = self.config.model
        layer_ids = m.target_layer_ids or default_target_layer_ids(target.config.num_layers)
        draft_config = eagle3_config_for_target(target.hf_config, target_layer_ids=tuple(layer_ids), block_size=m.block_size)
        return init_eagle3_from_target(draft_config, target.model, seed=seed, std=m.init_std)

    def prepare(self, batch: dict, epoch: int) -> None:
        pass

    def denominator(self, batch: dict) -> torch.Tensor:
        steps = self.config.model.block_size
        return ttt_supervision(batch["loss_mask"], steps).flatten(1).sum(-1).float()

    def loss(self, model, batch: dict, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = model.forward_train(batch["features"], batch["input_ids"].to(batch["features"].device))
        out = eagle3_ttt_loss(logits, batch["final_hidden"], model.lm_head.weight, batch["loss_mask"].to(logits.device),
                              denominators=denominator)
        return out.total, {"step_loss": out.step_losses.tolist(), "acceptance": out.step_accuracy.tolist()}


class MTPRecipe:
    """MTP-1: one module predicting x_{t+2} from the target's last layer output at t and x_{t+1}."""

    model_class = MTPModel
    unit = "supervised labels two tokens ahead (loss_mask[t] = 1 at t ≥ 2)"

    @staticmethod
    def supervised_units(loss_mask: torch.Tensor) -> int:
        """loss_mask [..., S] → rows whose label x_{t+2} is supervised (the loss denominator)."""
        return int(loss_mask.bool()[..., 2:].sum())

    def __init__(self, config: TrainConfig):
        self.config = config

    def build(self, target, seed: int):
        m = self.config.model
        layer_ids = tuple(m.target_layer_ids) if m.target_layer_ids else None
        return init_mtp_from_target(mtp_config_for_target(target.hf_config, target_layer_ids=layer_ids),
                                    target.model, seed=seed, std=m.init_std)

    def prepare(self, batch: dict, epoch: int) -> None:
        pass

    def denominator(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(self.supervised_units(batch["loss_mask"])))

    def loss(self, model, batch: dict, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = model.forward_train(batch["features"], batch["input_ids"].to(batch["features"].device))
        out = mtp_loss(logits, batch["input_ids"].to(logits.device), batch["loss_mask"].to(logits.device),
                       denominator=denominator)
        return out.total, {"ce": float(out.ce), "acceptance": [float(out.accuracy)]}


RECIPES = {"dspark": DSparkRecipe, "dflash": DSparkRecipe, "eagle3": Eagle3Recipe, "mtp": MTPRecipe}
