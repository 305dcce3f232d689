"""`DecoderConfig`: the typed, validated description of a Llama-family decoder, parsed from an HF
`config.json`. Family-specific switches (bias layout, q/k norm) come from `dspark.models.families`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark.errors import CheckpointError, UnsupportedModelError
from dspark.models.rope import SUPPORTED_ROPE_TYPES, RopeConfig


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and switches of one pre-norm decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.exists():
        raise CheckpointError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"model path is not a folder: {folder}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model folder needs config.json and *.safetensors)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data


def _require(hf: dict[str, Any], key: str, kind: type, where: str, positive: bool = True) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{where}: required field '{key}' is missing")
    value = hf[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise CheckpointError(f"{where}: field '{key}' must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: field '{key}' must be a number, got {value!r}")
    if positive and value <= 0:
        raise CheckpointError(f"{where}: field '{key}' must be positive, got {value!r}")
    return value


def parse_rope(hf: dict[str, Any], where: str) -> RopeConfig:
    """Normalise `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling` (older)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: 'rope_parameters'/'rope_scaling' must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"{where}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "sequence-length-dependent RoPE (dynamic, longrope) would make verification lossy"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"{where}: partial_rotary_factor={partial} is not supported")
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    for key in needs.get(rope_type, ()):
        if params.get(key) is None:
            raise CheckpointError(f"{where}: rope_type {rope_type!r} needs '{key}' in its RoPE parameters")
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=None if params.get("factor") is None else float(params["factor"]),
        original_max_position_embeddings=original,
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_decoder_config(hf: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """Validate an HF config dict and turn it into a `DecoderConfig` for the matching family."""
    from dspark.models.families import family_for_config

    family = family_for_config(hf, where)
    unsupported = family.unsupported_reason(hf)
    if unsupported:
        raise UnsupportedModelError(f"{where}: {unsupported}")
    hidden = _require(hf, "hidden_size", int, where)
    heads = _require(hf, "num_attention_heads", int, where)
    kv_heads = hf.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(f"{where}: num_key_value_heads={kv_heads!r} must divide num_attention_heads={heads}")
    head_dim = hf.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise CheckpointError(f"{where}: head_dim={head_dim!r} must be a positive even integer")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (only SwiGLU/silu)")
    return DecoderConfig(
        family=family.name,
        vocab_size=_require(hf, "vocab_size", int, where),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size", int, where),
        num_layers=_require(hf, "num_hidden_layers", int, where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_require(hf, "max_position_embeddings", int, where),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family.tie_word_embeddings_default)),
        rope=parse_rope(hf, where),
        qkv_bias=family.qkv_bias(hf),
        o_bias=family.o_bias(hf),
        mlp_bias=family.mlp_bias(hf),
        qk_norm=family.qk_norm,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
    )
