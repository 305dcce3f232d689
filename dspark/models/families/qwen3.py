"""Qwen3 (dense): per-head RMSNorm on queries and keys before RoPE; `attention_bias` on q/k/v/o."""

from dspark.models.families import ModelFamily, register


def _unsupported(hf):
    if hf.get("use_sliding_window"):
        return "use_sliding_window=true (sliding-window attention) is not supported"
    return None


register(
    ModelFamily(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        qk_norm=True,
        qkv_bias=lambda hf: bool(hf.get("attention_bias", False)),
        o_bias=lambda hf: bool(hf.get("attention_bias", False)),
        unsupported_reason=_unsupported,
    )
)
