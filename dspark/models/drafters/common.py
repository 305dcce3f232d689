"""Pieces every trained drafter shares: checkpoint folders (config.json + model.safetensors, written
atomically, read with safetensors only), the frozen-parameter convention, initialisation from a target,
and the float32-or-wider dtype used for logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dspark.devices import resolve_device, resolve_dtype
from dspark.errors import CheckpointError, RequestError
from dspark.models.checkpoint import (
    IndexExpectation,
    check_index,
    load_state_into,
    read_tensor_index,
    save_folder_atomically,
    save_safetensors,
)
from dspark.models.config import read_config_json

FROZEN_PREFIXES = ("embed_tokens.", "lm_head.")  # copies of the target's, never trained (docs/design.md §2.2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 tensors, float64 for float64 (logits, softmax statistics)."""
    return torch.promote_types(dtype, torch.float32)


class DraftCheckpointMixin:
    """`from_pretrained` / `save_pretrained` for a drafter module with `config.to_hf_dict()` and a
    `parse_config(hf, where)` static method; plus the parameters a trainer may update."""

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device="auto", dtype=None):
        folder = Path(folder)
        device = resolve_device(device)
        where = str(folder / "config.json")
        config = cls.parse_config(read_config_json(folder), where=where)
        torch_dtype = resolve_dtype(dtype, device)
        index = read_tensor_index(folder)
        check_index(index, cls.index_expectation(config), folder, where)
        with torch.device("meta"):
            model = cls(config)
        load_state_into(model, folder, dtype=torch_dtype, device=device, index=index)
        return model

    @classmethod
    def index_expectation(cls, config) -> IndexExpectation:
        """What the config fixes about the checkpoint before the model is built: draft layers
        `layers.{i}.` for i < config.layers.num_layers, the embedding [V, H], layer 0's q_proj [heads·D, H]."""
        c = config.layers
        return IndexExpectation("layers.", c.num_layers, {
            "embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "layers.0.self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
        })

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors atomically; returns the folder."""
        state = self.state_dict()

        def write(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
            save_safetensors(state, tmp / "model.safetensors")

        folder = Path(folder)
        save_folder_atomically(folder, write)
        return folder

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the frozen embedding and LM head (copies of the target's)."""
        return [p for name, p in self.named_parameters() if not name.startswith(FROZEN_PREFIXES)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Layer output o [..., H] (before the final norm) → logits [..., V] in float32 (float64 for float64)."""
        return self.lm_head(self.norm(hidden)).to(compute_dtype(hidden.dtype))


def init_draft_weights(model: nn.Module, target, *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Initialise a freshly built one-layer drafter for `target` (a `DecoderModel`), in the target's dtype and
    device: trainable weights ~ N(0, std²), norms 1, biases 0; embedding and LM head copied from the target."""
    param = next(target.parameters())
    model = model.to(device=param.device, dtype=param.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name.endswith(".bias"):
                tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
        model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        model.lm_head.weight.copy_(target.output_embeddings())
    return model.eval()




WARM_START_FIELDS = ("architectures", "block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type")
IDENTITY_AT_START = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # zeroed: a residual block adds nothing


def warm_start(model: nn.Module, folder: str | Path) -> dict:
    """Start a freshly built drafter from checkpoint `folder` (docs/design.md §2.6, "growing a drafter").

    Every tensor of the checkpoint must exist in `model` with the same shape, and the checkpoint's
    WARM_START_FIELDS must equal the model's, else CheckpointError naming the difference. Draft layers
    beyond the checkpoint's depth start as the identity (their attention output and MLP down projections
    zeroed, so the deeper drafter first computes exactly what the checkpoint did); a greedy confidence head
    the checkpoint lacks starts as a copy of its confidence head. Returns {"loaded": n, "new": [names]}.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    hf = read_config_json(folder)
    mine = model.config.to_hf_dict()
    differ = [f"{k} {hf.get(k)!r} vs {mine.get(k)!r}" for k in WARM_START_FIELDS if k in mine and hf.get(k) != mine.get(k)]
    if differ:
        raise CheckpointError(f"model.init_from {folder}: the checkpoint was built differently: {'; '.join(differ)}")
    state = load_file(str(folder / "model.safetensors"))
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name not in params:
            raise CheckpointError(f"model.init_from {folder}: tensor {name} has no place in this drafter "
                                  "(another drafter kind?)")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"model.init_from {folder}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"this drafter {tuple(params[name].shape)}")
    new = [name for name in params if name not in state]
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
        for name in new:
            source = name.replace("greedy_confidence_head.", "confidence_head.", 1)
            if name.startswith("greedy_confidence_head.") and source in state:
                params[name].copy_(state[source])
            elif name.startswith("layers.") and name.endswith(IDENTITY_AT_START):
                params[name].zero_()
    return {"loaded": len(state), "new": new}


def check_drafter_target(name: str, drafter_config, target_config) -> None:
    """Refuse a target this drafter was not built for: vocabulary, hidden size, number of target layers.
    `drafter_config` has `.layers` (the draft layers' `DecoderConfig`) and `.num_target_layers`."""
    c = drafter_config
    problems = []
    if target_config.vocab_size != c.layers.vocab_size:
        problems.append(f"vocab_size {c.layers.vocab_size} vs target {target_config.vocab_size}")
    if target_config.hidden_size != c.layers.hidden_size:
        problems.append(f"hidden_size {c.layers.hidden_size} vs target {target_config.hidden_size}")
    if target_config.num_layers != c.num_target_layers:
        problems.append(f"num_target_layers {c.num_target_layers} vs target's {target_config.num_layers} layers")
    if problems:
        raise CheckpointError(f"drafter '{name}' was built for another target: {'; '.join(problems)}")


def context_handle(drafter, cache, handles: dict[int, int], item) -> int:
    """`item`'s handle in the drafter's own paged cache (created on first use), after checking that the
    cached context plus the item's new feature rows end right before the anchor. Raises RequestError."""
    if item.new_features is None:
        raise RequestError(f"drafter '{drafter.name}' needs target features (layers {drafter.feature_layer_ids})")
    handle = handles.get(item.seq_id)
    if handle is None:
        handle = handles[item.seq_id] = cache.new_sequence()
    seen, n_new = cache.length(handle), item.new_features.shape[0]
    if seen + n_new != len(item.token_ids) - 1:
        raise RequestError(
            f"sequence {item.seq_id}: drafter context ({seen} + {n_new} positions) does not end right "
            f"before the anchor (position {len(item.token_ids) - 1})"
        )
    return handle
