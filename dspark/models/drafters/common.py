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
    iter_tensors,
    load_state_into,
    read_tensor_index,
    save_folder_atomically,
    save_safetensors,
)
from dspark.models.config import read_config_json

FROZEN_PREFIXES = ("embed_tokens.", "lm_head.")  # copies of the target's, never trained (docs/design.md §2.2)
TARGET_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# config.json flag of a folder saved without TARGET_TENSORS (not in the released layout): they are the
# target's, bound at load (`bind_target_tensors`); a Qwen3-4B drafter is then 1.6 GB smaller on disk and
# its copies take no device memory.
SHARES_TARGET_FIELD = "dspark_shares_target_embeddings"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 tensors, float64 for float64 (logits, softmax statistics)."""
    return torch.promote_types(dtype, torch.float32)


class DraftCheckpointMixin:
    """`from_pretrained` / `save_pretrained` for a drafter module with `config.to_hf_dict()` and a
    `parse_config(hf, where)` static method; plus the parameters a trainer may update."""

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device="auto", dtype=None, target=None):
        """Load a drafter folder. `target` (a `DecoderModel`, e.g. `TargetRunner.model`, or the target's
        folder): needed for a folder saved without the target's embedding and LM head, which are then bound
        from it (`bind_target_tensors`); ignored for the released layout, which carries copies."""
        folder = Path(folder)
        device = resolve_device(device)
        where = str(folder / "config.json")
        hf = read_config_json(folder)
        shared = hf.pop(SHARES_TARGET_FIELD, False)  # a property of the folder, not of the drafter's config
        config = cls.parse_config(hf, where=where)
        if not isinstance(shared, bool):
            raise CheckpointError(f"{where}: {SHARES_TARGET_FIELD} must be true or false, got {shared!r}")
        torch_dtype = resolve_dtype(dtype, device)
        index = read_tensor_index(folder)
        check_index(index, cls.index_expectation(config, with_target_tensors=not shared), folder, where)
        with torch.device("meta"):
            model = cls(config)
        if not shared:
            load_state_into(model, folder, dtype=torch_dtype, device=device, index=index)
            return model
        if target is None:
            raise CheckpointError(f"{folder}: this drafter was saved without its target's embedding and LM head "
                                  f"({SHARES_TARGET_FIELD}); load it together with its target")
        stored = [name for name in TARGET_TENSORS if name in index]
        if stored:
            raise CheckpointError(f"{folder}: {SHARES_TARGET_FIELD} is true but the checkpoint holds {', '.join(stored)}")
        model.embed_tokens, model.lm_head = None, None  # not materialised: the target's are bound below
        load_state_into(model, folder, dtype=torch_dtype, device=device, index=index)
        bind_target_tensors(model, target, where=str(folder))
        return model

    @classmethod
    def index_expectation(cls, config, with_target_tensors: bool = True) -> IndexExpectation:
        """What the config fixes about the checkpoint before the model is built: draft layers
        `layers.{i}.` for i < config.layers.num_layers, layer 0's q_proj [heads·D, H] and, in the released
        layout, the embedding [V, H]."""
        c = config.layers
        shapes = {"layers.0.self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size)}
        if with_target_tensors:
            shapes["embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
        return IndexExpectation("layers.", c.num_layers, shapes)

    def save_pretrained(self, folder: str | Path, *, with_target_tensors: bool = True) -> Path:
        """Write config.json + model.safetensors atomically; returns the folder. with_target_tensors=False
        leaves out the embedding and LM head (the target's; `from_pretrained(..., target=)` binds them)."""
        state = self.state_dict()
        config = self.config.to_hf_dict()
        config.pop(SHARES_TARGET_FIELD, None)
        if not with_target_tensors:
            state = {k: v for k, v in state.items() if k not in TARGET_TENSORS}
            config[SHARES_TARGET_FIELD] = True
        elif state["lm_head.weight"].data_ptr() == state["embed_tokens.weight"].data_ptr():
            state["lm_head.weight"] = state["lm_head.weight"].clone()  # bound to a tied target: two tensors on disk

        def write(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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


def bind_target_tensors(model: nn.Module, target, *, where: str) -> None:
    """Make `model.embed_tokens` / `model.lm_head` the target's embedding and output embedding. `target`: a
    `DecoderModel` (its tensors are shared, no copy; same dtype and device required) or the target's folder
    (those two tensors are read from its safetensors, in the drafter's dtype and device). CheckpointError
    naming the difference when they do not fit the drafter."""
    own = next(p for p in model.parameters())
    expected = (model.config.layers.vocab_size, model.config.layers.hidden_size)
    if isinstance(target, (str, Path)):
        embedding, head = _read_target_tensors(Path(target), own.dtype, own.device)
    else:
        embedding, head = target.model.embed_tokens.weight, target.output_embeddings()
    for name, tensor in (("embedding", embedding), ("LM head", head)):
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{where}: the target's {name} is {tuple(tensor.shape)}, the drafter needs {expected}")
        if tensor.dtype != own.dtype or tensor.device != own.device:
            raise CheckpointError(f"{where}: the target's {name} is {tensor.dtype} on {tensor.device}, the drafter is "
                                  f"{own.dtype} on {own.device}; load both in the same dtype and device")
    with torch.device("meta"):
        model.embed_tokens = nn.Embedding(*expected)
        model.lm_head = nn.Linear(expected[1], expected[0], bias=False)
    model.embed_tokens.weight = _as_parameter(embedding)
    model.lm_head.weight = _as_parameter(head)


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _read_target_tensors(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, output embedding) from a target folder: `model.embed_tokens.weight` and `lm_head.weight`
    (the embedding again when the target ties them)."""
    index = read_tensor_index(folder)
    names = {"model.embed_tokens.weight", "lm_head.weight"} & set(index)
    if "model.embed_tokens.weight" not in names:
        raise CheckpointError(f"{folder}: no model.embed_tokens.weight; not a target model folder")
    tensors = {name: tensor.to(device=device, dtype=dtype) for name, _, tensor in iter_tensors(index, names)}
    embedding = tensors["model.embed_tokens.weight"]
    return embedding, tensors.get("lm_head.weight", embedding)


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
