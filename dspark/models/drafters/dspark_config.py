"""`DSparkConfig`: the drafter config of the released DSpark checkpoints (docs/design.md §7).

A released `config.json` is the target's config with the draft fields added: `architectures:
["Qwen3DSparkModel"]`, `num_hidden_layers` = draft layers, `num_target_layers`, `block_size`,
`target_layer_ids`, `mask_token_id`, `num_anchors`, `markov_rank`, `markov_head_type`,
`enable_confidence_head`, `confidence_head_with_markov`, `tie_word_embeddings: false`. A DFlash checkpoint
is the same with `markov_rank: 0` and no confidence head. dspark adds one optional field of its own,
`enable_greedy_confidence_head` (default false, so released checkpoints read unchanged): a second confidence
output trained on greedy acceptance (docs/design.md §2.4), read by requests at temperature 0. The draft
layers have the target's layer shapes, so the layer part is parsed with the target's own family rules
(`parse_decoder_config`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from dspark.errors import CheckpointError
from dspark.models.config import (
    DecoderConfig,
    architectures_field,
    bool_field,
    int_field,
    parse_decoder_config,
    str_field,
)
from dspark.models.drafters.heads import HEAD_TYPES

# Family (as parsed from model_type) -> the drafter architecture name written to config.json.
ARCHITECTURE_NAMES = {"qwen3": "Qwen3DSparkModel", "qwen2": "Qwen2DSparkModel", "llama": "LlamaDSparkModel"}
DRAFT_FIELDS = (
    "num_target_layers", "block_size", "target_layer_ids", "mask_token_id", "num_anchors", "markov_rank",
    "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "enable_greedy_confidence_head",
)


@dataclass(frozen=True)
class DSparkConfig:
    layers: DecoderConfig  # shapes of the draft layers (= the target's), num_layers = draft layers
    num_target_layers: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    enable_greedy_confidence_head: bool = False  # dspark's extension: the temperature-0 confidence output
    hf_config: dict | None = None  # the full config.json (target fields included), written back on save

    @property
    def is_dflash(self) -> bool:
        return self.markov_rank == 0

    @property
    def architecture(self) -> str:
        return ARCHITECTURE_NAMES[self.layers.family]

    def to_hf_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.hf_config or {})
        out.update(
            architectures=[self.architecture],
            num_hidden_layers=self.layers.num_layers,
            num_target_layers=self.num_target_layers,
            block_size=self.block_size,
            target_layer_ids=list(self.target_layer_ids),
            mask_token_id=self.mask_token_id,
            num_anchors=self.num_anchors,
            markov_rank=self.markov_rank,
            markov_head_type=self.markov_head_type,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            tie_word_embeddings=False,
        )
        if self.enable_greedy_confidence_head:
            out["enable_greedy_confidence_head"] = True
        else:
            out.pop("enable_greedy_confidence_head", None)
        return out


def parse_dspark_config(hf: dict[str, Any], where: str = "config.json") -> DSparkConfig:
    """Validate a drafter config.json (released layout) and build a `DSparkConfig`."""
    missing = [f for f in ("num_target_layers", "block_size", "target_layer_ids", "mask_token_id") if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"{where}: drafter field(s) {', '.join(missing)} missing (not a DSpark/DFlash checkpoint?)")
    architectures_field(hf, where)
    target_like = {k: v for k, v in hf.items() if k != "architectures"}
    target_like["tie_word_embeddings"] = False
    layers = parse_decoder_config(target_like, where)
    num_target_layers = int_field(hf, "num_target_layers", where)
    ids = hf["target_layer_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{where}: target_layer_ids must be a non-empty list of integers, got {ids!r}")
    if any(not -1 <= i < num_target_layers for i in ids) or any(a >= b for a, b in zip(ids, ids[1:])):
        raise CheckpointError(
            f"{where}: target_layer_ids {ids} must be strictly increasing in [-1, {num_target_layers - 1}] "
            "(-1 = embedding output)"
        )
    block = int_field(hf, "block_size", where)
    mask = int_field(hf, "mask_token_id", where, minimum=0)
    if mask >= layers.vocab_size:
        raise CheckpointError(f"{where}: mask_token_id {mask!r} is outside the vocabulary [0, {layers.vocab_size})")
    rank = int_field(hf, "markov_rank", where, default=0, minimum=0)
    head = str_field(hf, "markov_head_type", where, default="vanilla") or "vanilla"
    if head not in HEAD_TYPES:
        raise CheckpointError(f"{where}: markov_head_type {head!r} is not one of {', '.join(HEAD_TYPES)}")
    confidence = bool_field(hf, "enable_confidence_head", where, default=False)
    with_markov = bool_field(hf, "confidence_head_with_markov", where, default=False) and confidence
    if with_markov and rank == 0:
        raise CheckpointError(f"{where}: confidence_head_with_markov needs a Markov head (markov_rank > 0)")
    greedy = bool_field(hf, "enable_greedy_confidence_head", where, default=False)
    if greedy and not confidence:
        raise CheckpointError(f"{where}: enable_greedy_confidence_head needs enable_confidence_head (the greedy output "
                              "is a second confidence head beside the first)")
    return DSparkConfig(
        layers=layers,
        num_target_layers=num_target_layers,
        block_size=block,
        target_layer_ids=tuple(ids),
        mask_token_id=mask,
        num_anchors=int_field(hf, "num_anchors", where, default=512),
        markov_rank=rank,
        markov_head_type=head,
        enable_confidence_head=confidence,
        confidence_head_with_markov=with_markov,
        enable_greedy_confidence_head=greedy,
        hf_config=dict(hf),
    )
