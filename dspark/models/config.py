"""`DecoderConfig`: the typed, validated description of a Llama-family decoder, parsed from an HF
`config.json`. Family-specific switches (bias layout, q/k norm) come from `dspark.models.families`.
"""

from __future__ import annotations

import json
import math
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
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (UTF-8); CheckpointError naming the file when it is unreadable, not
    JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data


# -- typed fields: each returns the value or `default` when the key is absent or null, else raises a
#    CheckpointError naming the field and the file. JSON types are required as written (no "8" for 8,
#    no 1 for true). `label` names the field in messages (default: the key).
_REQUIRED = object()


def _absent(data: dict[str, Any], key: str, default: Any, where: str, label: str) -> bool:
    if data.get(key) is not None:
        return False
    if default is _REQUIRED:
        raise CheckpointError(f"{where}: required field '{label}' is missing")
    return True


def int_field(data: dict[str, Any], key: str, where: str, *, default: Any = _REQUIRED, minimum: int | None = 1,
              label: str | None = None) -> Any:
    """An integer ≥ `minimum` (None: any integer)."""
    label = label or key
    if _absent(data, key, default, where, label):
        return default
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: field '{label}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        rule = "positive" if minimum == 1 else f"≥ {minimum}"
        raise CheckpointError(f"{where}: field '{label}' must be {rule}, got {value!r}")
    return value


def number_field(data: dict[str, Any], key: str, where: str, *, default: Any = _REQUIRED, above: float = 0.0,
                 allow_equal: bool = False, label: str | None = None) -> Any:
    """A finite real number > `above` (≥ with `allow_equal`), as a float."""
    label = label or key
    if _absent(data, key, default, where, label):
        return default
    value = data[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{where}: field '{label}' must be a number, got {value!r}")
    ok = math.isfinite(value) and (value >= above if allow_equal else value > above)
    if not ok:
        rule = f"{'≥' if allow_equal else '>'} {above:g}"
        raise CheckpointError(f"{where}: field '{label}' must be a finite number {rule}, got {value!r}")
    return float(value)


def bool_field(data: dict[str, Any], key: str, where: str, *, default: Any = _REQUIRED, label: str | None = None) -> Any:
    """A JSON boolean (true/false)."""
    label = label or key
    if _absent(data, key, default, where, label):
        return default
    value = data[key]
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: field '{label}' must be true or false, got {value!r}")
    return value


def str_field(data: dict[str, Any], key: str, where: str, *, default: Any = _REQUIRED, label: str | None = None) -> Any:
    """A JSON string."""
    label = label or key
    if _absent(data, key, default, where, label):
        return default
    value = data[key]
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: field '{label}' must be a string, got {value!r}")
    return value


def architectures_field(data: dict[str, Any], where: str) -> list[str]:
    """`architectures`: a list of strings ([] when absent or null)."""
    value = data.get("architectures")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise CheckpointError(f"{where}: field 'architectures' must be a list of strings, got {value!r}")
    return value


def token_ids_field(data: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    """A token id (integer ≥ 0) or a list of them; () when absent or null."""
    value = data.get(key)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where}: field '{key}' must be a token id (integer ≥ 0) or a list of them, got {value!r}")
    return tuple(values)


# Boolean switches of the families' configs, checked before any family reads them.
BOOLEAN_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")


def parse_rope(hf: dict[str, Any], where: str) -> RopeConfig:
    """Normalise `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling` (older).

    rope_theta must be a finite number > 1; factors and betas finite and > 0; mscales ≥ 0."""
    source = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(source) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: 'rope_parameters'/'rope_scaling' must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"{where}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "sequence-length-dependent RoPE (dynamic, longrope) would make verification lossy"
        )
    theta = number_field(params, "rope_theta", where, default=None, above=1.0, label=f"{source}.rope_theta")
    if theta is None:
        theta = number_field(hf, "rope_theta", where, default=10000.0, above=1.0)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0) or isinstance(partial, bool):
        raise UnsupportedModelError(f"{where}: partial_rotary_factor={partial} is not supported")
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    for key in needs.get(rope_type, ()):
        if params.get(key) is None:
            raise CheckpointError(f"{where}: rope_type {rope_type!r} needs '{key}' in its RoPE parameters")
    factors = {key: number_field(params, key, where, default=None, label=f"{source}.{key}") for key in _ROPE_NUMBERS}
    mscales = {key: number_field(params, key, where, default=None, allow_equal=True, label=f"{source}.{key}")
               for key in ("mscale", "mscale_all_dim")}
    if rope_type == "llama3" and factors["high_freq_factor"] <= factors["low_freq_factor"]:
        raise CheckpointError(f"{where}: {source}.high_freq_factor must be greater than low_freq_factor, got "
                              f"{factors['high_freq_factor']} ≤ {factors['low_freq_factor']}")
    original = int_field(params, "original_max_position_embeddings", where, default=None,
                         label=f"{source}.original_max_position_embeddings")
    if original is None:
        original = int_field(hf, "original_max_position_embeddings", where, default=None)
    # Absent → true; null → false (as transformers reads it).
    truncate = "truncate" not in params or bool_field(params, "truncate", where, default=False, label=f"{source}.truncate")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        original_max_position_embeddings=original,
        truncate=truncate,
        **factors,
        **mscales,
    )


def parse_decoder_config(hf: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """Validate an HF config dict and turn it into a `DecoderConfig` for the matching family.

    Sizes must be positive integers, rms_norm_eps and the RoPE numbers positive finite numbers, switches
    JSON booleans, token ids non-negative integers; CheckpointError naming the field and `where`."""
    from dspark.models.families import family_for_config

    architectures_field(hf, where)
    str_field(hf, "model_type", where, default=None)
    for key in BOOLEAN_FIELDS:
        bool_field(hf, key, where, default=None)
    family = family_for_config(hf, where)
    unsupported = family.unsupported_reason(hf)
    if unsupported:
        raise UnsupportedModelError(f"{where}: {unsupported}")
    hidden = int_field(hf, "hidden_size", where)
    heads = int_field(hf, "num_attention_heads", where)
    kv_heads = int_field(hf, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_key_value_heads={kv_heads!r} must divide num_attention_heads={heads}")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        head_dim = hidden // heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
        raise CheckpointError(f"{where}: head_dim={head_dim!r} must be a positive even integer")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (only SwiGLU/silu)")
    bos = token_ids_field(hf, "bos_token_id", where)
    if len(bos) > 1:
        raise CheckpointError(f"{where}: field 'bos_token_id' must be one token id, got {hf['bos_token_id']!r}")
    dtype = str_field(hf, "torch_dtype", where, default=None) or str_field(hf, "dtype", where, default=None)
    return DecoderConfig(
        family=family.name,
        vocab_size=int_field(hf, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=int_field(hf, "intermediate_size", where),
        num_layers=int_field(hf, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int_field(hf, "max_position_embeddings", where),
        rms_norm_eps=number_field(hf, "rms_norm_eps", where, default=1e-6),
        tie_word_embeddings=bool_field(hf, "tie_word_embeddings", where, default=family.tie_word_embeddings_default),
        rope=parse_rope(hf, where),
        qkv_bias=family.qkv_bias(hf),
        o_bias=family.o_bias(hf),
        mlp_bias=family.mlp_bias(hf),
        qk_norm=family.qk_norm,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=token_ids_field(hf, "eos_token_id", where),
        torch_dtype=dtype or "float32",
    )
